"""The storage half end to end on the CPU: one memory-manager process owns the pools and the
radix tree; a "prefill" and a "decode" process attach over ZeroMQ + shared memory.

The prefill process allocates slots, writes K/V for a prompt into the shared pool, records the
slots in its req->token row and inserts the prompt into the shared radix tree; the decode
process finds the prompt in the tree and reads exactly those K/V bytes and that row. Afterwards
the manager's invariant holds with nothing held by anyone.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid

import pytest

from sglang_semipd.memory.client import KVStateClient
from sglang_semipd.memory.rpc import KVStateServerConfig, run_kv_state_server
from sglang_semipd.testing.pools import CPU_POOL_TOKENS, CPU_REQ_ROWS
from sglang_semipd.testing.procs import recv_reply, run_reporting, wait_for_kv_server

PROMPT = list(range(1000, 1040))


def _attach(client: KVStateClient):
    from sglang_semipd.memory.pool_attach import ReplayAllocations
    from sglang_semipd.memory.tensor_ipc import OpenedTensors
    from sglang_semipd.testing.pools import build_cpu_pools

    opened = OpenedTensors()
    replay = ReplayAllocations(client.pool_manifest(), opened)
    with replay:
        req, kv = build_cpu_pools()
    replay.finish()
    return req, kv, opened


def _prefill(endpoint: str, conn) -> None:
    run_reporting(_prefill_body, endpoint, conn)


def _decode(endpoint: str, row: int, conn) -> None:
    run_reporting(_decode_body, endpoint, row, conn)


def _prefill_body(endpoint: str, conn) -> None:
    import torch

    with KVStateClient(endpoint, "prefill-0", role="prefill") as client:
        req, kv, opened = _attach(client)
        row = client.alloc_req_rows(1)[0]
        slots = torch.tensor(client.alloc(len(PROMPT)), dtype=torch.int64)
        for layer in range(kv.layer_num):  # the "forward pass": K/V of each token
            k = torch.tensor(PROMPT, dtype=torch.float32)[:, None, None] + layer
            kv.k_buffer[layer][slots] = k.expand(-1, kv.head_num, kv.head_dim)
            kv.v_buffer[layer][slots] = -k.expand(-1, kv.head_num, kv.head_dim)
        req.req_to_token[row, :len(PROMPT)] = slots.to(torch.int32)
        inserted = client.insert(PROMPT, slots.tolist())
        conn.send({"row": row, "slots": slots.tolist(), "dup": inserted.prefix_len,
                   "opened": len(opened)})
        conn.recv()
        client.free_req_rows([row])
        client.goodbye()
        opened.close()


def _decode_body(endpoint: str, row: int, conn) -> None:
    import torch

    with KVStateClient(endpoint, "decode-0", role="decode") as client:
        req, kv, opened = _attach(client)
        match = client.match_prefix(PROMPT, lock=True)
        idx = torch.tensor(match.indices, dtype=torch.int64)
        k_ok = all(torch.equal(kv.k_buffer[layer][idx][:, 0, 0],
                               torch.tensor(PROMPT, dtype=torch.float32) + layer)
                   for layer in range(kv.layer_num))
        v_ok = torch.equal(kv.v_buffer[1][idx][:, 1, 3], -torch.tensor(PROMPT) - 1.0)
        conn.send({"prefix_len": match.prefix_len, "indices": match.indices.tolist(),
                   "k_ok": k_ok, "v_ok": v_ok,
                   "row": req.req_to_token[row, :len(PROMPT)].tolist()})
        client.dec_lock_ref(match.node)
        client.goodbye()
        opened.close()


@pytest.fixture()
def manager(tmp_path):
    endpoint = f"ipc://{tmp_path}/kv-{uuid.uuid4().hex[:8]}.sock"
    cfg = KVStateServerConfig(endpoint=endpoint, capacity=CPU_POOL_TOKENS,
                              req_rows=CPU_REQ_ROWS,
                              pool_builder="sglang_semipd.testing.pools:build_cpu_pools",
                              pool_device="cpu")
    proc = mp.get_context("spawn").Process(target=run_kv_state_server, args=(cfg,))
    proc.start()
    _wait_ready(endpoint, proc)
    yield endpoint
    with KVStateClient(endpoint, "supervisor", register=False, timeout_s=30) as c:
        c.shutdown()
    proc.join(30)
    assert proc.exitcode == 0


def _wait_ready(endpoint: str, proc) -> None:
    with KVStateClient(endpoint, "probe", register=False, timeout_s=30) as c:
        wait_for_kv_server(c, proc, timeout_s=180)
        c.goodbye()


def test_prefill_writes_decode_reads_through_shared_pool_and_tree(manager):
    ctx = mp.get_context("spawn")
    pp, pc = ctx.Pipe()
    prefill = ctx.Process(target=_prefill, args=(manager, pc))
    prefill.start()
    wrote = recv_reply(pp)
    dp, dc = ctx.Pipe()
    decode = ctx.Process(target=_decode, args=(manager, wrote["row"], dc))
    decode.start()
    seen = recv_reply(dp)
    pp.send("done")
    for p in (prefill, decode):
        p.join(60)
        assert p.exitcode == 0
    assert wrote["dup"] == 0 and wrote["opened"] == 1 + 2 * 2  # req_to_token + K,V x 2 layers
    assert seen["prefix_len"] == len(PROMPT)
    assert seen["indices"] == wrote["slots"]  # the decode side found the prefill's slots
    assert seen["k_ok"] and seen["v_ok"]  # ... and the bytes the prefill wrote there
    assert seen["row"] == wrote["slots"]  # ... and its req->token row
    with KVStateClient(manager, "supervisor", register=False, timeout_s=30) as c:
        report = c.check_invariant()
    assert report.ok, report.errors
    assert report.protected == 0 and report.in_use == 0
    assert report.evictable == len(PROMPT)  # cached in the tree, free to evict
    assert report.free + report.evictable == CPU_POOL_TOKENS


def test_server_without_pools_refuses_manifest(tmp_path):
    from sglang_semipd.protocol import ErrorCode, KVStateError

    endpoint = f"ipc://{tmp_path}/kv-nopool.sock"
    proc = mp.get_context("spawn").Process(
        target=run_kv_state_server, args=(KVStateServerConfig(endpoint=endpoint, capacity=64),))
    proc.start()
    try:
        _wait_ready(endpoint, proc)
        with KVStateClient(endpoint, "w", timeout_s=30) as c:
            with pytest.raises(KVStateError) as exc:
                c.pool_manifest()
            assert exc.value.code == ErrorCode.NO_MANIFEST
            c.shutdown()
    finally:
        proc.join(30)
    assert proc.exitcode == 0
