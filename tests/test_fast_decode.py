"""extensions/fast_decode.py (第十节 KV Cache): its decode loop gives generate()'s tokens, chooses how to run each kind
of model, and goes through the lesson's verification and report."""
import json

import pytest
import torch

import ds_bnb_infer as m
from conftest import ROOT, launch, run_cli
from extensions.fast_decode import FastDecodeConfig, FastGreedy, StaticGenerate, decode_step, forward_last, \
    fuse_projections, inductor_tuning, one_counter_cache

FAST = ROOT / "extensions" / "fast_decode.py"


def test_decode_loop_equals_generate_with_padding_and_eos():
    """The loop (static cache, left padding, a row ending at EOS) gives generate()'s texts and token counts."""
    config = m.DeployConfig(model_name="random:tiny", backend="hf", max_new_tokens=40, device="cpu")
    model, tok, _ = m.init_engine(config)
    fast, prompts = FastGreedy(model, FastDecodeConfig()), ["a", "a much longer prompt than the first", "DeepSpeed is"]
    first = tok.encode(m.generate(model, tok, prompts[:1], config)["texts"][0])
    model.generation_config.eos_token_id = first[5]          # so that the first row ends early (EOS)
    plain, ours = m.generate(model, tok, prompts, config), m.generate(fast, tok, prompts, config)
    assert min(plain["new_tokens"]) < 40 == max(plain["new_tokens"])     # one row stops at EOS, one runs on
    assert ours["texts"] == plain["texts"] and ours["new_tokens"] == plain["new_tokens"]
    assert fast.mode == "eager"                               # on a CPU the loop runs without CUDA graphs
    # Every row ends early: the loop notices at its next check (every 16 steps) and stops there.
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        firsts = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)[:, -1]
    model.generation_config.eos_token_id = sorted(set(firsts.tolist()))
    plain, ours = m.generate(model, tok, prompts, config), m.generate(fast, tok, prompts, config)
    assert plain["new_tokens"] == [1, 1, 1] and ours["steps"] == 16
    assert ours["texts"] == plain["texts"] and ours["new_tokens"] == plain["new_tokens"]


def test_the_loops_cache_layers_share_one_counter_and_hold_what_transformers_cache_holds():
    """one_counter_cache(): every layer writes at one shared counter, which only the last layer advances (one
    increment a step, not one a layer); after a prefill and 3 steps its keys, values, count and logits are those of
    transformers' StaticCache, and the loop uses it."""
    from transformers import StaticCache
    config = m.DeployConfig(model_name="random:tiny", backend="hf", max_new_tokens=4, device="cpu")
    model, tok, _ = m.init_engine(config)
    ids = tok(["DeepSpeed is"], return_tensors="pt").input_ids
    t = ids.shape[1]
    caches = {"ours": one_counter_cache()(model.config, max_cache_len=t + 4),
              "transformers": StaticCache(model.config, max_cache_len=t + 4)}
    logits = {}
    with torch.no_grad():
        for name, cache in caches.items():
            out = [forward_last(model, ids, torch.arange(t)[None], torch.arange(t), None, cache)]
            for i in range(3):
                token = out[-1].argmax(-1, keepdim=True)
                out.append(forward_last(model, token, torch.tensor([[t + i]]), torch.tensor([t + i]), None, cache))
            logits[name] = torch.stack(out)
    ours, theirs = caches["ours"].layers, caches["transformers"].layers
    assert len({id(layer.cumulative_length) for layer in ours}) == 1 and len(ours) == len(theirs) == 2
    assert [layer.advances for layer in ours] == [False, True]
    assert int(ours[0].cumulative_length) == int(theirs[0].cumulative_length) == t + 3
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(ours, theirs))
    assert torch.equal(logits["ours"], logits["transformers"])
    fast = FastGreedy(model, FastDecodeConfig())
    m.generate(fast, tok, ["DeepSpeed is"], config)
    assert all(type(c) is one_counter_cache() for c in fast.caches.values()) and fast.caches
    # compiled, a step mutates one counter (transformers' cache: one a layer); the graph's mutated inputs, counted
    # by the 0-d outputs of aot_autograd's functional graph
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    counters = {}
    for name, cache in caches.items():
        graphs = []

        def backend(gm, inputs):
            return aot_module_simplified(gm, inputs, fw_compiler=lambda g, _: graphs.append(g) or make_boxed_func(g))
        torch._dynamo.reset()
        step = torch.compile(lambda *a: forward_last(model, *a), backend=backend, fullgraph=True, dynamic=False)
        with torch.no_grad():
            step(ids[:, :1], torch.tensor([[t + 3]]), torch.tensor([t + 3]), None, cache)
        outputs = next(n for n in graphs[-1].graph.nodes if n.op == "output").args[0]
        counters[name] = sum(tuple(x.meta["val"].shape) == () for x in outputs if "val" in getattr(x, "meta", {}))
    torch._dynamo.reset()
    assert counters == {"ours": 1, "transformers": 2}, counters


def test_fused_projections_give_the_models_logits_and_leave_bitsandbytes_layers():
    """q/k/v and gate/up become one matmul each (2 layers x 2 groups), logits equal within fp32 rounding, weights
    counted once; bitsandbytes' own layers are not fused (its 4-bit layers swapped to Int4WeightOnly are:
    test_kernel_4bit.py); the loop fuses nothing under --no-fuse."""
    config = m.DeployConfig(model_name="random:tiny", dtype="fp32", device="cpu")
    model = m.load_model(config, "none", "cpu")
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        before, n_params = model(input_ids=ids).logits, sum(p.numel() for p in model.parameters())
        assert fuse_projections(model) == 4
        after = model(input_ids=ids).logits
    assert type(model.model.layers[0].self_attn.k_proj).__name__ == "Part"
    assert model.model.layers[0].self_attn.q_proj.fused.weight.shape == (3 * 256, 256)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert torch.allclose(after, before, rtol=0, atol=1e-5) and m.rel_error(after, before) < 1e-6
    assert fuse_projections(m.load_model(config, "4bit", "cpu")) == 0
    assert FastGreedy(m.load_model(config, "none", "cpu"), FastDecodeConfig()).fused == 4
    unfused = FastGreedy(m.load_model(config, "none", "cpu"), FastDecodeConfig(fuse=False))
    assert unfused.fused == 0 and type(unfused.module.model.layers[0].self_attn.k_proj).__name__ == "Linear"


@pytest.mark.parametrize("quant, threshold, on_gpu", [("none", 6.0, "compiled"), ("4bit", 6.0, "cuda-graph"),
                                                     ("8bit", 6.0, "eager"), ("8bit", 0.0, "cuda-graph")])
def test_decode_step_is_compiled_captured_or_eager_by_kind_of_model(quant, threshold, on_gpu):
    """What the loop does with each kind of model on a GPU (the choice itself touches no GPU), and on a CPU:
    LLM.int8 with outlier columns is not captured, plain int8 (--int8-threshold 0) is."""
    config = m.DeployConfig(model_name="random:tiny", quant=quant, int8_threshold=threshold)
    model = m.load_model(config, quant, "cpu")
    assert decode_step(model, torch.device("cuda"), FastDecodeConfig())[1] == on_gpu
    assert decode_step(model, torch.device("cpu"), FastDecodeConfig())[1] == "eager"
    assert decode_step(model, torch.device("cpu"), FastDecodeConfig(step="cuda-graph"))[1] == "cuda-graph"   # --step


def test_cli_runs_the_lesson_with_the_loop_and_verifies_it(tmp_path):
    r = run_cli("--model", "random:tiny", "--backend", "hf", "--max-new-tokens", "12", "--iters", "1",
                "--json", str(tmp_path / "r.json"), script=FAST)
    assert r.returncode == 0, r.stderr
    engine = json.loads((tmp_path / "r.json").read_text())["engine"]
    assert engine["decode"] == "eager" and engine["verify"]["passed"]
    assert engine["verify"]["tolerance"] == m.KERNEL_TOL["fp32"]    # a compiled step may round differently
    assert "[warmup] 2 untimed run(s)" in r.stderr and "decode=eager" in r.stdout


@pytest.mark.parametrize("args, words", [(["--do-sample"], "loop is greedy; drop --do-sample"),
                                         (["--loop", "transformers", "--no-fuse"], "drop --loop transformers"),
                                         (["--step", "graph"], "invalid choice"),
                                         (["--quant", "3bit"], "invalid choice"),
                                         (["--prompt", ""], "--prompt is empty")])
def test_cli_bad_input_is_one_sentence(args, words):
    r = run_cli("--model", "random:tiny", *args, script=FAST)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
    assert "usage: extensions/fast_decode.py" in r.stderr or r.stderr.startswith("error:")


def test_validate_takes_tensor_parallel_and_refuses_sampling_and_loop_flags_of_the_other_loop():
    FastGreedy.validate(FastDecodeConfig(tp_size=2))                                 # AutoTP shards: the same loop
    with pytest.raises(m.UsageError, match="loop is greedy"):
        FastGreedy.validate(FastDecodeConfig(do_sample=True))
    StaticGenerate.validate(FastDecodeConfig(loop="transformers", do_sample=True))   # transformers' loop samples
    with pytest.raises(m.UsageError, match="--step sets how this file's loop runs"):
        StaticGenerate.validate(FastDecodeConfig(loop="transformers", step="eager"))
    with pytest.raises(m.UsageError, match="drop --tp-size"):
        StaticGenerate.validate(FastDecodeConfig(loop="transformers", tp_size=2))


def test_the_fast_decode_flags_are_fields_with_the_help_and_defaults_of_the_dataclass():
    """No environment switch: the loop's choices are FastDecodeConfig fields, parsed like the lesson's."""
    c = m.config_from_args(["--step", "cuda-graph", "--no-fuse", "--no-tune", "--pdl", "off", "--all-reduce",
                            "one-shot"], config_class=FastDecodeConfig)
    assert (c.step, c.fuse, c.tune, c.pdl, c.all_reduce, c.loop) == ("cuda-graph", False, False, "off", "one-shot",
                                                                     "ours")
    assert m.config_from_args([], config_class=FastDecodeConfig) == FastDecodeConfig()
    assert "--all-reduce {push,one-shot,nccl}" in m.build_parser("x", FastDecodeConfig).format_help()


def test_the_lesson_closes_the_loop_before_the_ranks_leave():
    """run() calls the decoder's close() at the end (before destroy_process_group under tp): it frees the CUDA graphs,
    which on GPUs hold NCCL's communicator; NCCL's teardown would wait for them forever."""
    class Closing(FastGreedy):
        seen = []

        def close(self):
            Closing.seen.append(len(self.caches))          # the loop has run: its static caches exist
            super().close()
            Closing.seen.append(len(self.caches))
    config = FastDecodeConfig(model_name="random:tiny", backend="hf", max_new_tokens=4, iters=1, warmup=0, device="cpu")
    assert m.run(config, decoder=Closing) == 0
    assert Closing.seen[0] > 0 and Closing.seen[1:] == [0]


def _rows_ended_on_rank(rank, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loop = object.__new__(FastGreedy)                    # the stop check alone, without a model
    loop.ranks = 2
    answers = [loop.all_ended(torch.tensor([True, rank == 0])),      # rank 0: every row ended; rank 1: one runs on
               loop.all_ended(torch.tensor([True, True]))]
    (out_dir / f"{rank}.json").write_text(json.dumps(answers))
    torch.distributed.destroy_process_group()


def test_every_rank_stops_at_the_same_step(tmp_path):
    """Under tp each step all-reduces: a rank that stopped alone would leave the others waiting forever. The loop's
    "has every row ended?" is a MIN over the ranks, so all ranks give the same answer even if their tokens differed."""
    torch.multiprocessing.spawn(_rows_ended_on_rank, args=(str(tmp_path / "init"), tmp_path), nprocs=2)
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)] == [[False, True], [False, True]]


def test_tensor_parallel_2_cpu_ranks_verified_and_equal_to_tp_1(tmp_path):
    """deepspeed --num_gpus=2 extensions/fast_decode.py --tp-size 2: AutoTP shards the model over two CPU ranks (gloo),
    each runs the loop over its shard, the lesson verifies it against rank 0's reference, the texts (left-padded
    batch of two) are tp 1's, and every rank exits."""
    common = ["--model", "random:tiny", "--backend", "deepspeed", "--dtype", "fp32", "--max-new-tokens", "24",
              "--iters", "1", "--prompt", "tensor parallel", "--prompt", "two ranks, one loop", "--batch-size", "2"]
    r1 = run_cli(*common, "--json", str(tmp_path / "tp1.json"), script=FAST)
    assert r1.returncode == 0, r1.stderr
    r2 = launch(*common, "--json", str(tmp_path / "tp2.json"), script=FAST, timeout=400)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    tp1, tp2 = (json.loads((tmp_path / f).read_text()) for f in ("tp1.json", "tp2.json"))
    assert tp2["hardware"]["world_size"] == 2 and tp2["config"]["tp_size"] == 2 and "AutoTP" in r2.stderr
    assert tp2["engine"]["decode"] == "eager" and tp2["engine"]["verify"]["passed"]
    assert tp2["engine"]["verify"]["reference"] == "the unwrapped model in fp32 on the CPU (rank 0)"
    assert [o["text"] for o in tp2["outputs"]] == [o["text"] for o in tp1["outputs"]]
    assert (r2.stdout + r2.stderr).count("exits successfully") == 2    # the launcher saw both ranks leave


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (device kind nvidia-h100-x2)")
@pytest.mark.parametrize("mode", ["compiled", "cuda-graph"])
def test_gpu_tensor_parallel_2_gpus_compiled_or_captured_is_verified_and_exits(mode, tmp_path):
    """On two GPUs the step holds NCCL all-reduces (traced into the compiled step, or captured in the CUDA graph);
    verified against rank 0's fp32 reference, and both ranks leave: the graphs are freed before the process group is
    destroyed (pytorch/pytorch#115388: a hang until killed otherwise, so the time limit fails the test)."""
    r = launch("--model", "random:tiny", "--device", "cuda", "--dtype", "fp32", "--max-new-tokens", "24", "--iters", "1",
               "--step", mode,
               "--json", str(tmp_path / "tp2.json"), script=FAST, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    engine = json.loads((tmp_path / "tp2.json").read_text())["engine"]
    assert engine["decode"] == mode and engine["verify"]["passed"]
    assert (r.stdout + r.stderr).count("exits successfully") == 2


def test_profile_decode_lists_one_steps_kernels_verified(tmp_path):
    """benchmarks/profile_decode.py: the engine verified as every run, then one step's kernels (on a CPU: aten ops) and
    their groups, per step, in its JSON (the device's own times are in benchmarks/, not asserted here)."""
    out = tmp_path / "profile.json"
    r = run_cli("--steps", "3", "--json", str(out), "--inductor", "aggressive_fusion=True", "--", "--model",
                "random:tiny", "--device", "cpu", script=ROOT / "benchmarks" / "profile_decode.py")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["verify"]["passed"] and report["steps"] == 3 and report["card"] == "cpu"
    assert report["inductor"] == {"aggressive_fusion": True} and report["launches_per_step"] > 0, report
    assert report["top"] and all(row["us_per_step"] > 0 for row in report["top"])
    assert all(row["kernel"].startswith("aten::") for row in report["top"])    # a CPU's step: aten ops
    assert abs(sum(report["groups_us_per_step"].values()) - report["kernels_us_per_step"]) < 1e-6 * max(
        1.0, report["kernels_us_per_step"])
    for bad, said in ((["--steps", "0"], "at least 1"), (["--json", "/proc/p.json"], "cannot write --json"),
                      (["--inductor", "triton.nope=1"], "has no option 'triton.nope'"),
                      (["--inductor", "aggressive_fusion=yes"], "not a Python literal")):
        r = run_cli(*bad, "--", "--model", "random:tiny", "--device", "cpu",
                    script=ROOT / "benchmarks" / "profile_decode.py")
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_profile_decode_sets_inductors_options_before_the_step_compiles():
    """profile_decode.py --inductor NAME=VALUE: torch._inductor.config's option set (dotted names into its sections)."""
    import importlib.util
    import torch._inductor.config as inductor
    spec = importlib.util.spec_from_file_location("profile_decode", ROOT / "benchmarks" / "profile_decode.py")
    profile_decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_decode)
    with inductor.patch({"aggressive_fusion": False, "triton.max_tiles": 2}):
        assert profile_decode.set_inductor_options(["aggressive_fusion=True", "triton.max_tiles=3"]) == {
            "aggressive_fusion": True, "triton.max_tiles": 3}
        assert inductor.aggressive_fusion is True and inductor.triton.max_tiles == 3


@pytest.mark.parametrize("pdl, tp_size, tune, launches", [("on", 1, False, True), ("off", 1, True, False),
                                                          ("auto", 1, True, True), ("auto", 2, True, False)])
def test_a_compiled_step_sets_inductors_launch_options_from_the_flags(pdl, tp_size, tune, launches):
    """--pdl / --no-tune are torch.compile's own options, set when the step is compiled (on a CPU inductor generates
    no launches for them: the device's effect is measured in benchmarks/); --pdl auto (the default) is on at tp 1 and
    off under tensor parallel; with --loop transformers, or a step that is not compiled, --pdl on is refused."""
    import torch._inductor.config as inductor
    model = m.load_model(FastDecodeConfig(model_name="random:tiny", device="cpu"), "none", "cpu")
    before = inductor.triton.enable_pdl, inductor.coordinate_descent_tuning
    try:
        inductor_tuning(tune, pdl, tp_size)
        assert (inductor.triton.enable_pdl, inductor.coordinate_descent_tuning) == (launches, tune)
        if tp_size == 1:
            config = FastDecodeConfig(model_name="random:tiny", device="cpu", step="compiled", pdl=pdl, tune=tune)
            inductor.triton.enable_pdl = not launches
            step, mode, _ = decode_step(model, torch.device("cpu"), config)
            assert mode == "compiled"
            assert (inductor.triton.enable_pdl, inductor.coordinate_descent_tuning) == (launches, tune)
    finally:
        inductor.triton.enable_pdl, inductor.coordinate_descent_tuning = before
    with pytest.raises(m.UsageError, match="--pdl sets how this file's loop runs"):
        StaticGenerate.validate(FastDecodeConfig(loop="transformers", pdl="on"))
    with pytest.raises(m.UsageError, match="--step cuda-graph compiles nothing"):
        FastGreedy.validate(FastDecodeConfig(step="cuda-graph", pdl="on"))
    FastGreedy.validate(FastDecodeConfig(step="cuda-graph"))          # auto: nothing to refuse
