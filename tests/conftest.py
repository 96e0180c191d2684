"""Test-suite wiring: ``gpu``-marked tests skip cleanly where CUDA is absent."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def _cuda_reason() -> str | None:
    try:
        import torch
    except Exception as exc:  # torch missing or broken: no GPU tests
        return f"torch not importable: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = _cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in gpu_items:
        item.add_marker(skip)
