"""On the GPU host: a DeepSeek-V2 model (MLA + MoE; the ``tiny-deepseek-v2`` preset, dummy
weights, which SGLang's dummy loader seeds alike in every process) served the semi-PD way
gives stock SGLang's greedy output and leaks nothing.

DeepSeek's MLA derives ``w_kc`` / ``w_vc`` from ``kv_b_proj`` in ``post_load_weights`` and
keeps them as plain attributes, which SGLang's weight-cache export leaves out and its
``IpcModelLoader`` never recomputes: the memory manager shares them as buffers
(``runner.share_derived_weights``). Without that, the workers had ``w_kc = None``."""

from __future__ import annotations

import os
import random
import re
import time

import pytest

from sglang_semipd.testing.model_maker import make_model
from sglang_semipd.testing.server import (ServerProcess, greedy_generate,
                                          greedy_generate_all, pool_leaks,
                                          python_module_cmd, semipd_pool_report,
                                          stock_greedy_outputs)

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 37
FLAGS = ("--load-format", "dummy", "--attention-backend", "triton",
         "--sampling-backend", "pytorch", "--grammar-backend", "none",
         "--mem-fraction-static", "0.8", "--max-total-tokens", "8192",
         "--cuda-graph-max-bs-decode", "16", "--chunked-prefill-size", "512")
OUT = 24
SHARED_LOG = re.compile(r"(\d+) derived weight tensors shared")  # the scheduler's log


@pytest.fixture(scope="module")
def tiny_mla(tmp_path_factory: pytest.TempPathFactory):
    return make_model(tmp_path_factory.mktemp("models") / "tiny-mla", "tiny-deepseek-v2")


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(100, 40000) for _ in range(200)]
    out = []
    for k in range(n):
        tail = [rng.randrange(100, 40000) for _ in range(rng.randrange(8, 300))]
        out.append(shared + tail if k % 3 == 0 else tail)  # radix hits on every third
    out.append([rng.randrange(100, 40000) for _ in range(1100)])  # three 512-token chunks
    return out


@pytest.fixture(scope="module")
def stock_outputs(tiny_mla, gpu_log_dir) -> list[list[int]]:
    return stock_greedy_outputs(str(tiny_mla), PORT, FLAGS,
                                os.path.join(gpu_log_dir, "server_stock_mla_ref.log"),
                                _prompts(8, 5), OUT)


def test_deepseek_mla_moe_matches_stock_and_leaks_nothing(stock_outputs, tiny_mla,
                                                          gpu_log_dir):
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_mla),
                            "--port", str(PORT), "--partition-policy", "static", *FLAGS)
    with ServerProcess(cmd, PORT, os.path.join(gpu_log_dir, "server_semipd_mla.log")) as s:
        shared = SHARED_LOG.search(s.log_path.read_text(errors="replace"))
        assert shared and int(shared.group(1)) == 6  # w_kc and w_vc of 3 layers
        prompts = _prompts(8, 5)
        outs = [greedy_generate(s.url, p, OUT) for p in prompts]  # each alone, as stock's
        for k, (out, stock) in enumerate(zip(outs, stock_outputs)):
            assert out["meta_info"]["completion_tokens"] == OUT, (k, out["meta_info"])
            assert out["output_ids"] == stock, f"prompt {k}: output differs from stock"
        burst = _prompts(40, 6)  # concurrent: prefill and decode batches side by side
        outs = greedy_generate_all(s.url, burst, OUT)
        assert all(o["meta_info"]["completion_tokens"] == OUT for o in outs)
        time.sleep(0.5)  # the last gated frees go back at the next idle iterations
        report = semipd_pool_report(s.url)
        assert report["ok"] and not report["errors"], report
        assert pool_leaks(report) == {"leaked_slots": 0, "lock_refs_left": 0,
                                      "req_rows_left": 0}
