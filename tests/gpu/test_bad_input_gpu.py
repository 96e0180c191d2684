"""On the GPU host: bad input gets the same answer from the semi-PD server as from stock
``sglang.launch_server`` (same tiny bf16 model, same flags, both up at once), and nothing else
happens -- the semi-PD server serves on, and at idle its shared pool holds nothing.

Each case is one HTTP request: malformed JSON, unknown fields, negative and absurd
``max_new_tokens``, prompts longer than the context, empty prompts, invalid regex and JSON
schema, invalid token ids, a large ``n``, out-of-range sampling parameters, and the same on the
OpenAI routes. Compared: the status code, and the body (error text with request ids masked;
greedy output ids where both servers accept). Prompt token ids outside the vocabulary are the
exception: they crash stock SGLang 0.5.17, semi-PD answers 400 (``OUT_OF_VOCAB``)."""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.request

import pytest

from sglang_semipd.testing.server import (ServerProcess, http_json, pool_leaks,
                                          python_module_cmd, semipd_pool_report)

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 21
FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch",
         "--grammar-backend", "xgrammar", "--mem-fraction-static", "0.8",
         "--max-total-tokens", "60000", "--cuda-graph-max-bs-decode", "16",
         "--context-length", "2048")
CONTEXT = 2048
VOCAB = 49152


@pytest.fixture(scope="module")
def servers(tiny_bf16, gpu_log_dir):
    tiny, log_dir = tiny_bf16, gpu_log_dir
    made = {
        "stock": ServerProcess(python_module_cmd("sglang.launch_server", "--model-path",
                                                 str(tiny), "--port", str(PORT), *FLAGS),
                               PORT, os.path.join(log_dir, "server_badinput_stock.log")),
        "semipd": ServerProcess(python_module_cmd("sglang_semipd.launch_server", "--model-path",
                                                  str(tiny), "--port", str(PORT + 1), *FLAGS),
                                PORT + 1, os.path.join(log_dir, "server_badinput_semipd.log")),
    }
    errors: dict[str, BaseException] = {}

    def start(name: str) -> None:
        try:
            made[name].start()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[name] = exc

    threads = [threading.Thread(target=start, args=(n,)) for n in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise RuntimeError(f"server start failed: {errors}")
        yield made
    finally:
        for s in made.values():
            s.stop()


def _post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _gen(payload: dict) -> bytes:
    params = {"temperature": 0, "max_new_tokens": 4, **payload.pop("sampling_params", {})}
    return json.dumps({"sampling_params": params, **payload}).encode()


CASES: dict[str, tuple[str, bytes]] = {
    "malformed json": ("/generate", b'{"text": "hi", "sampling_params": {'),
    "not an object": ("/generate", b'[1, 2, 3]'),
    "unknown top-level field": ("/generate", _gen({"text": "hi", "no_such_field": 1})),
    "unknown sampling field": ("/generate", _gen({"text": "hi", "sampling_params": {
        "no_such_param": 1}})),
    "negative max_new_tokens": ("/generate", _gen({"text": "hi", "sampling_params": {
        "max_new_tokens": -1}})),
    "absurd max_new_tokens": ("/generate", _gen({"text": "hi", "sampling_params": {
        "max_new_tokens": 10**9}})),
    "prompt longer than the context": ("/generate", _gen({"input_ids": [7] * (CONTEXT + 10)})),
    "prompt filling the context": ("/generate", _gen({"input_ids": [7] * CONTEXT})),
    "empty text": ("/generate", _gen({"text": ""})),
    "empty input_ids": ("/generate", _gen({"input_ids": []})),
    "no prompt": ("/generate", _gen({})),
    "invalid regex": ("/generate", _gen({"text": "hi", "sampling_params": {
        "regex": "(unclosed"}})),
    "invalid json_schema": ("/generate", _gen({"text": "hi", "sampling_params": {
        "json_schema": "{not json"}})),
    "large n": ("/generate", _gen({"text": "hi", "sampling_params": {"n": 256,
                                                                     "max_new_tokens": 2}})),
    "negative temperature": ("/generate", _gen({"text": "hi", "sampling_params": {
        "temperature": -1}})),
    "top_p zero": ("/generate", _gen({"text": "hi", "sampling_params": {"top_p": 0}})),
    "openai: no messages": ("/v1/chat/completions", json.dumps({"model": "default"}).encode()),
    "openai: max_tokens negative": ("/v1/completions", json.dumps({
        "model": "default", "prompt": "hi", "max_tokens": -5}).encode()),
    "openai: prompt past the context": ("/v1/completions", json.dumps({
        "model": "default", "prompt": [7] * (CONTEXT + 10), "max_tokens": 4}).encode()),
    "openai: large n": ("/v1/completions", json.dumps({  # SGLang sets no cap on n
        "model": "default", "prompt": "hi", "max_tokens": 2, "n": 1024, "temperature": 0}).encode()),
}


# Stock SGLang 0.5.17 does not check prompt token ids: one outside the vocabulary trips a
# device-side assert in the embedding lookup and the stock server dies (seen on the H100:
# "indexSelectSmallIndex ... Assertion `srcIndex < srcSelectDimSize` failed"). The semi-PD
# workers refuse them as a bad request (sglang_semipd.validation); not sent to stock.
OUT_OF_VOCAB: dict[str, list[int]] = {"token id past the vocabulary": [5, VOCAB + 100],
                                      "negative token id": [5, -3]}


def _normal(text: str) -> str:
    """Mask what legitimately differs between two servers: request ids, times, ports."""
    text = re.sub(r"[0-9a-f]{32}", "<rid>", text)
    text = re.sub(r'"(created|id|e2e_latency|response_sent_to_client_ts|'
                  r'request_received_ts|queue_time|prefill_launch_delay|'
                  r'prefill_launch_latency|prefill_finished_ts|inference_time|'
                  r'decode_throughput)":\s*("[^"]*"|[0-9.e+-]+|null)', r'"\1":_', text)
    text = re.sub(r"\[\d\d:\d\d:\d\d\]", "[time]", text)  # xgrammar's error messages
    return re.sub(r"127\.0\.0\.1:\d+", "<host>", text)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_answered_like_stock(servers, case):
    path, body = CASES[case]
    got = {name: _post(s.url + path, body) for name, s in servers.items()}
    assert got["semipd"][0] == got["stock"][0], got
    if got["stock"][0] >= 400:
        assert _normal(got["semipd"][1]) == _normal(got["stock"][1]), got
    else:  # accepted by both: the same greedy tokens
        def ids(text: str) -> list:
            obj = json.loads(text)
            if isinstance(obj, dict) and "choices" in obj:
                return [c.get("text") for c in obj["choices"]]
            return [o.get("output_ids") for o in (obj if isinstance(obj, list) else [obj])]
        assert ids(got["semipd"][1]) == ids(got["stock"][1]), got


@pytest.mark.parametrize("case", list(OUT_OF_VOCAB))
def test_out_of_vocabulary_ids_are_a_bad_request(servers, case):
    ids = OUT_OF_VOCAB[case]
    status, body = _post(servers["semipd"].url + "/generate", _gen({"input_ids": ids}))
    assert status == 400, body
    bad = next(t for t in ids if not 0 <= t < VOCAB)
    assert f"Input token id {bad} at position 1 is outside" in body, body


def test_the_semipd_server_serves_on_and_holds_nothing_at_idle(servers):
    s = servers["semipd"]
    out = http_json(s.url + "/generate", {"input_ids": [5, 6, 7], "sampling_params": {
        "temperature": 0, "max_new_tokens": 4, "ignore_eos": True}})
    assert len(out["output_ids"]) == 4
    report = semipd_pool_report(s.url)
    assert report["ok"] and not report["errors"], report
    assert pool_leaks(report) == {"leaked_slots": 0, "lock_refs_left": 0, "req_rows_left": 0}
