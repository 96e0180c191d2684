"""The patch module: pinned-version check and the Patch record's mechanics."""

from __future__ import annotations

import sys
import types

import pytest

from sglang_semipd import SGLANG_PIN, patches


def test_installed_sglang_is_the_pinned_one():
    assert patches.check_sglang_version() == SGLANG_PIN


def test_other_version_is_refused(monkeypatch):
    monkeypatch.setattr(patches.importlib.metadata, "version", lambda name: "0.4.4")
    with pytest.raises(patches.SGLangVersionError, match="0.5.17, found 0.4.4"):
        patches.check_sglang_version()


def test_patch_replaces_nested_symbol_once(monkeypatch):
    mod = types.ModuleType("fake_sglang_mod")

    class Runner:
        def forward(self):
            return "stock"

    mod.Runner = Runner
    monkeypatch.setitem(sys.modules, "fake_sglang_mod", mod)
    calls = []

    def make(original):
        calls.append(original)
        return lambda self: "semipd:" + original(self)

    patch = patches.Patch("fake_sglang_mod", "Runner.forward", make, why="test")
    patch.apply()
    patch.apply()  # idempotent: the second call sees the marker
    assert Runner().forward() == "semipd:stock"
    assert len(calls) == 1


def test_apply_unknown_role_only_checks_version():
    patches.apply("no-such-role")
