"""On the GPU host: what a user of ``sglang.launch_server`` relies on, against the semi-PD
server (``python -m sglang_semipd.launch_server``, tiny bf16 model): streaming, stop tokens,
n > 1, a client that disconnects mid-stream, and a clean shutdown (no process of ours, no
MPS daemon and no GPU memory left). Generation quality against transformers, logprobs
across the hand-off, the OpenAI API and /get_model_info are in test_stock_serving_gpu.py
(launcher "semipd")."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest

from sglang_semipd.testing.server import (ServerProcess, flush_cache, http_json,
                                          python_module_cmd, sse_events)

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 7
FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend",
         "none", "--mem-fraction-static", "0.8", "--max-total-tokens", "100000",
         "--cuda-graph-max-bs-decode", "16", "--disable-prefill-cuda-graph")
PROMPT = [504, 3458, 282, 4649, 314, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def server(tiny_bf16, gpu_log_dir):
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_bf16),
                            "--port", str(PORT), *FLAGS)
    with ServerProcess(cmd, PORT, os.path.join(gpu_log_dir, "server_semipd_api.log")) as s:
        yield s


def _gen(server, ids, **params):
    return http_json(server.url + "/generate", {
        "input_ids": ids, "sampling_params": {"temperature": 0, **params}})


def _stream(server, ids, **params) -> list[dict]:
    body = json.dumps({"input_ids": ids, "stream": True,
                       "sampling_params": {"temperature": 0, **params}}).encode()
    req = urllib.request.Request(server.url + "/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return list(sse_events(resp))


def test_stream_grows_token_by_token_and_ends_like_the_plain_request(server):
    flush_cache(server.url, timeout=60)
    chunks = _stream(server, PROMPT, max_new_tokens=12, ignore_eos=True)
    ids = [c["output_ids"] for c in chunks]
    assert len(ids) >= 2, "the first token and the decode tokens arrive separately"
    assert all(len(a) <= len(b) and b[:len(a)] == a for a, b in zip(ids, ids[1:]))
    assert len(ids[-1]) == 12
    flush_cache(server.url, timeout=60)
    assert _gen(server, PROMPT, max_new_tokens=12, ignore_eos=True)["output_ids"] == ids[-1]


def _first_new_token(full: list[int]) -> int:
    """Index >= 1 of the first token that did not occur before it in ``full`` (0: none)."""
    return next((i for i in range(1, len(full)) if full[i] not in full[:i]), 0)


def test_stop_token_n_and_single_token_requests(server):
    # the tiny random model repeats itself: pick a prompt whose greedy output has a token
    # that first appears after the first one, so stopping on it must happen in decode
    for shift in range(20):
        prompt = [t + 37 * shift for t in PROMPT]
        full = _gen(server, prompt, max_new_tokens=8, ignore_eos=True)["output_ids"]
        stop_at = _first_new_token(full)
        if stop_at:
            break
    assert stop_at, "no prompt gave a stop token past the first one"
    stopped = _gen(server, prompt, max_new_tokens=8, stop_token_ids=[full[stop_at]])
    assert stopped["output_ids"] == full[:stop_at + 1]  # ends at the stop token (decode)
    assert stopped["meta_info"]["finish_reason"]["type"] == "stop"
    one = _gen(server, prompt, max_new_tokens=1)  # ends at prefill: never handed off
    assert one["output_ids"] == full[:1] and one["meta_info"]["finish_reason"]["type"] == "length"
    both = http_json(server.url + "/generate", {
        "input_ids": prompt, "sampling_params": {"temperature": 0, "n": 2,
                                                 "max_new_tokens": 8, "ignore_eos": True}})
    assert [b["output_ids"] for b in both] == [full, full]


def test_client_disconnect_mid_stream_leaves_the_server_serving(server):
    body = json.dumps({"input_ids": PROMPT, "stream": True, "sampling_params": {
        "temperature": 0, "max_new_tokens": 4000, "ignore_eos": True}}).encode()
    req = urllib.request.Request(server.url + "/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=120)
    for _ in range(5):
        resp.readline()
    resp.close()  # disconnect: SGLang aborts the request in both workers
    time.sleep(2)
    assert _gen(server, PROMPT, max_new_tokens=4, ignore_eos=True)["output_ids"]
    with urllib.request.urlopen(server.url + "/health", timeout=60) as h:
        assert h.status == 200


def test_sigterm_stops_everything_and_frees_the_gpu(server):
    code = server.stop(grace_s=60)
    assert code is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                               "--format=csv,noheader"], capture_output=True, text=True)
        # our reaper (its command line names the private MPS root) and any MPS process
        mps = subprocess.run(["pgrep", "-f", "semipd-mps-|nvidia-cuda-mps"],
                             capture_output=True, text=True)
        if not apps.stdout.strip() and not mps.stdout.strip():
            break
        time.sleep(2)
    assert not apps.stdout.strip(), f"GPU processes left: {apps.stdout}"
    assert not mps.stdout.strip(), "private MPS daemon left running"
