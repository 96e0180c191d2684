"""On the GPU host: the rest of what a ``sglang.launch_server`` user relies on, against the
semi-PD server (tiny bf16 model, xgrammar, ``--enable-metrics``): structured output (JSON schema
and regex through xgrammar), bad grammar input answered with an error status like stock,
``/metrics`` with SGLang's series and the partition's, an SGLang frontend program with
``fork`` on a shared prefix (``RuntimeEndpoint``), and ``python -m sglang.bench_serving
--backend sglang`` completing every request."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from sglang_semipd.testing.model_maker import write_sharegpt
from sglang_semipd.testing.server import ServerProcess, http_json, python_module_cmd

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 13
FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch",
         "--grammar-backend", "xgrammar", "--mem-fraction-static", "0.8",
         "--max-total-tokens", "100000", "--cuda-graph-max-bs-decode", "16",
         "--enable-metrics", "--constrained-json-disable-any-whitespace")


@pytest.fixture(scope="module")
def server(tiny_bf16, gpu_log_dir, tmp_path_factory: pytest.TempPathFactory):
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_bf16),
                            "--port", str(PORT), *FLAGS)
    with ServerProcess(cmd, PORT, os.path.join(gpu_log_dir, "server_semipd_parity.log")) as s:
        s.sharegpt = write_sharegpt(tmp_path_factory.mktemp("data") / "sharegpt_synth.json",
                                    n=200)
        s.log_dir = gpu_log_dir
        yield s


def _gen(server, text: str, **params):
    return http_json(server.url + "/generate", {
        "text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 64, **params}})


def test_json_schema_output_parses_and_follows_the_schema(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0,
                                                       "maximum": 999}},
              "required": ["name", "age"], "additionalProperties": False}
    out = _gen(server, "Give a person as JSON:", json_schema=json.dumps(schema),
               max_new_tokens=128)  # compact JSON (server flag): at most ~40 tokens
    obj = json.loads(out["text"])
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)


def test_regex_output_matches(server):
    out = _gen(server, "Answer yes or no:", regex="(yes|no)( (yes|no)){2}")
    assert re.fullmatch("(yes|no)( (yes|no)){2}", out["text"]), out["text"]


def test_an_invalid_regex_is_a_client_error_and_the_server_keeps_serving(server):
    body = json.dumps({"text": "x", "sampling_params": {"regex": "(unclosed",
                                                         "max_new_tokens": 4}}).encode()
    req = urllib.request.Request(server.url + "/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert 400 <= err.value.code < 500
    assert _gen(server, "still here", max_new_tokens=4)["meta_info"]["completion_tokens"] == 4


def test_metrics_carry_sglang_and_partition_series(server):
    _gen(server, "warm the counters", max_new_tokens=8)
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    assert "sglang:" in text
    for name in ("sglang_semipd:prefill_sms", "sglang_semipd:decode_sms",
                 "sglang_semipd:iteration_seconds_count"):
        assert name in text, name


def test_frontend_program_with_fork_on_a_shared_prefix(server):
    import sglang as sgl

    @sgl.function
    def two_views(s, topic):
        s += "Here is a long shared introduction about " + topic + ". " * 20
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"View {i}:" + sgl.gen("view", max_tokens=12, temperature=0)
        s += "Both: " + forks[0]["view"] + forks[1]["view"]

    backend = sgl.RuntimeEndpoint(server.url)
    state = two_views.run(topic="GPUs", backend=backend)
    text = state.text()
    assert text.startswith("Here is a long shared introduction about GPUs")
    assert "Both: " in text and len(text) > len("Both: ") + 10


def test_bench_serving_completes_every_request(server):
    out = os.path.join(server.log_dir, "bench_parity.jsonl")
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--port",
           str(PORT), "--dataset-name", "random", "--dataset-path", str(server.sharegpt),
           "--num-prompts", "60", "--random-input-len", "256", "--random-output-len", "32",
           "--random-range-ratio", "1.0", "--request-rate", "20", "--seed", "1",
           "--output-file", out]
    run = subprocess.run(cmd, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    result = json.loads(open(out).read().splitlines()[-1])
    assert result["completed"] == 60
    assert result["total_output_tokens"] == 60 * 32
