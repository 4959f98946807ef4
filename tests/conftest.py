"""Shared fixtures. Tests run the real torch / transformers / deepspeed / bitsandbytes on the CPU with the
`random:tiny` preset; tests marked `gpu` need a CUDA GPU and run on the device machine (see README 第十一节)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ds_bnb_infer.py"
sys.path.insert(0, str(ROOT))
# No test may reach a model hub: the default model must fail fast and cleanly, not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; CI deselects these with -m 'not gpu'"))


def run_cli(*args, env=None, prelude="", timeout=300):
    """Run the script in a fresh interpreter; `prelude` is Python run first (e.g. to hide a package)."""
    code = f"{prelude}\nimport sys, runpy\nsys.argv = ['ds_bnb_infer.py'] + {list(args)!r}\n" \
           f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=ROOT)


# Hide an installed package as if it were not installed: import fails, and so does asking for its version.
HIDE = ("import sys, importlib.metadata as md; sys.modules[{name!r}] = None  # import {name} raises ImportError\n"
        "_version = md.version\n"
        "def _hidden(dist):\n"
        "    if dist == {name!r}:\n"
        "        raise md.PackageNotFoundError(dist)\n"
        "    return _version(dist)\n"
        "md.version = _hidden")


@pytest.fixture(scope="session")
def tiny():
    """Arguments shared by most runs: the tiny preset, short generations."""
    return ["--model", "random:tiny", "--max-new-tokens", "8", "--iters", "1", "--warmup", "0"]
