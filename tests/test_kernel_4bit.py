"""The 4-bit weight-only matmul (extensions/kernel_4bit.py, used by extensions/quantized_matmul.py --quant 4bit):
bitsandbytes' stored 4-bit weights read as they are, the dequantized weight equal to bitsandbytes' dequantize_4bit bit
for bit — in torch (the CPU path) and in the Triton kernel (run by Triton's interpreter here; on a GPU by the gpu
test), for one layer and for layers concatenated (q/k/v, gate/up fused into one matmul) — and a model whose Linear4bit
layers are swapped (and fused) decoding verified."""
import gc
import json
import math
import re
import sys
import weakref

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

import ds_bnb_infer as m
from conftest import ROOT, run_cli, run_group
from extensions.fast_decode import fuse_projections
from extensions.quantized_matmul import QuantizedGreedy, QuantizedMatmulConfig, dequantize_4bit, unreadable_4bit, \
    weight_only, weight_only_4bit_class

QMM = ROOT / "extensions" / "quantized_matmul.py"
# Odd shapes: a row of 576 codes (not a multiple of 128), 1000 blocks (not a multiple of 256), a row of 320.
SHAPES = [(48, 576), (100, 640), (37, 320)]


# Layers to concatenate (q, k, v of a GQA model: k and v fewer rows than q), each at its own scale, so that each has
# another double-quantization offset (the mean of its block scales); every part's block count a multiple of 256.
PARTS = [((128, 256), 0.02), ((64, 256), 0.06), ((64, 256), 0.01)]


def quantized(shape, quant_type, double_quant, dtype, device="cpu", seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)
    return F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)


def module(packed, state, **kw):
    """The Int4WeightOnly over one quantized weight's storage."""
    return weight_only_4bit_class().from_state(packed, state, **kw)


def parts(quant_type, double_quant, dtype, shapes=PARTS, device="cpu"):
    """[(packed, state)] of the layers to concatenate."""
    return [quantized(shape, quant_type, double_quant, dtype, device, seed=i, scale=scale)
            for i, (shape, scale) in enumerate(shapes)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_torch_dequantization_is_bitsandbytes_bit_for_bit(dtype, quant_type, double_quant):
    for shape in SHAPES:
        packed, state = quantized(shape, quant_type, double_quant, dtype)
        assert unreadable_4bit(state, packed) is None
        want = F.dequantize_4bit(packed, state)
        assert torch.equal(dequantize_4bit(*module(packed, state).storage()), want), (shape, quant_type)


def test_layouts_the_kernel_cannot_read_are_named():
    packed, state = F.quantize_4bit(torch.randn(8, 96), blocksize=64)       # blocks of 64 straddle rows of 96
    assert "multiple of 64" in unreadable_4bit(state, packed)
    packed, state = F.quantize_4bit(torch.randn(8, 128), blocksize=128)
    assert "blocksize 128" in unreadable_4bit(state, packed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", True), ("nf4", False)])
def test_concatenated_layers_are_each_layers_weight_and_multiply_as_the_separate_layers(dtype, quant_type,
                                                                                        double_quant):
    """q, k and v (k and v fewer rows, each its own offset) as one Int4WeightOnly: its dequantized weight is the
    layers' bitsandbytes dequantize_4bit stacked, bit for bit; so its output is theirs side by side. Bit for bit
    here too on this CPU, but asserted within fp32 rounding: the same products, yet a matmul library may block a
    wider matrix's sums in another order."""
    layers = parts(quant_type, double_quant, dtype)
    if double_quant:                                                    # three offsets, one per part
        assert len({float(state.offset) for _, state in layers}) == 3
    g = torch.Generator().manual_seed(2)
    biases = [torch.randn(state.shape[0], generator=g) for _, state in layers]
    separate = [module(*layer, compute_dtype=torch.float32, bias=b) for layer, b in zip(layers, biases)]
    fused = type(separate[0]).concatenate(separate)
    assert fused.out_features == 256 and fused.offset.shape == (256,) and fused.nested == double_quant
    assert torch.equal(fused.dequantized(), torch.cat([F.dequantize_4bit(*layer) for layer in layers]))
    x = torch.randn(3, 256, generator=g)
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in separate], -1), rtol=1e-5, atol=1e-6)


def test_layers_that_cannot_be_one_weight_are_not_concatenated():
    """concatenate() returns None for parts that no one weight holds: another in_features, double quant on in one
    only, another code table (fp4 / nf4), weight or compute dtype, second-level table, bias on one only; with double
    quant a part whose block count is not a multiple of 256 (the kernels index the second level at block // 256 of the
    concatenation); without double quant that part is fine."""
    cls = weight_only_4bit_class()

    def one(shape=(128, 256), quant_type="nf4", double_quant=True, dtype=torch.float16, **kw):
        return module(*quantized(shape, quant_type, double_quant, dtype), **kw)
    assert cls.concatenate([one(), one((64, 256))]) is not None
    assert cls.concatenate([one((128, 640), double_quant=False), one((100, 640), double_quant=False)]) is not None
    assert cls.concatenate([one((128, 640)), one((100, 640))]) is not None     # 1280 blocks, then the last: 1000
    code2 = one()
    code2.code2 = code2.code2.flip(0)
    refused = {"in_features": [one(), one((128, 512))],
               "double quant": [one(), one(double_quant=False)],
               "code table": [one(), one(quant_type="fp4")],
               "weight dtype": [one(), one(dtype=torch.float32)],
               "compute dtype": [one(compute_dtype=torch.float32), one(compute_dtype=torch.bfloat16)],
               "second-level table": [one(), code2],
               "bias": [one(), one(bias=torch.zeros(128))],
               "1000 blocks before another part": [one((100, 640)), one((128, 640))]}
    for why, layers in refused.items():
        assert cls.concatenate(layers) is None, why


def test_fused_4bit_model_frees_its_parts_and_decodes_verified():
    """random:tiny (q/k/v 4 x 256 blocks, gate/up 12 x 256: double quant fuses) swapped to Int4WeightOnly: the fast
    loop fuses q/k/v and gate/up of both layers (4 groups), passes verification against the model unfused, and the
    parts are gone once fused (no weight held twice)."""
    config = m.DeployConfig(model_name="random:tiny", quant="4bit", dtype="fp32", device="cpu")
    model = m.load_model(config, "4bit", "cpu")
    assert weight_only(model) == 14
    attn = model.model.layers[0].self_attn
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        gone = [weakref.ref(attn.q_proj), weakref.ref(attn.v_proj.packed)]
        assert fuse_projections(model) == 4
        gc.collect()
        assert all(ref() is None for ref in gone)
        assert type(attn.q_proj.fused).__name__ == "Int4WeightOnly" and attn.q_proj.fused.out_features == 768
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    config = QuantizedMatmulConfig(model_name="random:tiny", backend="hf", quant="4bit", device="cpu",
                                   max_new_tokens=8)
    engine, _, info = m.init_engine(config, QuantizedGreedy)
    assert engine.fused == 4 and info.verify["passed"]
    assert type(engine.module.model.layers[1].mlp.gate_proj.fused).__name__ == "Int4WeightOnly"


def test_a_4bit_kernel_that_is_wrong_fails_the_check_against_its_weight():
    """check_matmuls() multiplies each 4-bit layer as the decoder will (the layer's kernels' matmul_4bit) and compares
    with its weight dequantized (the kernels' linear()): the decoder's own check cannot see a kernel that is wrong in
    the model it compares with as well. The layers' kernels here are stand-ins in torch (the GPU's are checked by the
    gpu test): one right (its layer with a large bias, which the check leaves out), one that multiplies x reversed,
    one whose output is NaN."""
    import types
    from extensions.quantized_matmul import check_matmuls
    packed, state = quantized((64, 256), "nf4", True, torch.float32)
    def linear(x, *storage):
        return torch.nn.functional.linear(x, dequantize_4bit(*storage).to(x.dtype))
    layers = {}
    for name, wrong in (("right", lambda y: y), ("reversed", None), ("nan", lambda y: y * math.nan)):
        layer = layers[name] = module(packed, state, bias=torch.full((64,), 100.0) if name == "right" else None)
        layer.kernels = types.SimpleNamespace(linear=linear, matmul_4bit=lambda x, *args, wrong=wrong, layer=layer:
                                              wrong(linear(x, *layer.storage())) if wrong else
                                              linear(x.flip(-1), *layer.storage()), picked_tilings=dict)
    assert check_matmuls(torch.nn.Sequential(module(packed, state))) is None        # no kernels (a CPU): nothing
    right = check_matmuls(torch.nn.Sequential(layers["right"]))
    assert right["layers"] == 1 and right["max_rel_error"] < 1e-6
    for name in ("reversed", "nan"):
        with pytest.raises(m.RunFailure, match="4-bit matmul kernel differs"):
            check_matmuls(torch.nn.Sequential(layers["right"], layers[name]))


# Run by Triton's interpreter in a fresh interpreter (it is chosen when triton is imported). The interpreter's
# bf16 is not the GPU's (it truncates where the GPU rounds, and its tl.dot reads bf16 as integers), so bf16 weights
# are checked bit for bit by the gpu test instead.
INTERPRETED = r'''
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import torch, bitsandbytes.functional as F
from extensions import kernel_4bit
from test_kernel_4bit import SHAPES, module, parts, quantized
out = {}
for shape in SHAPES:
    for quant_type in ("nf4", "fp4"):
        for double_quant in (True, False):
            for dtype in (torch.float16, torch.float32):
                packed, state = quantized(shape, quant_type, double_quant, dtype)
                want = F.dequantize_4bit(packed, state)
                key = f"{shape} {quant_type} {double_quant} {dtype}"
                out[key] = {"equal": bool(torch.equal(kernel_4bit.dequantize_state(packed, state), want))}
                if dtype == torch.float16 and double_quant:
                    (absmax, absmax2, code2, code, offset), nested = kernel_4bit.state_args(state)
                    # 1 row: the matvec; 3 rows: the tensor-core form, x and W each as the dot's first operand
                    # (the interpreter cannot time the autotuner's choices: tilings are given)
                    # (a matvec of 3 programs, each taking every third block of 4 rows in one pipeline)
                    # (3 rows with K in 3 and 2 ranges, their sums added after)
                    for rows, tiling in ((1, [4, 4]), (1, [4, 4, 3]), (3, [16, 2]), (3, [64, 2, 1]),
                                         (3, [16, 2, 0, 3]), (3, [64, 1, 1, 2])):
                        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1)).half()
                        y = kernel_4bit.matmul_4bit(x, packed, absmax, absmax2, code2, code, offset, shape[0],
                                                    nested, state.dtype, tiling)
                        exact = x.float() @ want.float().t()
                        out[key][f"matmul {rows} {tiling}"] = float((y.float() - exact).norm() / exact.norm())
                    # one-hot rows of x: the matvec's own dequantization, column by column (each nibble's place)
                    columns = [*range(8), shape[1] - 1]
                    x = torch.zeros(len(columns), shape[1], dtype=torch.float16)
                    x[range(len(columns)), columns] = 1
                    got = torch.cat([kernel_4bit.matmul_4bit(row[None], packed, absmax, absmax2, code2, code,
                                                             offset, shape[0], nested, state.dtype, [4, 4, 5])
                                     for row in x])
                    out[key]["matvec columns equal"] = bool(torch.equal(got, want[:, columns].t()))
                if dtype == torch.float16:
                    # the matvec with its absmax loaded a step ahead: the same products, bit for bit (a program
                    # taking every fifth block of 4 rows: its next block's first absmax loaded at a block's end)
                    (absmax, absmax2, code2, code, offset), nested = kernel_4bit.state_args(state)
                    xt = kernel_4bit.code_major(torch.randn(1, shape[1], generator=torch.Generator().manual_seed(4))
                                                .half())
                    ahead = [kernel_4bit.matvec_4bit(xt, packed, absmax, absmax2, code2, code, offset, shape[0],
                                                     nested, dtype, tiling, scales_ahead=a)
                             for tiling in ([4, 4, 5], [8, 2]) for a in (False, True)]
                    out[key]["scales ahead equal"] = torch.equal(ahead[0], ahead[1]) and torch.equal(ahead[2], ahead[3])
# One row whose K / 8 is a multiple of X_WORDS (code_major() pads nothing: x must still come out contiguous).
packed, state = quantized((24, 8 * kernel_4bit.X_WORDS), "nf4", True, torch.float16)
(absmax, absmax2, code2, code, offset), nested = kernel_4bit.state_args(state)
x = torch.randn(1, 8 * kernel_4bit.X_WORDS, generator=torch.Generator().manual_seed(3)).half()
exact = x.float() @ F.dequantize_4bit(packed, state).float().t()
y = kernel_4bit.matmul_4bit(x, packed, absmax, absmax2, code2, code, offset, 24, nested, state.dtype, [8, 8])
out["unpadded row"] = {"equal": True, "matmul 1 [8, 8]": float((y.float() - exact).norm() / exact.norm())}
# A prefill's matmul: the weight dequantized a range of rows at a time (4 ranges of 32 rows here) equals it whole.
packed, state = quantized((100, 640), "nf4", True, torch.float16)
(absmax, absmax2, code2, code, offset), nested = kernel_4bit.state_args(state)
storage = (packed, absmax, absmax2, code2, code, offset, nested, (100, 640), state.dtype)
whole = kernel_4bit.dequantize(*storage)
x = torch.randn(20, 640, generator=torch.Generator().manual_seed(2)).half()
chunked = kernel_4bit.linear(x, *storage, chunk_bytes=32 * 640 * 2)
exact = x.float() @ whole.float().t()
out["prefill in row ranges"] = {
    "equal": bool(torch.equal(kernel_4bit.dequantize(*storage, rows=(32, 64)), whole[32:64]))
             and bool(torch.equal(whole, F.dequantize_4bit(packed, state))),
    "matmul chunked": float((chunked.float() - exact).norm() / exact.norm())}
# Two layers concatenated (a smaller k, then q), each with its own offset: the kernels read one offset a row. Tiles
# of 128 rows (the first holds k's 64 rows and q's first 64) and a whole row of 256 codes a step: the interpreter's
# time is per step.
for quant_type, double_quant in (("nf4", True), ("fp4", True), ("nf4", False)):
    layers = parts(quant_type, double_quant, torch.float16)[1::-1]
    fused = type(module(*layers[0])).concatenate([module(*layer) for layer in layers])
    want = torch.cat([F.dequantize_4bit(*layer) for layer in layers])
    args = (fused.packed, fused.absmax, fused.absmax2, fused.code2, fused.code, fused.offset, fused.out_features,
            fused.nested, fused.weight_dtype)
    columns = [*range(8), 255]
    x = torch.zeros(len(columns), 256, dtype=torch.float16)
    x[range(len(columns)), columns] = 1
    matvec = torch.cat([kernel_4bit.matmul_4bit(row[None], *args, [128, 4]) for row in x])
    out[f"fused {quant_type} {double_quant}"] = {
        "equal": bool(torch.equal(kernel_4bit.dequantize(*fused.storage(), tiling=(128, 2)), want)),
        "matvec columns equal": bool(torch.equal(matvec, want[:, columns].t())),
        "tensor-core columns equal": bool(torch.equal(kernel_4bit.matmul_4bit(x, *args, [128, 2]),
                                                      want[:, columns].t())),
        "tensor-core W first columns equal": bool(torch.equal(kernel_4bit.matmul_4bit(x, *args, [64, 2, 1]),
                                                              want[:, columns].t())),
        "tensor-core split columns equal": bool(torch.equal(kernel_4bit.matmul_4bit(x, *args, [64, 1, 1, 3]),
                                                            want[:, columns].t()))}
print(json.dumps(out))
'''


def test_a_matvec_tiling_without_programs_is_refused():
    """matmul_4bit's tiling means (rows, blocks, programs, warps) for one row of x and (rows, blocks, W first, split)
    for more: a tensor-core tiling given for one row (its third 0: x first) would launch no program at all, and its
    fourth (split) is no number of warps a program."""
    from extensions import kernel_4bit
    packed, state = quantized((48, 576), "nf4", True, torch.float16)
    (absmax, absmax2, code2, code, offset), nested = kernel_4bit.state_args(state)
    for tiling in ([16, 2, 0, 3], [16, 2, 3, 3]):           # (and a 4th, warps a program, of 1, 2, 4 or 8)
        with pytest.raises(ValueError, match=r"programs >= 1\[, warps 1/2/4/8\]"):
            kernel_4bit.matmul_4bit(torch.zeros(1, 576, dtype=torch.float16), packed, absmax, absmax2, code2, code,
                                    offset, 48, nested, state.dtype, tiling)


def test_every_candidate_tiling_reads_as_one_line_for_the_reports():
    """kernel_4bit.tiling_of: a candidate as the reports list what the autotuners picked (picked_tilings, which a CPU
    run leaves empty: the autotuners run on a GPU)."""
    from extensions import kernel_4bit
    lines = {kernel_4bit.tiling_of(c) for c in kernel_4bit.MATVEC_ONE_WARP.configs + kernel_4bit.MATMUL.configs}
    assert len(lines) == len(kernel_4bit.MATVEC_ONE_WARP.configs) + len(kernel_4bit.MATMUL.configs)
    assert "BLOCK_N=2 WORDS=128 PER_SM=16 warps=1 stages=1 maxnreg=72" in lines
    assert "BLOCK_N=64 WORDS=16 W_FIRST=True SPLIT=4 warps=4 stages=3" in lines
    assert kernel_4bit.picked_tilings() == {}


def test_triton_kernel_dequantizes_bit_for_bit_and_multiplies_under_the_interpreter():
    """The very kernel a GPU runs (its `tile`), interpreted on the CPU: the dequantized weight equals bitsandbytes'
    (nf4, fp4; double quant on and off; fp16 and fp32 weights; odd shapes), and its matvec (1 row of x) and tensor-core
    path (3 rows, padded to 16; x or W the dot's first operand) equal x @ W^T within fp32 summation's rounding; the
    matvec with its absmax loaded a step ahead (kernel_4bit.SCALES_AHEAD) gives the same products, bit for bit. Two
    layers concatenated, each with its own offset: the dequantization, the matvec's and the tensor-core path's (one-hot
    rows of x: a product with 1 and sums of zeros, exact) equal each layer's bitsandbytes dequantize_4bit bit for
    bit."""
    r = run_group([sys.executable, "-c", INTERPRETED, str(ROOT)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 24 + 1 + 1 + 3
    for key, row in results.items():
        assert row["equal"] and row.get("matvec columns equal", True), (key, row)
        assert row.get("scales ahead equal", "float16" not in key), (key, row)     # every fp16 weight has it
        assert row.get("tensor-core columns equal", True), (key, row)
        assert row.get("tensor-core W first columns equal", True), (key, row)
        assert row.get("tensor-core split columns equal", True), (key, row)
        for name, error in row.items():
            if name.startswith("matmul"):
                assert error < 1e-3, (key, name, error)


def test_matvec_compiled_for_an_h100_spends_few_instructions_a_code(tmp_path):
    """The matvec's design read from the machine code Triton makes for sm_90, without a GPU: each block's scale once on
    its words' sums, x loaded in the tile's own layout (code_major()), at most 128 registers a thread, at most 4
    barriers a step, nothing spilled (one tiling's registers are capped), at every tiling its autotuner tries. Its
    table lookup by tl.gather (from shared memory): under 7 instructions a code (under 5.5 at 16 rows x 128 words),
    2-3.5 of them on the integer pipe (a shift and a mask a code) and a shared-memory load a code (in a program of
    one warp, kernel_4bit.ONE_WARP_TILINGS, a shuffle: there no barrier and no shared memory at all). By warp shuffle
    (kernel_4bit.SHUFFLE_ON_GPU): a shuffle a code and no table in shared memory, under 2 integer instructions a code
    (one shift), under 5 instructions a code at every long-row tiling (under 4 at 16 x 128), each shuffle reading its
    lane's table entry from a per-thread scalar (kernel_4bit.lane_table()). The former forms: over
    25 instructions a code (the table in global memory), 20 barriers a step (x a vector, moved through shared memory
    at each code position). The tensor-core form: fewer instructions a code of W with W the dot's first operand than
    with x first, and with Triton's pipeline its loads copied asynchronously. Launched as a programmatic dependent
    launch (Hopper), the matvec waits for the kernel before it (griddepcontrol.wait) before it reads x (with
    TRIGGER_EARLY, then lets the kernel after it launch: griddepcontrol.launch_dependents); it keeps its
    own pipeline of loads into registers (no asynchronous copies, LDGSTS: Triton's pipeline was slower,
    kernel_4bit.py)."""
    from extensions import kernel_4bit
    path = tmp_path / "inspect.json"
    r = run_group([sys.executable, str(ROOT / "benchmarks" / "inspect_kernel_4bit.py"), "--json", str(path)],
                  timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(path.read_text())["rows"]
    gather = [row for row in rows if row["kernel"].startswith("matvec (kernel_4bit.py), lookup by tl.gather")]
    shuffle = [row for row in rows if row["kernel"].startswith("matvec (kernel_4bit.py), lookup by warp shuffle")]
    ahead = [row for row in rows if row["kernel"].startswith("matvec (kernel_4bit.py), absmax a step ahead")]
    now = gather + shuffle + ahead
    tuner = kernel_4bit.MATVEC_ONE_WARP if kernel_4bit.ONE_WARP else kernel_4bit.MATVEC
    assert len(gather) == len(shuffle) == len(ahead) // 2 == len(kernel_4bit.MATVEC_ONE_WARP.configs) and all(
        row["registers"] <= 128 and row["barriers"] <= 4 and row["spills"] == 0 for row in now), now
    assert sum("(the GPU's)" in row["kernel"] for row in now) == len(tuner.configs), now
    assert any("maxnreg" in row["tiling"] for row in now), now
    # programs of one warp: no barrier and no shared memory in the loop (layouts converted by warp shuffles)
    one_warp = [row for row in now if "warps=1" in row["tiling"]]
    assert len(one_warp) == 4 * len(kernel_4bit.ONE_WARP_TILINGS) and all(
        row["barriers"] == 0 and row["shared_loads_per_code"] == 0 for row in one_warp), one_warp
    at_16x128 = "BLOCK_N=16 WORDS=128 warps=4"
    # tl.gather: a shift and a mask a code on the integer pipe (half a warp a cycle), and a shared-memory load (in a
    # program of one warp, a shuffle)
    assert all(row["instructions_per_code"] < 7 and 2 <= row["alu_per_code"] < 3.5
               and (row["shuffles_per_code"] if "warps=1" in row["tiling"] else row["shared_loads_per_code"]) >= 1
               for row in gather), gather
    assert next(row for row in gather if row["tiling"] == at_16x128)["instructions_per_code"] < 5.5
    # the shuffle: one a code, no shared-memory load a code (a few a step: the sums across a row's threads), a shift
    assert all(row["shuffles_per_code"] >= 1 and row["shared_loads_per_code"] < 0.1 and row["alu_per_code"] < 2
               and row["instructions_per_code"] < 5.5 for row in shuffle), shuffle
    assert all(row["instructions_per_code"] < 5 for row in shuffle if "WORDS=128" in row["tiling"]), shuffle
    assert next(row for row in shuffle if row["tiling"] == at_16x128)["instructions_per_code"] < 4
    # and each shuffle reads the table from its own thread's scalar (a tensor may be moved between threads)
    assert all(row["shuffles_read_own_lane"] for row in shuffle), shuffle
    assert all(row["waits_for_prior_kernel"] and row["launches_next"] == kernel_4bit.TRIGGER_EARLY
               for row in now), now
    # kernel_4bit.TRIGGER_EARLY: the kernel after it launched early, only once the matvec has passed its own wait
    early = [row for row in rows if "(TRIGGER)" in row["kernel"]]
    assert len(early) == 1 and early[0]["launches_next_after_wait"] and early[0]["barriers"] == 0, early
    assert not any(row["async_copies"] for row in now), now      # its own pipeline: loads into registers
    # the tensor-core form: its tile as the dot's first operand (read from registers) can spend fewer than x first;
    # with Triton's pipeline (num_stages 3) the loads feeding the dot are copied asynchronously; nothing spills
    dot = [row for row in rows if row["kernel"].startswith("tensor-core")]
    assert min(row["instructions_per_code"] for row in dot if "W_FIRST=True" in row["tiling"]) < \
        min(row["instructions_per_code"] for row in dot if "W_FIRST=False" in row["tiling"]), dot
    assert len(dot) == len(kernel_4bit.MATMUL.configs) and all(row["spills"] == 0 for row in dot), dot
    assert sum("num_stages=3" in row["tiling"] for row in dot) >= len(dot) - 1 and all(
        (row["async_copies"] > 0) == ("num_stages=3" in row["tiling"]) for row in dot), dot
    assert all(row["instructions_per_code"] > 25 for row in rows if "prefetch" in row["kernel"]), rows
    assert all(row["barriers"] >= 16 for row in rows if "smem" in row["kernel"]), rows


def test_swapped_layers_hold_bitsandbytes_storage_and_multiply_as_its_dequantized_weight():
    config = m.DeployConfig(model_name="random:tiny", quant="4bit", dtype="fp32", device="cpu",
                            bnb_4bit_compute_dtype="fp32")
    with torch.no_grad():
        model = m.load_model(config, "4bit", "cpu")
        layer = model.model.layers[0].mlp.down_proj
        packed, state = layer.weight.data.clone(), layer.weight.quant_state
        want = F.dequantize_4bit(packed, state)
        assert weight_only(model) == 14
        mine = model.model.layers[0].mlp.down_proj
        assert type(mine).__name__ == "Int4WeightOnly" and mine.packed.dtype == torch.uint8
        assert not any(isinstance(x, bnb.nn.Linear4bit) for x in model.modules())
        x = torch.randn(3, want.shape[1])
        assert torch.equal(mine.packed, packed)
        torch.testing.assert_close(mine(x), x @ want.T, rtol=1e-5, atol=1e-6)


def test_4bit_runs_weight_only_by_default_verified(tmp_path):
    path = tmp_path / "wo4.json"
    r = run_cli("--model", "random:tiny", "--quant", "4bit", "--bnb-4bit-quant-type", "fp4", "--max-new-tokens", "8",
                "--iters", "1", "--warmup", "0", "--json", str(path), script=QMM)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads(path.read_text())["engine"]
    assert engine["verify"]["passed"] and engine["quant"] == "4bit"
    assert "4-bit fp4, double quant True, compute bf16, weight-only matmul" in engine["notes"][-1]
    assert "4 groups of projections fused into one matmul each (fast_decode.py)" in engine["notes"]
    assert 0 < engine["verify"]["vs_unquantized"]["prefill_rel_error"] < 1


@pytest.mark.gpu
def test_kernel_on_the_gpu_is_bitsandbytes_bit_for_bit_and_decodes_verified(tmp_path):
    """On a GPU: the kernel's dequantization equals bitsandbytes' for bf16 too (one layer, and layers concatenated),
    its matmul (1 and 16 rows) is near x @ W^T, the matvec's products with one-hot rows of x are the dequantized
    weight's columns bit for bit with each table lookup (tl.gather, and the warp shuffle that only a GPU runs), with
    the absmax loaded a step ahead or not, in programs of 4 warps and of one, the four forms' products with any x
    equal at a tiling, and the compiled fast loop over
    Int4WeightOnly layers (the default of --quant 4bit, q/k/v and gate/up fused) is verified, its kernels checked
    against their weights first."""
    from extensions import kernel_4bit
    for dtype in (torch.float16, torch.bfloat16):
        for quant_type in ("nf4", "fp4"):
            for double_quant in (True, False):
                for shape in SHAPES + [(4096, 4096)]:
                    packed, state = quantized(shape, quant_type, double_quant, dtype, device="cuda")
                    want = F.dequantize_4bit(packed, state)
                    assert torch.equal(kernel_4bit.dequantize_state(packed, state), want), (dtype, quant_type, shape)
                    (absmax, absmax2, code2, code, offset), nested = kernel_4bit.state_args(state)
                    for rows in (1, 16):
                        x = torch.randn(rows, shape[1], device="cuda").to(dtype)
                        y = kernel_4bit.matmul_4bit(x, packed, absmax, absmax2, code2, code, offset, shape[0],
                                                    nested, state.dtype)
                        exact = x.float() @ want.float().t()
                        assert float((y.float() - exact).norm() / exact.norm()) < 1e-2
                    # one-hot rows of x: the matvec with each table lookup (the warp shuffle is PTX, which Triton's
                    # interpreter cannot run) gives back the dequantized weight column by column, every nibble's
                    # place; and the two lookups' products with a random x are the same, bit for bit
                    columns = [*range(16), shape[1] // 2 + 3, shape[1] - 1]
                    x = torch.zeros(len(columns) + 1, shape[1], device="cuda", dtype=dtype)
                    x[range(len(columns)), columns] = 1
                    x[-1] = torch.randn(shape[1], device="cuda")
                    # (at one tiling: the autotuner would compile and time each of its tilings at each shape)
                    # (and each with the absmax loaded a step ahead or not; 2 programs, each taking several blocks)
                    # (and in programs of one warp, whose layout conversions Triton makes with warp shuffles)
                    got = {(tuple(tiling[3:]), shuffle, ahead): torch.cat([
                        kernel_4bit.matvec_4bit(kernel_4bit.code_major(row[None]), packed, absmax, absmax2, code2,
                                                code, offset, shape[0], nested, dtype, tiling, shuffle=shuffle,
                                                scales_ahead=ahead) for row in x])
                        for tiling in ([8, 16, 2], [2, 16, 7, 1]) for shuffle in (False, True)
                        for ahead in (False, True)}
                    case = (dtype, quant_type, double_quant, shape)
                    assert all(torch.equal(y[:-1], want[:, columns].t()) for y in got.values()), case
                    assert all(torch.equal(got[key[0], False, False][-1], y[-1]) for key, y in got.items()), case
                layers = parts(quant_type, True, dtype, device="cuda")
                fused = type(module(*layers[0])).concatenate([module(*layer) for layer in layers])
                want = torch.cat([F.dequantize_4bit(*layer) for layer in layers])
                assert torch.equal(fused.dequantized(), want), (dtype, quant_type)
                x = torch.randn(1, want.shape[1], device="cuda").to(dtype)
                exact = x.float() @ want.float().t()
                assert float((fused(x).float() - exact).norm() / exact.norm()) < 1e-2
    path = tmp_path / "gpu4.json"
    r = run_cli("--model", "random:tiny", "--backend", "hf", "--quant", "4bit", "--max-new-tokens", "16",
                "--iters", "1", "--warmup", "1", "--json", str(path), script=QMM, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads(path.read_text())["engine"]
    assert engine["verify"]["passed"] and engine["decode"] == "compiled", engine
    assert "4 groups of projections fused" in " ".join(engine["notes"]), engine["notes"]
    # each kernel (fused layers' included) against its weight dequantized: 2 layers x (q/k/v, o, gate/up, down)
    assert engine["verify"]["matmuls"]["layers"] == 8 and engine["verify"]["matmuls"]["max_rel_error"] < 1e-2
    # the tilings the autotuners picked, in the report: the matvec's (one row) and the tensor-core form's (3 and 16)
    picked = engine["verify"]["matmuls"]["tilings"]
    assert any(k.startswith("matvec N=") for k in picked) and any(k.startswith("matmul N=") for k in picked), picked


@pytest.mark.gpu
def test_a_norm_before_the_matvec_and_its_layout_compile_to_one_kernel():
    """kernel_4bit.INDUCTOR_OPTIONS, which Int4WeightOnly carries and fast_decode.decode_step gives torch.compile: the
    residual add, the RMSNorm and code_major()'s layout of its output for the matvec are one kernel (inductor's
    default: two, the layout's transpose kept out of the reduction), and the product is the eager one. Launches are
    counted in the compiled wrapper (a kernel's `.run(`): with the options a reduction may be compiled in two forms, a
    multi-kernel choosing one, and the wrapper launches only that."""
    from torch._inductor.utils import run_and_get_code
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from extensions import kernel_4bit
    from extensions.fast_decode import layer_options
    layer = module(*quantized((256, 4096), "nf4", True, torch.float16, device="cuda"))
    norm = LlamaRMSNorm(4096).to("cuda", torch.float16).requires_grad_(False)     # a decode step: no autograd
    torch.nn.init.normal_(norm.weight)

    def forward(h, d):
        h = h + d
        return h, layer(norm(h))
    assert layer_options(torch.nn.ModuleList([norm, layer])) == kernel_4bit.INDUCTOR_OPTIONS
    h, d = torch.randn(2, 1, 1, 4096, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        _, eager = forward(h, d)
    for options, kernels in ((kernel_4bit.INDUCTOR_OPTIONS, 1), ({}, 2)):
        torch._dynamo.reset()
        with torch.no_grad():
            (_, y), code = run_and_get_code(torch.compile(forward, fullgraph=True, options=options), h, d)
        assert len(re.findall(r"\w+\.run\(", "\n".join(code))) == kernels, (options, code)
        assert float((y.float() - eager.float()).norm() / eager.float().norm()) < 1e-3

@pytest.mark.gpu
def test_a_4bit_servers_compiled_prefill_takes_any_rows_without_compiling_again():
    """serve.py on a GPU with --quant 4bit: its prefill, compiled at start, takes prompts whose rows of x fall on
    either side of the 4-bit layers' 16-row branch (the tensor-core kernel or linear()) without compiling again."""
    from extensions.serve import ServeConfig, SlotBatch
    config = ServeConfig(model_name="random:tiny", backend="hf", quant="4bit", max_num_seqs=2, max_model_len=60)
    batch, _, info = m.init_engine(config, SlotBatch)
    assert info.verify["passed"] and batch.prefill_mode == "compiled"
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows, prompts in [([0], [[5]]), ([1], [list(range(3, 40))]), ([0, 1], [[1, 2, 3], [7] * 5])]:
            assert torch.isfinite(batch.admit(rows, prompts)).all()

def test_the_server_multiplies_4bit_weight_only_verified():
    """serve.py --quant 4bit serves with the same matmul (its rows' decoder swaps the layers before verification)."""
    from extensions.serve import ServeConfig, SlotBatch
    config = ServeConfig(model_name="random:tiny", backend="hf", device="cpu", quant="4bit", max_num_seqs=2,
                         max_model_len=39)
    batch, _, info = m.init_engine(config, SlotBatch)
    assert info.verify["passed"] and info.quant == "4bit"
    assert any(type(x).__name__ == "Int4WeightOnly" for x in batch.module.modules())
    assert not any(isinstance(x, bnb.nn.Linear4bit) for x in batch.module.modules())
