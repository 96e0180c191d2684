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


def test_every_registered_patch_names_a_symbol_of_the_pinned_sglang():
    """Resolved without applying: a renamed or moved SGLang symbol fails here, not at a
    worker's start on the GPU host."""
    import importlib

    for role, role_patches in patches.PATCHES.items():
        for patch in role_patches:
            owner = importlib.import_module(patch.module)
            for part in patch.qualname.split("."):
                assert hasattr(owner, part), f"{role}: {patch.module}.{patch.qualname}"
                owner = getattr(owner, part)
            assert callable(owner), f"{role}: {patch.module}.{patch.qualname}"


@pytest.mark.parametrize("module", ["decode_cuda_graph_runner", "prefill_cuda_graph_runner"])
def test_both_graph_runners_capture_on_the_split_stream_named_by_capture_stream(module):
    """The workers' graph_capture patches (decode graphs; prefill graphs with
    --prefill-graphs) hand SGLang's graph_capture the split's stream, or SGLang's own choice
    (None) outside a ``capture_stream`` block; a stream passed explicitly wins."""
    from sglang_semipd.partition.streams import capture_stream

    [patch] = [p for p in patches.WORKER_PATCHES
               if p.qualname == "graph_capture" and p.module.endswith(module)]
    seen = []
    graph_capture = patch.make(lambda stream=None: seen.append(stream))
    graph_capture()
    with capture_stream("split-3"):
        graph_capture()
        graph_capture(stream="explicit")
    assert seen == [None, "split-3", "explicit"]
