"""DeepSeek's MLA keeps ``w_kc`` / ``w_vc`` (derived from ``kv_b_proj`` in
``post_load_weights``) as plain module attributes. The memory manager must share them with
the workers, whose ``IpcModelLoader`` skips ``post_load_weights``: checked here with SGLang's
own export (``WeightCacheDaemon._export_state``) and import (``IpcModelLoader``) pieces on CPU
tensors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from sglang.srt.weight_cache.daemon import WeightCacheDaemon  # noqa: E402
from sglang.srt.weight_cache.ipc_loader import IpcModelLoader  # noqa: E402
from sglang.srt.utils import MultiprocessingSerializer  # noqa: E402

from sglang_semipd.runner import share_derived_weights  # noqa: E402

HEADS, NOPE, V, LORA = 4, 8, 6, 16


class _MLA(nn.Module):
    """The attributes DeepseekV2AttentionMLA has before and after post_load_weights."""

    def __init__(self) -> None:
        super().__init__()
        self.kv_b_proj = nn.Linear(LORA, HEADS * (NOPE + V), bias=False)
        self.w_kc = None
        self.w_vc = None
        self.w_scale = None

    def post_load_weights(self) -> None:  # the same split and layouts as SGLang's (bf16 path)
        w_kc, w_vc = self.kv_b_proj.weight.unflatten(0, (-1, NOPE + V)).split([NOPE, V], dim=1)
        self.w_kc = w_kc.transpose(1, 2).contiguous().transpose(1, 2)
        self.w_vc = w_vc.contiguous().transpose(1, 2)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module(), nn.Module()])
        for layer in self.layers:
            layer.self_attn = _MLA()


def _loaded_model() -> _Model:
    torch.manual_seed(0)
    model = _Model()
    for layer in model.layers:
        layer.self_attn.post_load_weights()
    return model


def _export(model: nn.Module) -> dict:
    daemon = object.__new__(WeightCacheDaemon)  # only its export step, on this model
    daemon.model, daemon.gpu_id, daemon.state_entries = model, 0, {}
    daemon._export_state()
    return daemon.state_entries


def _import(entries: dict) -> _Model:
    """What IpcModelLoader does with the daemon's entries on a freshly built model."""
    model = _Model()  # post_load_weights not run, as in a worker
    for name, entry in entries.items():
        t = MultiprocessingSerializer.deserialize(entry["handle"])
        IpcModelLoader._set_module_tensor(model, name, t, is_param=entry["is_param"])
    return model


def test_without_sharing_the_export_leaves_a_worker_without_w_kc():
    entries = _export(_loaded_model())
    assert not any(n.endswith(("w_kc", "w_vc")) for n in entries)
    assert _import(entries).layers[0].self_attn.w_kc is None


def test_shared_derived_weights_reach_the_worker_with_values_and_layout():
    manager = _loaded_model()
    promoted = share_derived_weights(manager)
    assert promoted == ["layers.0.self_attn.w_kc", "layers.0.self_attn.w_vc",
                        "layers.1.self_attn.w_kc", "layers.1.self_attn.w_vc"]
    attn = manager.layers[0].self_attn
    assert attn.w_scale is None and "w_scale" not in attn._buffers  # None stays a plain attr
    assert "layers.0.self_attn.w_kc" not in manager.state_dict()  # non-persistent
    entries = _export(manager)
    assert entries["layers.1.self_attn.w_vc"]["is_param"] is False
    worker = _import(entries)
    for m_layer, w_layer in zip(manager.layers, worker.layers):
        for attr in ("w_kc", "w_vc"):
            mine, theirs = getattr(m_layer.self_attn, attr), getattr(w_layer.self_attn, attr)
            assert theirs is not None and theirs.stride() == mine.stride()
            assert torch.equal(theirs, mine)
    # the absorb matmul SGLang runs in decode gives the same result on both sides
    q = torch.randn(HEADS, 3, NOPE)
    assert torch.equal(torch.bmm(q, worker.layers[1].self_attn.w_kc),
                       torch.bmm(q, manager.layers[1].self_attn.w_kc))


def test_sharing_twice_and_parameters_are_left_alone():
    model = _loaded_model()
    first = share_derived_weights(model)
    assert share_derived_weights(model) == []  # already buffers
    assert len(first) == 4
    assert {n for n, _ in model.named_parameters()} == {
        "layers.0.self_attn.kv_b_proj.weight", "layers.1.self_attn.kv_b_proj.weight"}
