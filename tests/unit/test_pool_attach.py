"""Pool sharing on the CPU with SGLang's real pool classes and real processes.

The memory manager side builds ``MHATokenToKVPool`` / ``MLATokenToKVPool`` / ``ReqToTokenPool``
under RecordAllocations; spawned worker processes rebuild them under ReplayAllocations and
must see the manager's bytes, write into them, and allocate no copy of the shared storage.
"""

from __future__ import annotations

import multiprocessing as mp

import msgspec
import pytest
import torch

from sglang_semipd.memory.pool_attach import (AttachMismatch, RecordAllocations,
                                              ReplayAllocations, shared_bytes)
from sglang_semipd.memory.tensor_ipc import OpenedTensors, export_tensor, open_tensor
from sglang_semipd.protocol import PoolManifest, TensorHandle

MHA = dict(size=64, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=8, layer_num=3,
           device="cpu", enable_memory_saver=False)
MLA = dict(size=32, page_size=1, dtype=torch.bfloat16, kv_lora_rank=16, qk_rope_head_dim=8,
           layer_num=2, device="cpu", enable_memory_saver=False)
REQ = dict(size=4, max_context_len=16, device="cpu", enable_memory_saver=False)


def build_pools(mha=MHA, mla=MLA, req=REQ):
    from sglang.srt.mem_cache.memory_pool import (MHATokenToKVPool, MLATokenToKVPool,
                                                  ReqToTokenPool)

    return [ReqToTokenPool(**req), MHATokenToKVPool(**mha), MLATokenToKVPool(**mla)]


def manager_side():
    rec = RecordAllocations("cpu")
    with rec:
        pools = build_pools()
    return pools, rec.manifest(pools)


def worker(manifest_bytes: bytes, value: float, conn) -> None:
    """Attach, report what is seen, then write ``value`` into layer 1 of the K buffer."""
    manifest = msgspec.msgpack.decode(manifest_bytes, type=PoolManifest)
    opened = OpenedTensors()
    replay = ReplayAllocations(manifest, opened)
    with replay:
        req, mha, mla = build_pools()
    replay.finish()
    seen = (float(mha.k_buffer[0][5, 1, 3]), int(req.req_to_token[2, 7]),
            float(mla.kv_buffer[1][9, 0, 4]))
    ptrs_ok = [int(p) for p in mha.k_data_ptrs] == [b.data_ptr() for b in mha.k_buffer]
    mha.k_buffer[1][10].fill_(value)
    conn.send((seen, ptrs_ok, len(opened), opened.nbytes))
    conn.recv()  # stay alive until the manager has read the write
    opened.close()


def test_two_workers_share_the_managers_pools():
    pools, manifest = manager_side()
    req, mha, mla = pools
    mha.k_buffer[0][5, 1, 3] = 1.5
    req.req_to_token[2, 7] = 4242
    mla.kv_buffer[1][9, 0, 4] = -2.0
    ctx = mp.get_context("spawn")
    blob = msgspec.msgpack.encode(manifest)
    results, procs, conns = [], [], []
    for value in (7.0, 9.0):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(blob, value, child))
        p.start()
        procs.append(p)
        conns.append(parent)
        results.append(parent.recv())
        # the second worker must see the first worker's write (same memory)
        assert float(mha.k_buffer[1][10, 0, 0]) == value
    for conn, p in zip(conns, procs):
        conn.send("done")
        p.join(30)
        assert p.exitcode == 0
    for seen, ptrs_ok, n_opened, nbytes in results:
        assert seen == (1.5, 4242, -2.0)
        assert ptrs_ok  # SGLang's pointer table was rebuilt from the opened views
        assert n_opened == 1 + 2 * MHA["layer_num"] + MLA["layer_num"]
        assert nbytes == shared_bytes(pools)


def test_manifest_shares_only_storage_attributes():
    pools, manifest = manager_side()
    shared = manifest.shared
    assert len(shared) == 1 + 2 * MHA["layer_num"] + MLA["layer_num"]
    local = [r for r in manifest.records if r.handle is None]
    assert local  # free lists, scratch: never shared
    k0 = pools[1].k_buffer[0]
    assert any(r.handle.shape == tuple(k0.shape) and r.dtype == "bfloat16" for r in shared)


def test_replay_detects_different_settings():
    _pools, manifest = manager_side()
    opened = OpenedTensors()
    with pytest.raises(AttachMismatch, match="pool settings differ"):
        with ReplayAllocations(manifest, opened):
            build_pools(mha=dict(MHA, size=65))


def test_replay_skips_initialisation_of_shared_memory():
    pools, manifest = manager_side()
    pools[1].v_buffer[2].fill_(3.0)
    opened = OpenedTensors()
    replay = ReplayAllocations(manifest, opened)
    with replay:
        _req, mha, _mla = build_pools()  # SGLang zero-initialises: must not reach shared data
    replay.finish()
    assert float(mha.v_buffer[2].float().mean()) == 3.0


def test_handle_round_trip_preserves_view(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    base.share_memory_()
    view = base[2:, 1:5]
    h = msgspec.msgpack.decode(msgspec.msgpack.encode(export_tensor(view)), type=TensorHandle)
    assert (h.shape, h.stride, h.storage_offset) == ((8, 4), (6, 1), 13)
    again = open_tensor(h)
    assert torch.equal(again, view)
    with pytest.raises(ValueError, match="share_memory_"):
        export_tensor(torch.zeros(3))
