"""On the GPU: SGLang's KV pools built once, attached by two worker processes over CUDA IPC.

The test process plays the memory manager (RecordAllocations around SGLang's own pool
constructors, KV sizes of the tiny test model); two spawned workers attach (ReplayAllocations)
and must (a) allocate no copy of the shared storage, (b) see each other's writes through the
same memory, (c) get SGLang pointer tables valid in their own address space.
"""

from __future__ import annotations

import multiprocessing as mp

import msgspec
import pytest

pytestmark = pytest.mark.gpu

TOKENS = 1_000_000
MHA = dict(size=TOKENS, page_size=1, head_num=2, head_dim=64, layer_num=4, device="cuda",
           enable_memory_saver=False)
MLA = dict(size=TOKENS // 4, page_size=1, kv_lora_rank=512, qk_rope_head_dim=64, layer_num=2,
           device="cuda", enable_memory_saver=False)
REQ = dict(size=256, max_context_len=8192, device="cuda", enable_memory_saver=False)


def build_pools(scale: int = 1):
    """SGLang's own pool classes; ``scale`` > 1 builds a small private set (warm-up)."""
    import torch
    from sglang.srt.mem_cache.memory_pool import (MHATokenToKVPool, MLATokenToKVPool,
                                                  ReqToTokenPool)

    return [ReqToTokenPool(**REQ), MHATokenToKVPool(dtype=torch.bfloat16,
                                                    **dict(MHA, size=MHA["size"] // scale)),
            MLATokenToKVPool(dtype=torch.bfloat16, **dict(MLA, size=MLA["size"] // scale))]


def _worker(blob: bytes, role: str, conn) -> None:
    try:
        _attach_and_check(blob, role, conn)
    except BaseException as exc:  # report instead of leaving the parent waiting
        conn.send({"error": repr(exc)})
        raise


def _attach_and_check(blob: bytes, role: str, conn) -> None:
    import torch

    from sglang_semipd.memory.pool_attach import ReplayAllocations, shared_bytes
    from sglang_semipd.memory.tensor_ipc import OpenedTensors
    from sglang_semipd.protocol import PoolManifest

    torch.cuda.init()
    build_pools(scale=1000)  # context + kernels loaded first: not counted as attach cost
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    alloc0 = torch.cuda.memory_allocated()
    opened = OpenedTensors()
    replay = ReplayAllocations(msgspec.msgpack.decode(blob, type=PoolManifest), opened)
    with replay:
        req, mha, mla = build_pools()
    replay.finish()
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    report = {"attach_free_drop": free0 - free1,
              "attach_allocated": torch.cuda.memory_allocated() - alloc0,
              "shared_bytes": shared_bytes([req, mha, mla]),
              "ptrs_ok": [int(p) for p in mha.k_data_ptrs.cpu()] ==
                         [b.data_ptr() for b in mha.k_buffer]}
    conn.send(report)  # attached; the parent starts the other worker only now
    slots = torch.arange(1000, 1064, device="cuda")
    conn.recv()
    if role == "writer":  # a "prefill" write: K of layer 2 and one MLA layer, one req row
        mha.k_buffer[2][slots] = torch.full((64, 2, 64), 0.25, dtype=torch.bfloat16,
                                            device="cuda")
        mla.kv_buffer[1][slots] = 4.0
        req.req_to_token[7, :64] = slots.to(torch.int32)
        torch.cuda.synchronize()  # make the writes visible before announcing them
        conn.send({"written": True})
        conn.recv()
    else:  # the writer has written
        conn.send({"read_k": float(mha.k_buffer[2][slots].float().mean()),
                   "read_mla": float(mla.kv_buffer[1][slots].float().mean()),
                   "read_row": req.req_to_token[7, :64].tolist() == slots.tolist()})
    del req, mha, mla
    opened.close()


def _recv(conn, timeout: float = 180.0) -> dict:
    assert conn.poll(timeout), "worker did not answer"
    msg = conn.recv()
    assert "error" not in msg, msg["error"]
    return msg


def test_two_processes_attach_to_one_pool():
    import torch

    from sglang_semipd.memory.pool_attach import RecordAllocations, shared_bytes

    rec = RecordAllocations("cuda")
    with rec:
        pools = build_pools()
    manifest = rec.manifest(pools)
    blob = msgspec.msgpack.encode(manifest)
    total = shared_bytes(pools)
    assert total > 2e9
    ctx = mp.get_context("spawn")
    pw, cw = ctx.Pipe()
    pr, cr = ctx.Pipe()
    writer = ctx.Process(target=_worker, args=(blob, "writer", cw))
    reader = ctx.Process(target=_worker, args=(blob, "reader", cr))
    try:  # attach one at a time, so device-wide free memory measures one attach
        writer.start()
        w = _recv(pw)
        reader.start()
        r = _recv(pr)
        pw.send("write")
        assert _recv(pw)["written"]
        pr.send("read")
        seen = _recv(pr)
        pw.send("done")
    finally:
        for p in (writer, reader):
            p.join(60)
            if p.is_alive():
                p.kill()
    assert writer.exitcode == 0 and reader.exitcode == 0
    print(f"shared {total / 2**20:.0f} MiB; writer attach: free drop "
          f"{w['attach_free_drop'] / 2**20:.1f} MiB, allocated {w['attach_allocated']} B; "
          f"reader: free drop {r['attach_free_drop'] / 2**20:.1f} MiB")
    for rep in (w, r):
        assert rep["shared_bytes"] == total
        assert rep["ptrs_ok"]
        assert rep["attach_allocated"] < 0.01 * total  # only local scratch, no KV copy
        assert rep["attach_free_drop"] < 0.05 * total + (64 << 20)
    assert seen == {"read_k": 0.25, "read_mla": 4.0, "read_row": True}
    # the manager sees the same bytes
    assert float(pools[1].k_buffer[2][1000:1064].float().mean()) == 0.25
    del pools
    torch.cuda.empty_cache()
