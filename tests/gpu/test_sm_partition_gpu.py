"""On the GPU host: the SM partition (``--sm-partition green``).

* the driver grants each worker role the SMs the plan says, and the two roles' sets add up to
  the whole GPU;
* a CUDA graph captured on a split's stream stays inside it when replayed (what the decode
  worker does per split), while one captured on an ordinary stream escapes;
* two processes under one MPS daemon on complementary sides overlap instead of sharing SMs;
* the semi-PD server resizes between iterations on request (``/set_internal_state``), both
  workers acknowledge, and outputs of sequential greedy requests stay identical on every split
  (tiny bf16 model; the full concurrency load runs while resizing, nothing is lost).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_semipd.trace import read_trace

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 11
SHARES = (0.25, 0.5, 0.75)


def _gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch


def test_roles_get_complementary_sm_sets_as_planned():
    torch = _gpu()
    from sglang_semipd.partition.streams import build_split_streams

    torch.cuda.set_device(0)
    total = torch.cuda.get_device_properties(0).multi_processor_count
    p = build_split_streams("prefill", "green", SHARES, 0)
    d = build_split_streams("decode", "green", SHARES, 0)
    assert p.splits == d.splits and len(p.splits) == len(SHARES)
    for split, np_, nd in zip(p.splits, p.sm_counts, d.sm_counts):
        assert (np_, nd) == (split.prefill_sms, split.decode_sms)
        assert np_ + nd == total
    x = torch.ones(1024, device="cuda")
    for s in p.streams + d.streams:  # every stream runs work
        with torch.cuda.stream(s):
            x.mul_(1.0)
        s.synchronize()


def test_a_graph_captured_on_its_split_stays_there():
    _gpu()
    from sglang_semipd.testing.sm_probe import graph_confinement

    r = graph_confinement(0, share=0.25)
    print(json.dumps(r))
    assert r["confined"], r
    assert r["escapes_when_captured_elsewhere"], r  # the reason graphs are captured per split


def test_complementary_workers_overlap_under_mps():
    _gpu()
    from sglang_semipd.mps import PrivateMPS
    from sglang_semipd.testing.sm_probe import concurrent_rates, gemm_tflops

    import torch

    full = gemm_tflops(torch.cuda.Stream())
    with PrivateMPS() as mps:
        old = {k: os.environ.get(k) for k in mps.child_env()}
        os.environ.update(mps.child_env())
        try:
            split = concurrent_rates(("prefill", "decode"), share=0.5)
            same = concurrent_rates(("prefill", "prefill"), share=0.5)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    print(json.dumps({"full": full, "complementary": split, "same_side": same}))
    together = sum(r["tflops"] for r in split)
    shared = sum(r["tflops"] for r in same)
    assert together > 0.8 * full, (together, full)
    assert together > 1.25 * shared, (together, shared)


# ---------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(tiny_bf16, gpu_log_dir):
    _gpu()
    from sglang_semipd.testing.server import ServerProcess, python_module_cmd

    tiny, log_dir = tiny_bf16, gpu_log_dir
    trace = os.path.join(log_dir, "trace_resize.jsonl")
    if os.path.exists(trace):
        os.remove(trace)
    cmd = python_module_cmd(
        "sglang_semipd.launch_server", "--model-path", str(tiny), "--port", str(PORT),
        "--attention-backend", "triton", "--sampling-backend", "pytorch",
        "--grammar-backend", "none", "--mem-fraction-static", "0.8",
        "--max-total-tokens", "100000", "--cuda-graph-max-bs-decode", "16",
        "--sm-splits", ",".join(map(str, SHARES)), "--prefill-sm-share", "0.5",
        "--partition-policy", "static")  # only the test resizes
    env = dict(os.environ, SGLANG_SEMIPD_TRACE=trace)
    s = ServerProcess(cmd, PORT, os.path.join(log_dir, "server_semipd_resize.log"), env=env)
    s.start()
    s.trace = trace
    yield s
    s.stop()


def _resize(server, share: float) -> dict:
    from sglang_semipd.testing.server import http_json

    return http_json(server.url + "/set_internal_state",
                     {"server_args": {"semipd_prefill_sm_share": share}})


def _wait_acks(server, seq: int, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        acks = [r for r in read_trace(server.trace)
                if r["kind"] == "resize_ack" and r["seq"] == seq]
        if len(acks) == 2:
            return acks
        time.sleep(0.05)
    raise AssertionError(f"resize {seq} not acknowledged by both workers")


def _gen(server, ids, n=24):
    from sglang_semipd.testing.server import http_json

    return http_json(server.url + "/generate", {
        "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": n,
                                              "ignore_eos": True}})["output_ids"]


def test_resize_on_request_keeps_sequential_outputs_identical(server):
    from sglang_semipd.testing.server import http_json

    prompt = list(range(7, 300))
    base = _gen(server, prompt)
    seq = 0
    for share in (0.25, 0.75, 0.5, 0.25):
        reply = _resize(server, share)
        assert reply == [True], reply
        seq += 1
        acks = _wait_acks(server, seq)
        assert {a["role"] for a in acks} == {"prefill", "decode"}
        assert all(0 <= a["latency_ms"] < 1000 for a in acks)
        assert _gen(server, prompt) == base, f"output changed on split for share {share}"
    info = http_json(server.url + "/server_info")
    states = info.get("internal_states") or [{}]
    assert states[0].get("semipd", {}).get("resizes_applied") == seq, states
    bad = http_json(server.url + "/set_internal_state",
                    {"server_args": {"semipd_prefill_sm_share": 1.5}})
    assert bad == [False]


def test_resizing_under_load_loses_nothing(server):
    prompts = [[(i * 31 + j) % 900 + 5 for j in range(40 + 7 * (i % 30))] for i in range(96)]
    stop = threading.Event()

    def resizer() -> int:
        n, shares = 0, (0.25, 0.75, 0.5)
        while not stop.is_set():
            _resize(server, shares[n % 3])
            n += 1
            time.sleep(0.05)
        return n

    with ThreadPoolExecutor(33) as pool:
        r = pool.submit(resizer)
        outs = list(pool.map(lambda p: _gen(server, p, n=64), prompts))
        stop.set()
        sent = r.result()
    assert sent >= 3 and all(len(o) == 64 for o in outs)
    rows = read_trace(server.trace)
    decode_splits = {r["split"] for r in rows if r["kind"] == "iteration"
                     and r["role"] == "decode"}
    assert len(decode_splits) >= 2, "decode iterations ran on more than one split"
    lat = [r["latency_ms"] for r in rows if r["kind"] == "resize_ack" and
           r.get("latency_ms") is not None]
    print(json.dumps({"resizes": sent, "acks": len(lat),
                      "latency_ms_p50": sorted(lat)[len(lat) // 2] if lat else None}))
