#!/usr/bin/env bash
# Runs ds_bnb_infer.py over a matrix of modes on one GPU and combines every JSON report into $OUT/all.json,
# with the whole console output in $OUT/log.txt. Used for benchmarks/h100-2026-11-25-first-run.{json,log} (the run that found the rotary-buffer cast; see README).
#
# Device command (from the repo root, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/h100_run.sh
# Env: MODES (space-separated names, default all, in priority order), DEADLINE_S (seconds from start after which
# no further mode is started; default 560), MODEL (default random:llama-2-7b), PROBE_SMALL=1 (tiny OPT/GPT-2 probes,
# for a CPU dry run of this harness). Each mode runs under `timeout`; a failure is recorded and the rest go on.
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
python3 - <<'PY'
import json, os, subprocess, sys, time, datetime
T0 = time.time()
OUT = os.environ["OUT"]
R = "/tmp/r"; os.makedirs(R, exist_ok=True)
MODEL = os.environ.get("MODEL", "random:llama-2-7b")
DEADLINE = float(os.environ.get("DEADLINE_S", "560"))
SMALL = os.environ.get("PROBE_SMALL") == "1"
PROMPT = "Explain tensor parallelism now: "
assert len(PROMPT) == 32
COMMON = ["--max-new-tokens", "128", "--warmup", "1", "--iters", "3", "--prompt", PROMPT]
# name: (extra args, timeout s, least time worth starting it with)
MODES = {
    "hf_fp16_b1": (["--backend", "hf"], 150, 45),
    "ds_inject_fp16_b1": (["--backend", "deepspeed"], 240, 150),
    "ds_inject_fp16_b1_nofallback": (["--backend", "deepspeed", "--no-fallback"], 150, 60),
    "ds_fp16_b1": (["--backend", "deepspeed", "--no-kernel-inject"], 150, 50),
    "ds_8bit_b1": (["--backend", "deepspeed", "--quant", "8bit"], 240, 150),
    "ds_4bit_b1": (["--backend", "deepspeed", "--quant", "4bit"], 180, 100),
    "hf_fp16_b16": (["--backend", "hf", "--batch-size", "16"], 150, 45),
    "ds_fp16_b16": (["--backend", "deepspeed", "--no-kernel-inject", "--batch-size", "16"], 150, 50),
    "opt_inject": (None, 240, 120),
    # call 2: the no-injection DeepSpeed modes without the bit-exact verify (it fails on fp16 Llama, see ROPE),
    # and a probe of why: the engine's module.half() also casts the fp32 rotary inv_freq buffers to fp16.
    "ds_fp16_b1_noverify": (["--backend", "deepspeed", "--no-kernel-inject", "--no-verify"], 150, 50),
    "ds_fp16_b16_noverify": (["--backend", "deepspeed", "--no-kernel-inject", "--no-verify", "--batch-size", "16"],
                             150, 50),
    "rope_probe": ("probe", 120, 40),
    "gpt2_inject": (None, 240, 90),
}
names = os.environ.get("MODES", "").split() or list(MODES)

def sh(cmd):
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (p.stdout + p.stderr).strip()

env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "nvidia_smi": sh("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv"),
       "versions": sh("python3 -c \"import importlib.metadata as m, torch, sys; "
                      "print('python', sys.version.split()[0]); "
                      "[print(k, m.version(k)) for k in ['torch','transformers','deepspeed','bitsandbytes','accelerate']]; "
                      "print('cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)\""),
       "nvcc": sh("nvcc --version | tail -n 2"), "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
       "model": MODEL, "prompt": PROMPT, "deadline_s": DEADLINE}
print("== env\n" + "\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
combined = {"env": env, "modes": {}}

def save():
    combined["elapsed_s"] = time.time() - T0
    with open(os.path.join(OUT, "all.json.tmp"), "w") as fh:
        json.dump(combined, fh, ensure_ascii=False, indent=1)
    os.replace(os.path.join(OUT, "all.json.tmp"), os.path.join(OUT, "all.json"))

BUILD = r'''
import sys, torch, ds_bnb_infer
from transformers import AutoModelForCausalLM, OPTConfig, GPT2Config
kind, path, small = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
torch.manual_seed(0)
ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)   # the byte tokenizer's <s>, </s>, <pad>
if kind == "opt":   # facebook/opt-1.3b shape
    cfg = OPTConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, vocab_size=50272,
                    word_embed_proj_dim=2048, max_position_embeddings=2048, **ids)
    if small: cfg.update(dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=128))
else:               # gpt2-medium shape
    cfg = GPT2Config(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024, **ids)
    if small: cfg.update(dict(n_embd=128, n_layer=2, n_head=4))
dev = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(dev):
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16 if dev == "cuda" else torch.float32)
m.save_pretrained(path)
ds_bnb_infer.byte_tokenizer(cfg.vocab_size).save_pretrained(path)
print("built", kind, path, sum(p.numel() for p in m.parameters()), "params", flush=True)
'''

ROPE = r'''
import sys, torch, deepspeed, ds_bnb_infer as d
model_name, prompt = sys.argv[1], sys.argv[2]
dev = "cuda:0" if torch.cuda.is_available() else "cpu"
cfg = d.DeployConfig(model_name=model_name, backend="deepspeed", kernel_inject=False)
tok = d.load_tokenizer(cfg)
model = d.load_model(cfg, "none", dev)
ids = tok([prompt], return_tensors="pt").to(dev)
def logits(m):
    with torch.no_grad():
        return m(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits.float()
def rel(a, b):
    return float((a - b).norm() / b.norm())
ref = logits(model)
print("prompt tokens", ids["input_ids"].shape[1])
print("buffers before:", {n: str(b.dtype) for n, b in model.named_buffers()})
saved = {n: b.clone() for n, b in model.named_buffers()}
pdt = {str(p.dtype) for p in model.parameters()}
eng = deepspeed.init_inference(model, dtype=next(model.parameters()).dtype, replace_with_kernel_inject=False,
                               tensor_parallel={"tp_size": 1})
print("param dtypes before/after:", pdt, {str(p.dtype) for p in eng.module.parameters()})
print("buffers after init_inference:", {n: str(b.dtype) for n, b in eng.module.named_buffers()})
print("prefill logits rel. error, engine vs unwrapped: %.6e" % rel(logits(eng), ref))
for n, b in saved.items():
    mod_name, _, attr = n.rpartition(".")
    setattr(eng.module.get_submodule(mod_name), attr, b)
print("buffers restored:", {n: str(b.dtype) for n, b in eng.module.named_buffers()})
print("prefill logits rel. error after restoring the fp32 buffers: %.6e" % rel(logits(eng), ref))
'''

def tail(text, n):
    return "\n".join(text.splitlines()[-n:])

for name in names:
    extra, tmo, least = MODES[name]
    left = DEADLINE - (time.time() - T0)
    rec = {"timeout_s": None, "rc": None}
    if left < least:
        rec.update(skipped=f"only {left:.0f} s left before the deadline, {least} s wanted")
        print(f"== {name}: SKIPPED ({rec['skipped']})", flush=True)
        combined["modes"][name] = rec; save(); continue
    tmo = int(min(tmo, left))
    jpath = os.path.join(R, name + ".json")
    if extra == "probe":
        argv = [MODEL, PROMPT]
        cmd = ["timeout", "-k", "10", str(tmo), sys.executable, "-c", ROPE] + argv
        print(f"== {name}: rope probe on {MODEL}", flush=True)
        t = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        rec.update(argv=argv, timeout_s=tmo, rc=p.returncode, wall_s=time.time() - t,
                   stdout=tail(p.stdout, 40), stderr_tail=tail(p.stderr, 30))
        print(p.stdout + "\n-- stderr (last 30 lines):\n" + rec["stderr_tail"], flush=True)
        print(f"== {name}: rc={p.returncode} wall {rec['wall_s']:.1f} s", flush=True)
        combined["modes"][name] = rec; save(); continue
    if extra is None:       # kernel-injection probe on another architecture
        kind = name.split("_")[0]
        mdir = f"/tmp/{kind}"
        t = time.time()
        b = subprocess.run(["timeout", "-k", "10", "120", sys.executable, "-c", BUILD, kind, mdir, "1" if SMALL else "0"],
                           capture_output=True, text=True)
        rec["build"] = {"rc": b.returncode, "s": time.time() - t, "out_tail": tail(b.stdout + b.stderr, 15)}
        print(f"== {name}: build rc={b.returncode} in {rec['build']['s']:.1f} s\n{rec['build']['out_tail']}", flush=True)
        if b.returncode != 0:
            combined["modes"][name] = rec; save(); continue
        tmo = int(min(tmo, DEADLINE - (time.time() - T0)))
        argv = ["--model", mdir, "--backend", "deepspeed", "--max-new-tokens", "64", "--warmup", "1", "--iters", "3",
                "--prompt", PROMPT, "--json", jpath]
    else:
        argv = ["--model", MODEL] + extra + COMMON + ["--json", jpath]
    cmd = ["timeout", "-k", "10", str(tmo), sys.executable, "ds_bnb_infer.py"] + argv
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    rec.update(argv=argv, timeout_s=tmo, rc=p.returncode, wall_s=time.time() - t,
               stdout=tail(p.stdout, 80), stderr_tail=tail(p.stderr, 40))
    try:
        with open(jpath) as fh:
            rec["report"] = json.load(fh)
    except (OSError, ValueError) as e:
        rec["report"] = None; rec["report_error"] = repr(e)
    print(p.stdout + "\n-- stderr (last 40 lines):\n" + rec["stderr_tail"], flush=True)
    print(f"== {name}: rc={p.returncode} wall {rec['wall_s']:.1f} s", flush=True)
    combined["modes"][name] = rec; save()

print("\n== summary (rc, wall s, tok/s, TTFT p50 s, decode p50 ms, peak alloc GiB, engine)")
for name, r in combined["modes"].items():
    rep = r.get("report") or {}
    m, e = rep.get("metrics") or {}, rep.get("engine") or {}
    dec = (m.get("decode_s_per_token") or {}).get("p50")
    mem = [x.get("peak_allocated") for x in (rep.get("memory") or {}).get("per_rank", [])]
    print(name, r.get("rc"), round(r.get("wall_s") or 0, 1), m.get("tokens_per_s_cluster"),
          (m.get("ttft_s") or {}).get("p50"), dec and dec * 1e3, mem,
          {k: e.get(k) for k in ("backend", "quant", "kernel_inject")}, len(e.get("fallbacks") or []),
          r.get("skipped", ""))
save()
PY
