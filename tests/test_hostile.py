"""measure/hostile.py (第十节 服务化) against a real extensions/serve.py on random:tiny (CPU): every case of the
battery's five classes (field extremes, body size, slow and vanished clients, bursts over the bound, wrong methods
and paths) holds; /health answers within 1 s while 20 MB bodies arrive; the rows of clients that went away are free
within 1 s; then SIGTERM stops the server with exit 0 and no traceback. The server is small (2 rows, 2 waiting
places) so that a burst fills it, with 1024 positions so that a vanished client's answer (about 1000 tokens,
seconds on a CPU) outlives the 1 s check: a server that kept the row would fail it. The battery itself fails a
server that does not hold (a plain stdlib server), and its bad flags and a missing server are one sentence."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import ROOT, free_port, run_cli
from test_serve import Server

HOSTILE = ROOT / "measure" / "hostile.py"
SMALL = ["--max-queue", "2", "--read-timeout", "2", "--max-body-bytes", str(2 ** 20)]   # the server's, the battery's


def test_serve_holds_every_hostile_case_and_stops_with_0(tmp_path):
    s = Server("--model", "random:tiny", "--max-num-seqs", "2", "--max-model-len", "1024", *SMALL)
    try:
        r = run_cli("--url", s.url, *SMALL, "--upload-mb", "20", "--json", str(tmp_path / "h.json"),
                    script=HOSTILE, timeout=400)
    finally:
        code = s.stop()                             # SIGTERM, and SIGKILL if it does not end
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "h.json").read_text())
    cases = report["cases"]
    assert report["all_held"] and report["cases_run"] == report["cases_total"] == len(cases) >= 50
    for cls in ("fields", "body", "clients", "burst", "routes"):
        assert sum(c["class"] == cls and c["held"] for c in cases) >= 1, cls
    assert all(c["openai_shape"] for c in cases if isinstance(c["status"], int) and c["status"] >= 400)
    assert report["health_max_s_during_uploads"] < 1.0
    assert report["vanished_rows_freed_after_s"] <= 1.0
    burst = next(c for c in cases if c["class"] == "burst")["facts"]
    assert burst["refused_429"] >= 1 and 1 <= burst["answered_200"] <= burst["bound"] == 4
    assert code == 0 and "Traceback" not in s.stderr and "[serve] stopped" in s.stderr, s.stderr[-3000:]


class Careless(BaseHTTPRequestHandler):
    """A server that answers every request 200 {"status": "ok"}, whatever it was: no field is checked."""
    def answer(self):
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = answer

    def log_message(self, *args):
        pass


def test_the_battery_fails_a_server_that_does_not_hold(tmp_path):
    careless = ThreadingHTTPServer(("127.0.0.1", free_port()), Careless)
    threading.Thread(target=careless.serve_forever, daemon=True).start()
    try:
        r = run_cli("--url", f"http://127.0.0.1:{careless.server_port}", "--classes", "fields", "--timeout", "10",
                    "--json", str(tmp_path / "h.json"), script=HOSTILE, timeout=120)
    finally:
        careless.shutdown()
    report = json.loads((tmp_path / "h.json").read_text())
    not_held = {c["case"] for c in report["cases"] if not c["held"]}
    assert r.returncode == 1 and not report["all_held"] and "Traceback" not in r.stderr
    assert {"seed 2**70, sampled", "prompt token id -1", "JSON nested 100 000 deep"} <= not_held
    assert "a 200 that is no completion" in {c["problem"] for c in report["cases"]}


def test_the_battery_refuses_bad_flags_and_a_missing_server_in_one_sentence(tmp_path):
    for args, words in [(["--timeout", "0"], "--timeout must be above 0"),
                        (["--upload-mb", "1", "--max-body-bytes", str(2 ** 21)], "--upload-mb must be beyond"),
                        (["--url", "nohost"], "has no host"),
                        (["--json", str(tmp_path / "no" / "h.json")], "its folder does not exist"),
                        (["--url", f"http://127.0.0.1:{free_port()}"], "no server answers /health")]:
        r = run_cli(*args, script=HOSTILE, timeout=60)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
