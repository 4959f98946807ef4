"""extensions/kernel_inject.py: GQA made multi-head exactly (CPU), refusals in one sentence (CPU), the residual add
fixed for DeepSpeed's fused MLP kernel (CPU, the kernel's in-place write emulated), and on a GPU the
injected model checked like any engine: logits within fp16 kernel tolerance, greedy tokens equal, padded batches
and a batch larger than the first one included."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from extensions import kernel_inject


def tiny_llama(kv_heads=2, **extra):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=kv_heads, vocab_size=320, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, **extra)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    model = LlamaForCausalLM(config).eval()
    for name, p in model.named_parameters():        # a fresh RMSNorm weight is all ones: a mix-up would not show
        if name.endswith("norm.weight"):
            p.data += 0.2 * torch.randn_like(p)
    return model


def padded_batch(batch=2, length=12, device="cpu"):
    ids = torch.randint(3, 320, (batch, length), device=device)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :3], mask[1, :3] = 2, 0
    return ids, mask


def test_prepare_model_makes_gqa_multi_head_exactly():
    model = tiny_llama(kv_heads=2)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        kernel_inject.prepare_model(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert model.config.num_key_value_heads == 8
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (256, 256)
    assert torch.equal(before, after)


@pytest.mark.parametrize("extra, words", [(dict(attention_bias=True), "biases"), (dict(head_dim=64), "head_dim")])
def test_prepare_model_refuses_what_the_container_would_compute_wrongly(extra, words):
    with pytest.raises(ValueError, match=words):
        kernel_inject.prepare_model(tiny_llama(kv_heads=8, **extra))


def test_adapt_refuses_a_model_without_injected_layers():
    with pytest.raises(ValueError, match="replace_with_kernel_inject"):
        kernel_inject.adapt(tiny_llama())


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_injected_llama_matches_transformers_on_gpu(kv_heads):
    import copy
    import deepspeed
    ref = tiny_llama(kv_heads).to("cuda", torch.float16)
    model = kernel_inject.prepare_model(copy.deepcopy(ref))
    engine = deepspeed.init_inference(model, dtype=torch.float16, replace_with_kernel_inject=True)
    kernel_inject.adapt(engine.module)
    for batch in (1, 2, 4):                  # the workspace is first sized for batch 1, then must grow
        ids, mask = padded_batch(batch, device="cuda")
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits[mask.bool()].float()
            got = engine.module(input_ids=ids, attention_mask=mask).logits[mask.bool()].float()
            assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.gpu
def test_the_tutorials_call_runs_verified_through_the_lesson_on_gpu(tmp_path):
    """extensions/kernel_inject.py: init_inference(replace_with_kernel_inject=True) inside the lesson's init_engine,
    verified by the lesson's own check (logits within fp16's tolerance, greedy tokens), no fallback allowed."""
    import json
    from conftest import ROOT, run_cli
    path = tmp_path / "inject.json"
    r = run_cli("--model", "random:tiny", "--backend", "deepspeed", "--no-fallback", "--max-new-tokens", "16",
                "--iters", "1", "--warmup", "0", "--json", str(path), script=ROOT / "extensions" / "kernel_inject.py",
                timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads(path.read_text())["engine"]
    assert engine["kernel_inject"] and engine["verify"]["passed"] and not engine["fallbacks"], engine


def test_residual_fix_adds_attention_once_where_the_fused_kernel_wrote_it(monkeypatch):
    """kernel_inject's point 5 on the CPU: DeepSpeed's CUDA RMSNorm MLP op writes x + attn over its residual
    argument and DeepSpeed's residual add then adds attn again. Emulated here on the torch fallbacks (the same op,
    plus the in-place write): as DeepSpeed ships it x + 2 attn + mlp, with fix_residual_add x + attn + mlp; the
    fallback itself, which writes nothing, is left alone and is right."""
    import types
    from deepspeed.ops.transformer.inference.config import DeepSpeedInferenceConfig
    from deepspeed.ops.transformer.inference.ds_mlp import DeepSpeedMLP
    from deepspeed.ops.transformer.inference.op_binding.base import BaseOp
    from deepspeed.utils.types import ActivationFuncType, NormType
    monkeypatch.setattr(BaseOp, "inference_module", types.SimpleNamespace())   # every op takes its fallback
    hidden, inter = 64, 128
    torch.manual_seed(0)

    def make_mlp():
        config = DeepSpeedInferenceConfig(hidden_size=hidden, intermediate_size=inter, heads=4, dtype=torch.float32,
                                          norm_type=NormType.RMSNorm, mlp_act_func_type=ActivationFuncType.GATED_SILU,
                                          layer_norm_eps=1e-6)
        mlp = DeepSpeedMLP(config)
        mlp.inter_w.data, mlp.output_w.data, mlp.attn_nw.data = weights
        mlp.inter_b = mlp.output_b = mlp.attn_nb = None          # as DeepSpeed's Llama container leaves them
        return types.SimpleNamespace(mlp=mlp)                    # what fix_residual_add reads of a layer

    def emulate_cuda_kernel(layer):
        fallback = layer.mlp.mlp_gemm_func.mlp_gemm_func
        def rms_mlp_gemm_fp32(input, residual, *args):           # ds_rms_mlp_gemm: residual updated in place
            output, new_residual = fallback(input, residual, *args)
            residual.copy_(new_residual)
            return [output, residual]
        layer.mlp.mlp_gemm_func.mlp_gemm_func = rms_mlp_gemm_fp32

    weights = (torch.randn(hidden, 2 * inter) / 8, torch.randn(inter, hidden) / 11, 1 + 0.2 * torch.randn(hidden))
    x, attn = torch.randn(2, 5, hidden), torch.randn(2, 5, hidden)
    up, gate = (torch.nn.functional.rms_norm(x + attn, (hidden,), weights[2], 1e-6) @ weights[0]).chunk(2, -1)
    want = x + attn + (torch.nn.functional.silu(gate) * up) @ weights[1]

    def run(layer):
        with torch.no_grad():
            return layer.mlp(attn.clone(), x.clone(), None, None)

    plain = make_mlp()
    assert not kernel_inject.fix_residual_add(plain)
    torch.testing.assert_close(run(plain), want, rtol=1e-4, atol=1e-4)
    kernel = make_mlp()
    emulate_cuda_kernel(kernel)
    torch.testing.assert_close(run(kernel), want + attn, rtol=1e-4, atol=1e-4)      # DeepSpeed as shipped
    assert kernel_inject.fix_residual_add(kernel)
    torch.testing.assert_close(run(kernel), want, rtol=1e-4, atol=1e-4)


def test_the_lesson_runs_it_and_falls_back_where_the_kernels_are_missing(tmp_path):
    """On a CPU DeepSpeed has no injected kernels: the lesson's fallback (said, recorded), then the engine verified
    without them; --backend hf is refused in one sentence."""
    import json
    from conftest import ROOT, run_cli
    script = ROOT / "extensions" / "kernel_inject.py"
    path = tmp_path / "inject.json"
    r = run_cli("--model", "random:tiny", "--max-new-tokens", "4", "--iters", "1", "--warmup", "0", "--json",
                str(path), script=script)
    assert r.returncode == 0, r.stderr[-3000:]
    engine = json.loads(path.read_text())["engine"]
    assert engine["verify"]["passed"] and not engine["kernel_inject"]
    assert engine["fallbacks"][0]["what"] == "kernel_inject"
    r = run_cli("--model", "random:tiny", "--backend", "hf", script=script)
    assert r.returncode == 2 and "use --backend deepspeed" in r.stderr and "Traceback" not in r.stderr
