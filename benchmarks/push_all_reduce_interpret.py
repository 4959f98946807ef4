"""Usage (a CPU, ~1 min; prints ALL OK): python benchmarks/push_all_reduce_interpret.py   # torch 2.13.0, triton, numpy

The protocol of push_all_reduce() (extensions/tp_all_reduce.py) checked without a GPU (issue 11).

Triton's interpreter (TRITON_INTERPRET=1) runs the very kernel on the CPU. Two processes play two ranks; their buffers
are shared memory, each process builds its own table of both buffers' addresses (what symmetric memory hands each
rank), and each runs 12 calls of 8 sizes back to back, so one rank may run a call ahead of the other. Checked: each
call's sum equals x0 + x1 on both ranks, bit for bit (inputs hold -0.0, the empty mark); every buffer word is empty
again at the end. What it cannot check: the GPU's memory model (stores over NVLink, volatile loads) and speed.

  python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 triton numpy
  /tmp/tv/bin/python benchmarks/push_all_reduce_interpret.py        # ~1 min; prints ALL OK
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import triton  # noqa: E402

MAX, WORLD, BLOCK = 3000, 2, 1024
SIZES = [3000, 100, 2048, 3000, 1, 1500, 3000, 777, 3000, 2999, 5, 3000]

def inputs(step, n, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, generator=g)
    x[::7] = -0.0
    return x

def worker(rank, bufs, outs):
    from extensions.tp_all_reduce import push_kernel
    kernel = push_kernel()
    addrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)   # this process's view of both buffers
    counters = torch.zeros(triton.cdiv(MAX, BLOCK), dtype=torch.int32)
    for step, n in enumerate(SIZES):                  # back to back: a rank may run one call ahead of the other
        x, out = inputs(step, n, rank), torch.empty(n)
        kernel[(triton.cdiv(n, BLOCK),)](x, out, addrs.data_ptr(), counters, n, MAX=MAX, RANK=rank, WORLD=WORLD,
                                         BLOCK=BLOCK, EMPTY=-2147483648)
        outs[rank][step, :n] = out

if __name__ == "__main__":
    bufs = [torch.full((3 * WORLD * MAX,), -0.0).share_memory_() for _ in range(WORLD)]
    outs = [torch.zeros(len(SIZES), MAX).share_memory_() for _ in range(WORLD)]
    ctx = mp.get_context("fork")
    ps = [ctx.Process(target=worker, args=(r, bufs, outs)) for r in range(WORLD)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(timeout=500)
    assert not any(p.is_alive() for p in ps), "hang"
    ok = all(p.exitcode == 0 for p in ps)
    for step, n in enumerate(SIZES):
        expect = inputs(step, n, 0) + inputs(step, n, 1)
        same = all(torch.equal(o[step, :n], expect) for o in outs) and \
            torch.equal(outs[0][step, :n].view(torch.int32), outs[1][step, :n].view(torch.int32))
        ok &= same
        print(step, n, "equal on both ranks, bit for bit:", same)
    clean = all(bool((b.view(torch.int32) == -2147483648).all()) for b in bufs)
    print("buffers empty at the end:", clean)
    print("ALL OK" if ok and clean else "FAILED")
    sys.exit(0 if ok and clean else 1)
