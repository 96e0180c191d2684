"""benchmark/correctness.py: the servers' environment under deterministic inference."""

from __future__ import annotations

import inspect

from benchmark.correctness import CHUNK, SERVE_FLAGS, TRUNCATION_ALIGN_ENV, server_env


def test_sglang_refuses_chunks_shorter_than_the_triton_truncation_alignment():
    """Pins why the harness sets the alignment: SGLang reads it from this variable for
    triton attention, defaults it to 4096, and a chunk shorter than it is never scheduled."""
    from sglang.srt.managers.schedule_policy import PrefillAdder
    from sglang.srt.managers.scheduler import Scheduler

    init = inspect.getsource(Scheduler.init_deterministic_inference_config)
    assert f'"triton": ("{TRUNCATION_ALIGN_ENV}", 4096)' in init
    add = inspect.getsource(PrefillAdder.add_one_req)
    gate = add.index("if trunc_len < truncation_align_size:")
    assert add.index("return AddReqResult.OTHER", gate) - gate < 100  # refused right there
    assert CHUNK < 4096 and SERVE_FLAGS[SERVE_FLAGS.index("--chunked-prefill-size") + 1] == \
        str(CHUNK)


def test_deterministic_runs_align_truncation_to_the_chunk(monkeypatch):
    monkeypatch.delenv(TRUNCATION_ALIGN_ENV, raising=False)
    assert TRUNCATION_ALIGN_ENV not in server_env([])
    assert server_env(["--enable-deterministic-inference"])[TRUNCATION_ALIGN_ENV] == str(CHUNK)
    monkeypatch.setenv(TRUNCATION_ALIGN_ENV, "256")  # the caller's choice wins
    assert server_env(["--enable-deterministic-inference"])[TRUNCATION_ALIGN_ENV] == "256"
