"""Shared fixtures. Tests run the real torch / transformers / deepspeed / bitsandbytes on the CPU with the
`random:tiny` preset; tests marked `gpu` need a CUDA GPU and run on the device machine (README 第九节)."""
import contextlib
import os
import shutil
import signal
import socket
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


def run_cli(*args, env=None, prelude="", timeout=300, script=SCRIPT):
    """Run a script in a fresh interpreter; `prelude` is Python run first (e.g. to hide a package)."""
    code = f"{prelude}\nimport sys, runpy\nsys.argv = [{str(script)!r}] + {list(args)!r}\n" \
           f"runpy.run_path({str(script)!r}, run_name='__main__')"
    return run_group([sys.executable, "-c", code], timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    """A port no one listens on now: every launch and server of a test has its own (two test runs may share a host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(*args, ranks=2, script=SCRIPT):
    """The deepspeed launcher's command line for a script (the lesson unless told) on `ranks` ranks (CPU ranks here,
    GPUs on a GPU host), on a free port (so its ranks' shared-memory file names are its own too)."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()),
            str(Path(script).relative_to(ROOT)), "--tp-size", str(ranks), *args]


def run_group(cmd, timeout, **kw):
    """subprocess.run in a process group of its own: on timeout the whole group is killed (the launcher and every
    rank it started; killing the launcher alone would leave its ranks holding the cores and the port)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)          # ranks left behind by a launcher that exited
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(*args, ranks=2, timeout=600, script=SCRIPT):
    return run_group(launch_cmd(*args, ranks=ranks, script=script), timeout)


# Hide an installed package as if it were not installed: import fails, and so does asking for its version.
HIDE = ("import sys, importlib.metadata as md; sys.modules[{name!r}] = None  # import {name} raises ImportError\n"
        "_version, _dists = md.version, md.distributions\n"
        "def _hidden(dist):\n"
        "    if dist == {name!r}:\n"
        "        raise md.PackageNotFoundError(dist)\n"
        "    return _version(dist)\n"
        "md.version = _hidden\n"
        "md.distributions = lambda **kw: [d for d in _dists(**kw) if d.metadata['Name'].lower() != {name!r}]")


@pytest.fixture(scope="session")
def tiny():
    """Arguments shared by most runs: the tiny preset, short generations."""
    return ["--model", "random:tiny", "--max-new-tokens", "8", "--iters", "1", "--warmup", "0"]
