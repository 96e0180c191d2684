"""Fixtures shared by the GPU tests (skipped with every ``gpu`` test where CUDA is absent, by
the top-level conftest): the seeded tiny bf16 model, made once per session, and the directory
server logs go to (``SEMIPD_TEST_LOG_DIR``, which the GPU scripts pack into ``logs.tgz``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sglang_semipd.testing.model_maker import make_model


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "tiny-bf16", "tiny", "bfloat16",
                      seed=0)


@pytest.fixture(scope="session")
def gpu_log_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.environ.get("SEMIPD_TEST_LOG_DIR") or str(tmp_path_factory.mktemp("logs"))
