"""Multi-node launch (README 第十节): the deepspeed launcher with a hostfile, each node started with its --node_rank
(--no_ssh: no passwordless ssh needed), exercised on one host: the hostfile names localhost with two slots, two CPU
ranks meet at --master_addr, AutoTP shards the model over them and the lesson verifies it."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_hostfile_launch_on_one_host(tmp_path):
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    r = subprocess.run([launcher, "--hostfile", str(tmp_path / "hostfile"), "--no_ssh", "--node_rank", "0",
                        "--master_addr", "127.0.0.1", "--master_port", str(port), "ds_bnb_infer.py", "--tp-size", "2",
                        "--model", "random:tiny", "--dtype", "fp32", "--max-new-tokens", "8", "--iters", "1",
                        "--warmup", "0", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "WORLD INFO DICT: {'localhost': [0, 1]}" in r.stdout          # the ranks came from the hostfile
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["hardware"]["world_size"] == 2 and report["engine"]["verify"]["passed"]
