"""On the GPU host: the README's start without ``--model-path`` serves the embedded default
model (SmolLM2-135M-Instruct, converted from its GGUF to bf16 on first use) on semi-PD, and
its chat completions are coherent: greedy answers, through the OpenAI API, streamed and not,
to two questions the model answers right on CPU with transformers ("Pacific", "100").

The questions are ones where the model's greedy choice leads its runner-up by at least one
logit over the first eight tokens (bf16, CPU). "What is the capital of France?" is not: its
first token leads "L" by 0.1 logit in float32, and on the H100 a full prefill picked "L" and
went on "L'Etoile, la Marseillaise, ..." while the same prompt over the radix-cached prefix
answered "The capital of France is Paris."

The GPU host is offline: the test skips unless the GGUF (or the converted model) is already in
``$SGLANG_SEMIPD_CACHE``; ``scripts/gpu_default_model_pieces.sh`` carries it there in pieces.
The answers go to ``default_model_chat.json`` in the log directory for the record."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from sglang_semipd.default_model import (GGUF_FILENAME, default_cache_dir, default_model_dir,
                                         is_complete)
from sglang_semipd.testing.server import (ServerProcess, http_json, python_module_cmd,
                                          sse_events)

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 30
FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch",
         "--mem-fraction-static", "0.8")
QUESTIONS = {"What is the largest ocean on Earth?": "Pacific",
             "What is the boiling point of water in Celsius?": "100"}


def _default_model_here() -> bool:
    return ((default_cache_dir() / "gguf" / GGUF_FILENAME).is_file()
            or is_complete(default_model_dir()))


@pytest.fixture(scope="module")
def server(gpu_log_dir):
    if not _default_model_here():
        pytest.skip(f"no {GGUF_FILENAME} in {default_cache_dir()} (offline host: "
                    "scripts/gpu_default_model_pieces.sh carries it)")
    cmd = python_module_cmd("sglang_semipd.launch_server", "--port", str(PORT), *FLAGS)
    # the first start converts the GGUF (~30 s) before SGLang starts
    with ServerProcess(cmd, PORT, os.path.join(gpu_log_dir, "server_semipd_default.log"),
                       start_timeout=400) as s:
        yield s


def _chat(server, question: str, stream: bool) -> str:
    body = {"model": "default", "messages": [{"role": "user", "content": question}],
            "temperature": 0, "max_tokens": 40, "stream": stream}
    if not stream:
        return http_json(server.url + "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    req = urllib.request.Request(server.url + "/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(resp))


def test_default_model_answers_coherently(server, gpu_log_dir):
    info = http_json(server.url + "/get_model_info")
    answers = {q: {"plain": _chat(server, q, False), "stream": _chat(server, q, True)}
               for q in QUESTIONS}
    with open(os.path.join(gpu_log_dir, "default_model_chat.json"), "w") as f:
        json.dump({"model_path": info["model_path"], "answers": answers}, f, indent=1)
    assert info["model_path"] == str(default_model_dir())
    for q, want in QUESTIONS.items():
        assert want in answers[q]["plain"] and want in answers[q]["stream"], (q, answers[q])
