"""The 4-bit weight-only matmul (extensions/kernel_4bit.py, used by extensions/quantized_matmul.py --quant 4bit):
bitsandbytes' stored 4-bit weights read as they are, the dequantized weight equal to bitsandbytes' dequantize_4bit bit
for bit — in torch (the CPU path) and in the Triton kernel (run by Triton's interpreter here; on a GPU by the gpu
test) — and a model whose Linear4bit layers are swapped decoding verified."""
import json
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

import ds_bnb_infer as m
from conftest import ROOT, run_cli, run_group
from extensions.quantized_matmul import dequantize_4bit, unreadable_4bit, weight_only

QMM = ROOT / "extensions" / "quantized_matmul.py"
# Odd shapes: a row of 576 codes (not a multiple of 128), 1000 blocks (not a multiple of 256), a row of 320.
SHAPES = [(48, 576), (100, 640), (37, 320)]


def quantized(shape, quant_type, double_quant, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=g) * 0.02).to(dtype).to(device)
    return F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_torch_dequantization_is_bitsandbytes_bit_for_bit(dtype, quant_type, double_quant):
    for shape in SHAPES:
        packed, state = quantized(shape, quant_type, double_quant, dtype)
        assert unreadable_4bit(state, packed) is None
        assert torch.equal(dequantize_4bit(packed, state), F.dequantize_4bit(packed, state)), (shape, quant_type)


def test_layouts_the_kernel_cannot_read_are_named():
    packed, state = F.quantize_4bit(torch.randn(8, 96), blocksize=64)       # blocks of 64 straddle rows of 96
    assert "multiple of 64" in unreadable_4bit(state, packed)
    packed, state = F.quantize_4bit(torch.randn(8, 128), blocksize=128)
    assert "blocksize 128" in unreadable_4bit(state, packed)


# Run by Triton's interpreter in a fresh interpreter (it is chosen when triton is imported). The interpreter's
# bf16 is not the GPU's (it truncates where the GPU rounds, and its tl.dot reads bf16 as integers), so bf16 weights
# are checked bit for bit by the gpu test instead.
INTERPRETED = r'''
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import torch, bitsandbytes.functional as F
from extensions import kernel_4bit
from test_kernel_4bit import SHAPES, quantized
out = {}
for shape in SHAPES:
    for quant_type in ("nf4", "fp4"):
        for double_quant in (True, False):
            for dtype in (torch.float16, torch.float32):
                packed, state = quantized(shape, quant_type, double_quant, dtype)
                want = F.dequantize_4bit(packed, state)
                key = f"{shape} {quant_type} {double_quant} {dtype}"
                out[key] = {"equal": bool(torch.equal(kernel_4bit.dequantize(packed, state), want))}
                if dtype == torch.float16 and double_quant:
                    (absmax, absmax2, code2, code, offset), nested = kernel_4bit.state_args(state)
                    for rows, tiling in ((1, [4, 4]), (3, [16, 2])):
                        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1)).half()
                        y = kernel_4bit.matmul_4bit(x, packed, absmax, absmax2, code2, code, offset, shape[0],
                                                    nested, state.dtype, tiling)
                        exact = x.float() @ want.float().t()
                        out[key][f"matmul {rows}"] = float((y.float() - exact).norm() / exact.norm())
                    # one-hot rows of x: the matvec's own dequantization, column by column (each nibble's place)
                    columns = [*range(8), shape[1] - 1]
                    x = torch.zeros(len(columns), shape[1], dtype=torch.float16)
                    x[range(len(columns)), columns] = 1
                    got = torch.cat([kernel_4bit.matmul_4bit(row[None], packed, absmax, absmax2, code2, code,
                                                             offset, shape[0], nested, state.dtype, [4, 4])
                                     for row in x])
                    out[key]["matvec columns equal"] = bool(torch.equal(got, want[:, columns].t()))
print(json.dumps(out))
'''


def test_triton_kernel_dequantizes_bit_for_bit_and_multiplies_under_the_interpreter():
    """The very kernel a GPU runs (its `tile`), interpreted on the CPU: the dequantized weight equals bitsandbytes'
    (nf4, fp4; double quant on and off; fp16 and fp32 weights; odd shapes), and its matvec (1 row of x) and tensor-core
    path (3 rows, padded to 16) equal x @ W^T within fp32 summation's rounding."""
    r = run_group([sys.executable, "-c", INTERPRETED, str(ROOT)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 24
    for key, row in results.items():
        assert row["equal"] and row.get("matvec columns equal", True), (key, row)
        for name, error in row.items():
            if name.startswith("matmul"):
                assert error < 1e-3, (key, name, error)


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
    assert 0 < engine["verify"]["vs_unquantized"]["prefill_rel_error"] < 1


@pytest.mark.gpu
def test_kernel_on_the_gpu_is_bitsandbytes_bit_for_bit_and_decodes_verified(tmp_path):
    """On a GPU: the kernel's dequantization equals bitsandbytes' for bf16 too, its matmul (1 and 16 rows) is near
    x @ W^T, and the compiled fast loop over Int4WeightOnly layers (the default of --quant 4bit) is verified."""
    from extensions import kernel_4bit
    for dtype in (torch.float16, torch.bfloat16):
        for quant_type in ("nf4", "fp4"):
            for double_quant in (True, False):
                for shape in SHAPES + [(4096, 4096)]:
                    packed, state = quantized(shape, quant_type, double_quant, dtype, device="cuda")
                    want = F.dequantize_4bit(packed, state)
                    assert torch.equal(kernel_4bit.dequantize(packed, state), want), (dtype, quant_type, shape)
                    (absmax, absmax2, code2, code, offset), nested = kernel_4bit.state_args(state)
                    for rows in (1, 16):
                        x = torch.randn(rows, shape[1], device="cuda").to(dtype)
                        y = kernel_4bit.matmul_4bit(x, packed, absmax, absmax2, code2, code, offset, shape[0],
                                                    nested, state.dtype)
                        exact = x.float() @ want.float().t()
                        assert float((y.float() - exact).norm() / exact.norm()) < 1e-2
    path = tmp_path / "gpu4.json"
    r = run_cli("--model", "random:tiny", "--backend", "hf", "--quant", "4bit", "--max-new-tokens", "16",
                "--iters", "1", "--warmup", "1", "--json", str(path), script=QMM, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads(path.read_text())["engine"]
    assert engine["verify"]["passed"] and engine["decode"] == "compiled", engine


def test_the_server_multiplies_4bit_weight_only_verified():
    """serve.py --quant 4bit serves with the same matmul (its rows' decoder swaps the layers before verification)."""
    from extensions.serve import ServeConfig, SlotBatch
    config = ServeConfig(model_name="random:tiny", backend="hf", device="cpu", quant="4bit", max_num_seqs=2,
                         max_model_len=39)
    batch, _, info = m.init_engine(config, SlotBatch)
    assert info.verify["passed"] and info.quant == "4bit"
    assert any(type(x).__name__ == "Int4WeightOnly" for x in batch.module.modules())
    assert not any(isinstance(x, bnb.nn.Linear4bit) for x in batch.module.modules())
