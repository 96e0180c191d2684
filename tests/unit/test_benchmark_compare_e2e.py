"""``benchmark.compare``'s device-side loop end to end on the CPU: ``run_system`` starts a
server process, replays a warm-up and each rate with SGLang's real ``bench_serving`` (the
OpenAI chat path, streamed), samples GPU memory, cuts the semi-PD trace into per-run
profiles, and ``report`` turns the directory into the summary and details.

The server is a stand-in speaking the part of SGLang's HTTP API that bench_serving and the
harness use (health, ``/v1/models``, ``/server_info``, streamed chat completions with usage)
and, like the semi-PD scheduler, appending iteration records to ``$SGLANG_SEMIPD_TRACE``:
what is under test is the harness, which the H100 runs later cost device time to debug."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import time

import pytest

from benchmark import compare
from sglang_semipd.testing.model_maker import make_model
from sglang_semipd.testing.server import free_port

pytestmark = pytest.mark.slow

STAND_IN = textwrap.dedent('''
    import http.server, json, os, sys, time
    model, port = sys.argv[1], int(sys.argv[2])
    trace = os.environ.get("SGLANG_SEMIPD_TRACE")
    served, die_after = __import__("itertools").count(), int(os.environ.get("DIE_AFTER", 10**9))
    def record(role, start, end, tokens):
        if trace:
            with open(trace, "a") as f:
                f.write(json.dumps({"kind": "iteration", "role": role, "iteration": 0,
                                    "split": 1, "mode": "x", "batch_size": 1,
                                    "tokens": tokens, "start": start, "end": end}) + "\\n")
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def _json(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            if self.path.startswith("/v1/models"):
                return self._json({"object": "list", "data": [{"id": model, "root": model}]})
            if self.path.startswith("/server_info"):
                return self._json({"internal_states": [{"semipd": {
                    "splits": [[40, 92], [72, 60]], "split": 1}}]})
            return self._json({"ok": True})  # /health and the rest
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.path.startswith("/flush_cache") and trace:
                with open(trace + ".flushes", "a") as f:
                    f.write("flush\\n")
            if not self.path.startswith("/v1/chat/completions"):
                return self._json({"ok": True})
            if next(served) >= die_after:  # as SGLang does when its scheduler raises
                print("torch.OutOfMemoryError: CUDA out of memory (stand-in)", flush=True)
                os._exit(1)
            n = int(req.get("max_completion_tokens") or 8)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            def send(obj):
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\\n\\n")
                self.wfile.flush()
            t0 = time.monotonic()
            time.sleep(0.02)  # "prefill"
            record("prefill", t0, time.monotonic(), 100)
            send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(n):
                t = time.monotonic()
                time.sleep(0.002)
                record("decode", t, time.monotonic(), 1)
                send({"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]})
            send({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": n}})
            self.wfile.write(b"data: [DONE]\\n\\n")
            self.close_connection = True
    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def stand_in(tmp_path):
    """(index, server command, port, out dir) for a stand-in server on a 12-request ShareGPT
    workload of short answers."""
    model = make_model(tmp_path / "model", "llama3.1-8b")  # config + tokenizer only
    index = compare.prepare(tmp_path / "wl", num=12)
    index = {"sharegpt": index["sharegpt"]}
    for meta in index.values():  # short answers keep the stand-in quick
        path = tmp_path / "wl" / meta["file"]
        rows = [dict(json.loads(line), max_tokens=6) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    # the launcher's module name in the command is what marks a semi-PD server (traced)
    cmd = [sys.executable, str(script), str(model), str(port), "sglang_semipd.launch_server"]
    return index, cmd, port, out


def test_run_system_then_report_with_bench_serving(tmp_path):
    index, cmd, port, out = stand_in(tmp_path)
    why = compare.run_system(["semipd_green_slo"], cmd, index, tmp_path / "wl", [4.0, float("inf")],
                             port, out, timeout_s=240, duration_s=1.0, min_requests=4,
                             warmup_requests=3)
    assert why is None
    assert compare.run_files(out, "semipd_green_slo_sharegpt_") == [
        out / "semipd_green_slo_sharegpt_4.jsonl", out / "semipd_green_slo_sharegpt_inf.jsonl"]
    assert (out / "warmup_semipd_green_slo.jsonl").exists()
    # every replay (the warm-up and both rates) starts from an empty prefix cache
    flushes = (out / "trace_semipd_green_slo_sharegpt.jsonl.flushes").read_text().split()
    assert flushes == ["flush"] * 3
    mem = json.loads((out / "memory_semipd_green_slo_sharegpt.json").read_text())
    assert mem["runs"] == ["semipd_green_slo"] and "peak_gpu_mib" in mem
    profiles = json.loads((out / "profile_semipd_green_slo_sharegpt.json").read_text())
    assert set(profiles) == {"semipd_green_slo_sharegpt_4", "semipd_green_slo_sharegpt_inf"}
    # each window holds its run's requests plus bench_serving's own warm-up request; the
    # harness's warm-up replay ran before the first window
    assert profiles["semipd_green_slo_sharegpt_4"]["prefill"]["iterations"] == 4 + 1
    assert profiles["semipd_green_slo_sharegpt_inf"]["prefill"]["iterations"] == 12 + 1
    for prof in profiles.values():
        assert prof["decode"]["busy_share_by_split"] == {"72/60": pytest.approx(1.0)}

    (out / "meta.json").write_text(json.dumps({"gpu": "CPU stand-in", "model": "llama8b"}))
    summary = compare.write_merged_report(out, index)
    w = summary["workloads"]["sharegpt"]
    assert w["goodput_req_s"]["semipd_green_slo"] == 4.0  # the finite rate, met
    assert w["max_throughput_req_s"]["semipd_green_slo"] > 0
    details = json.loads((out / "details.json").read_text())
    curve = details["workloads"]["sharegpt"]["runs"]["semipd_green_slo"]["curve"]
    assert [row["rate"] for row in curve] == [4.0, "inf"]
    assert all(row["ttft"]["p50"] > 0.015 and row["profile"] for row in curve)
    assert curve[0]["completed"] == 4 and curve[1]["completed"] == 12


def test_a_server_that_dies_mid_sweep_is_a_note_and_keeps_its_earlier_runs(tmp_path,
                                                                          monkeypatch):
    """On the H100 stock SGLang died of CUDA OOM in the DeepSeek-V2-Lite shape's rate-inf
    run, and the whole sweep stopped there (the next system never ran). Now the run it died
    in leaves no file, the runs before it stay, and the reason names the run and the server
    log's last exception line."""
    index, cmd, port, out = stand_in(tmp_path)
    # served before it dies: the warm-up (3 + bench_serving's own first request), rate 4
    # (4 + 1); it dies on the first request of the rate-inf run
    monkeypatch.setenv("DIE_AFTER", "9")
    why = compare.run_system(["semipd_green_slo"], cmd, index, tmp_path / "wl", [4.0, float("inf")],
                             port, out, timeout_s=120, duration_s=1.0, min_requests=4,
                             warmup_requests=3)
    assert why == ("died during semipd_green_slo on sharegpt at inf req/s: "
                   "torch.OutOfMemoryError: CUDA out of memory (stand-in)")
    assert compare.run_files(out, "semipd_green_slo_sharegpt_") == [
        out / "semipd_green_slo_sharegpt_4.jsonl"]
    assert set(json.loads((out / "profile_semipd_green_slo_sharegpt.json").read_text())) == {
        "semipd_green_slo_sharegpt_4"}


def test_a_bench_run_past_its_timeout_raises_timeout_error(tmp_path):
    """bench_serving runs in this process; a server that never answers makes it wait for
    readiness, and the run is cut at its timeout with TimeoutError (not a hang, and not a
    KeyboardInterrupt that would look like a Ctrl-C)."""
    from benchmark.common import run_bench_serving

    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with pytest.raises(TimeoutError, match="past 2 s"):
            run_bench_serving(port, ["--dataset-name", "random", "--num-prompts", "1"],
                              tmp_path / "out.jsonl", tmp_path / "bench.log", timeout_s=2)
    assert sys.argv[0] != "sglang.bench_serving"  # restored


def test_a_timeout_interrupt_that_is_swallowed_is_repeated(tmp_path, monkeypatch):
    """A first interrupt lost in a bare ``except`` (as in an import probe under load) does
    not let the run go on: the interrupt comes again until the run ends."""
    from sglang.benchmark import serving

    from benchmark.common import run_bench_serving

    swallowed = []

    def cli_main_that_swallows_one_interrupt() -> None:
        try:
            time.sleep(30)
        except BaseException:  # noqa: B036 - what a careless import probe does
            swallowed.append(time.monotonic())
        time.sleep(30)

    monkeypatch.setattr(serving, "cli_main", cli_main_that_swallows_one_interrupt)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="past 1 s"):
        run_bench_serving(1, [], tmp_path / "out.jsonl", tmp_path / "bench.log", timeout_s=1)
    assert len(swallowed) == 1
    assert time.monotonic() - t0 < 10
    time.sleep(1.5)  # no interrupt is left to fire after the run has ended
