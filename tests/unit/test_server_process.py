"""ServerProcess with real child processes: health wait, start failure, group kill."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest

from sglang_semipd.testing.server import (ServerProcess, ServerStartError, free_port,
                                         http_json)

# A server that forks a grandchild (like SGLang's scheduler) and ignores nothing.
SERVER = textwrap.dedent("""
    import http.server, json, os, sys, time
    child = os.fork()
    if child == 0:
        open(sys.argv[2], "w").write(str(os.getpid()))
        while True:
            time.sleep(1)
    time.sleep(float(sys.argv[3]))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"path": self.path}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_waits_for_health_then_kills_the_whole_group(tmp_path):
    port, pidfile = free_port(), tmp_path / "child.pid"
    cmd = [sys.executable, "-c", SERVER, str(port), str(pidfile), "1.5"]
    with ServerProcess(cmd, port, tmp_path / "log.txt", start_timeout=30) as s:
        assert s.startup_s is not None and s.startup_s >= 1.5
        assert http_json(s.url + "/get_model_info") == {"path": "/get_model_info"}
        grandchild = int(pidfile.read_text())
        assert alive(grandchild)
    assert [n.split()[0] for n in s.stop_log_path.read_text().splitlines()] == [
        "SIGTERM", "exited"]  # the server exits on SIGTERM: no SIGKILL needed
    assert s.stop_s is not None and s.stop_s < 20
    deadline = time.time() + 10
    while alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)


def test_exit_during_startup_raises_with_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(3)"]
    with pytest.raises(ServerStartError, match="exited with 3") as exc:
        ServerProcess(cmd, free_port(), tmp_path / "log.txt", start_timeout=30).start()
    assert "boom: bad flag" in str(exc.value)


def test_never_healthy_times_out_and_cleans_up(tmp_path):
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    server = ServerProcess(cmd, free_port(), tmp_path / "log.txt", start_timeout=2)
    with pytest.raises(ServerStartError, match="not healthy"):
        server.start()
    assert server.proc is None


def test_stop_escalates_to_sigkill(tmp_path):
    port = free_port()
    code = ("import signal, time, http.server, sys\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self): self.send_response(200); self.end_headers()\n"
            "    def log_message(self, *a): pass\n"
            f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    server = ServerProcess([sys.executable, "-c", code], port, tmp_path / "l", start_timeout=30)
    server.start()
    assert server.stop(grace_s=0.5) == -signal.SIGKILL
    notes = server.stop_log_path.read_text().splitlines()
    assert [n.split()[0] for n in notes] == ["SIGTERM", "SIGKILL", "exited"]
    assert notes[-1].startswith(f"exited with {-signal.SIGKILL}, ") and server.stop_s >= 0.5


def test_a_port_that_already_serves_is_refused(tmp_path):
    port, pidfile = free_port(), tmp_path / "child.pid"
    cmd = [sys.executable, "-c", SERVER, str(port), str(pidfile), "0"]
    with ServerProcess(cmd, port, tmp_path / "first.txt", start_timeout=30):
        second = ServerProcess([sys.executable, "-c", "print('never started')"], port,
                               tmp_path / "second.txt", start_timeout=30)
        with pytest.raises(ServerStartError, match=f"port {port} already serves"):
            second.start()
        assert second.proc is None and not (tmp_path / "second.txt").exists()


def test_sse_events_decode_data_lines_up_to_done():
    from sglang_semipd.testing.server import sse_events

    stream = [b'data: {"text": "a"}\n', b"\n", b": keep-alive comment\n",
              b'data:{"text": "ab"}\r\n', b"data: [DONE]\n", b'data: {"text": "late"}\n']
    assert list(sse_events(stream)) == [{"text": "a"}, {"text": "ab"}]
    assert list(sse_events([])) == []


def test_greedy_generate_all_sends_every_prompt_at_once_and_keeps_their_order():
    """Against a local HTTP server whose ``/generate`` echoes the request after a delay that
    falls with the prompt's position: answers come back in prompt order, and they were
    served concurrently (the barrier only opens once all four are in flight)."""
    import http.server
    import json
    import threading

    from sglang_semipd.testing.server import greedy_generate_all

    barrier = threading.Barrier(4, timeout=10)

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            barrier.wait()  # raises (-> HTTP error) unless all four requests are open at once
            time.sleep(0.05 * (4 - len(body["input_ids"])))
            out = json.dumps({"output_ids": body["input_ids"],
                              "params": body["sampling_params"]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        prompts = [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]
        outs = greedy_generate_all(url, prompts, 7)
    finally:
        server.shutdown()
    assert [o["output_ids"] for o in outs] == prompts
    assert all(o["params"] == {"temperature": 0, "max_new_tokens": 7, "ignore_eos": True}
               for o in outs)
    assert greedy_generate_all(url, [], 7) == []


def test_random_prompts_are_seeded_sized_and_in_the_token_range():
    """One prompt per length, every id in [100, 40000), the same for the same seed (the GPU
    tests hold semi-PD's output for these prompts to stock SGLang's), another for another."""
    from sglang_semipd.testing.server import random_prompts

    lengths = [20 + 16 * k for k in range(6)]
    prompts = random_prompts(29, lengths)
    assert [len(p) for p in prompts] == lengths
    assert all(100 <= t < 40000 for p in prompts for t in p)
    assert random_prompts(29, iter(lengths)) == prompts
    assert random_prompts(23, lengths) != prompts
    assert random_prompts(29, []) == []
