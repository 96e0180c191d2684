"""On the GPU host: the prefill worker's two opt-in speed-ups change no output and leak
nothing: ``--batch-handoff`` (each prefill batch cached in the shared tree and handed to the
decode worker in one ``PrefillHandOff`` call), alone and with ``--prefill-overlap`` (the
prefill worker on SGLang's overlap loop: the next batch launched before the last one's results
and hand-off are handled).

The load is built to hit every branch of the batched hand-off at once: 42 concurrent requests
on six shared 120-token prefixes (prefix hits that arrive locked, and prompts whose prefix a
request earlier in the same batch inserts), six exact twins of other prompts in the same burst
(their slots duplicate a twin's and are freed, their rows re-pointed at the tree's), and a
4,096-slot pool that makes the decode worker retract, and 128-token prefill chunks, so most
batches hand off requests next to one still being chunked (under ``--prefill-overlap`` that
crashed the prefill worker in a ShareGPT benchmark, session 14). Required: the server log
says what ran; every request returns exactly ``max_new_tokens`` tokens equal, token for
token, to stock SGLang's for the same prompt sent alone (deterministic inference; if only
some differ, check first whether prefix-cache hits change numerics there); at idle the shared
pool holds nothing."""

from __future__ import annotations

import os
import random
import time

import pytest

from sglang_semipd.testing.server import (SMALL_POOL_FLAGS, ServerProcess,
                                          greedy_generate_all, pool_leaks, python_module_cmd,
                                          semipd_pool_report, stock_greedy_outputs)
from sglang_semipd.config import DETERMINISTIC_CHUNK_ALIGN
from sglang_semipd.workers import BATCH_HANDOFF_LOG, OVERLAP_LOG

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 31
FLAGS = (*SMALL_POOL_FLAGS, "--chunked-prefill-size", "128")  # stock too: same chunks
OUT = 48
# SMALL_POOL_FLAGS' deterministic triton prefill cuts chunks only at multiples of this size
# (default 4096): below the chunk size, stock SGLang never admitted the first long prompt
ALIGN_ENV = {DETERMINISTIC_CHUNK_ALIGN["triton"][0]: "128"}


@pytest.fixture(scope="module", autouse=True)
def chunk_alignment():
    with pytest.MonkeyPatch.context() as mp:  # every server of this module inherits it
        for key, value in ALIGN_ENV.items():
            mp.setenv(key, value)
        yield


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    bases = [[rng.randrange(100, 40000) for _ in range(120)] for _ in range(6)]
    prompts = [bases[k % 6] + [rng.randrange(100, 40000) for _ in range(20 + k)]
               for k in range(36)]
    return prompts + [list(prompts[k]) for k in range(0, 36, 6)]  # twins in the same burst


@pytest.fixture(scope="module")
def stock_outputs(tiny_bf16, gpu_log_dir) -> list[list[int]]:
    return stock_greedy_outputs(str(tiny_bf16), PORT, FLAGS,
                                os.path.join(gpu_log_dir, "server_stock_batch_ref.log"),
                                _prompts(), OUT)


@pytest.mark.parametrize("flags", [("--batch-handoff",), ("--batch-handoff", "--prefill-overlap")],
                         ids=["batch", "batch+overlap"])
def test_prefill_speedups_match_stock_and_leak_nothing(stock_outputs, tiny_bf16, gpu_log_dir,
                                                       flags):
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_bf16),
                            "--port", str(PORT), *flags, "--partition-policy", "static", *FLAGS)
    log = os.path.join(gpu_log_dir, f"server_semipd_{'_'.join(f[2:] for f in flags)}.log")
    with ServerProcess(cmd, PORT, log) as s:
        prompts = _prompts()
        outs = greedy_generate_all(s.url, prompts, OUT)
        text = s.log_path.read_text(errors="replace")
        assert BATCH_HANDOFF_LOG in text
        assert (OVERLAP_LOG % "prefill" in text) == ("--prefill-overlap" in flags)
        for k, (out, stock) in enumerate(zip(outs, stock_outputs)):
            assert out["meta_info"]["completion_tokens"] == OUT, (k, out["meta_info"])
            assert out["output_ids"] == stock, f"prompt {k}: output differs from stock"
        time.sleep(0.5)  # the last gated frees go back at the next idle iterations
        report = semipd_pool_report(s.url)
        assert report["ok"] and not report["errors"], report
        assert pool_leaks(report) == {"leaked_slots": 0, "lock_refs_left": 0,
                                      "req_rows_left": 0}
