"""Round trips and rejection paths of the memory-RPC wire protocol (no torch)."""

from __future__ import annotations

import typing
from array import array

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_semipd import protocol as P

_REPORT = dict(ok=True, full=True, capacity=64, free=40, evictable=8, protected=4,
               client_held={1: 8, 2: 4}, leased=4, in_use=16, lock_refs=2,
               req_rows_capacity=8, req_rows_free=6, req_rows_held={1: 2}, errors=["x"])

# One sample per message type, with the buffers it travels with.
SAMPLES: list[tuple[object, tuple]] = [
    (P.Hello(name="prefill-0", role="prefill"), ()),
    (P.Alloc(sizes=[3, 0, 17]), ()),
    (P.Free(), (array("q", [1, 2]), array("q"), array("q", [9]))),
    (P.Lease(n=32), ()),
    (P.ReturnLease(lease_id=7), (array("q", [5, 6]),)),
    (P.AllocReqRows(n=2), ()),
    (P.FreeReqRows(rows=[1, 4]), ()),
    (P.MatchPrefix(extra_key="lora-1", lock=True), (array("i", [10, 11, 12]),)),
    (P.Insert(extra_key=None, lock=False, priority=3),
     (array("i", [10, 11]), array("q", [40, 41]))),
    (P.IncLockRef(node=12), ()),
    (P.DecLockRef(node=12), ()),
    (P.Evict(num_tokens=100), ()),
    (P.Stats(), ()),
    (P.CheckInvariant(), ()),
    (P.Reset(), ()),
    (P.ReleaseClient(client_id=3), ()),
    (P.Goodbye(), ()),
    (P.Shutdown(), ()),
    (P.GetPoolManifest(), ()),
    (P.Transfer(to_role="decode", rows=[3], locks=[12]), (array("q", [40, 41]),)),
    (P.Transfer(to_client=2), (array("q"),)),
    (P.PrefillHandOff(to_role="decode", entries=[
        P.HandOffEntry(row=3, protected=4, unlock=9, extra_key="k", priority=1),
        P.HandOffEntry(row=5, hand_lock=7)]),
     (array("i", [10, 11]), array("q", [40, 41]), array("q", [42]), array("i"), array("q"),
      array("q", [43]))),
    (P.HelloReply(client_id=1, page_size=16, capacity=4096, req_rows=256), ()),
    (P.AllocReply(sizes=[2, 0]), (array("q", [1, 2]), array("q"))),
    (P.FreeReply(freed=12), ()),
    (P.LeaseReply(lease_id=1, n=3), (array("q", [7, 8, 9]),)),
    (P.ReturnLeaseReply(returned=2), ()),
    (P.ReqRowsReply(rows=[1, 2, 3]), ()),
    (P.FreeReqRowsReply(freed=3), ()),
    (P.MatchPrefixReply(prefix_len=2, node=5, locked=True), (array("q", [3, 4]),)),
    (P.InsertReply(prefix_len=0, node=6, locked=False), ()),
    (P.LockRefReply(node=6, delta=-4, lock_count=1), ()),
    (P.EvictReply(num_evicted=16), ()),
    (P.InvariantReport(**_REPORT), ()),
    (P.ReleaseReply(client_id=2, freed_tokens=10, dropped_locks=1, freed_rows=1,
                    closed_leases=1), ()),
    (P.OkReply(), ()),
    (P.TransferReply(tokens=2, rows=1, locks=1), ()),
    (P.PrefillHandOffReply(prefix_lens=[6, 0], nodes=[12, 0], unlock_deltas=[-4, 0]),
     (array("q", [40, 50]), array("q"))),
    (P.PoolManifestReply(manifest=P.PoolManifest(device="cuda", sizes=P.PoolSizes(
        max_total_num_tokens=4096, max_running_requests=64, mem_fraction_static=0.8),
        weight_socket="/tmp/w.sock", weights_bytes=10, records=(
        P.AllocationRecord(index=0, shape=(5, 16), dtype="int32", handle=P.TensorHandle(
            shape=(5, 16), stride=(16, 1), storage_offset=0, dtype="int32", device="cuda",
            device_index=0, storage_handle=b"\x01" * 64, storage_size_bytes=320,
            ref_counter_handle=b"ref", event_handle=b"\x00" * 64, event_sync_required=True)),
        P.AllocationRecord(index=1, shape=(7,), dtype="int64")))), ()),
    (P.ErrorReply(code=P.ErrorCode.DOUBLE_FREE, message="slot 3"), ()),
]


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m, _ in SAMPLES} == set(P.message_types())


@pytest.mark.parametrize("msg,bufs", SAMPLES, ids=[type(m).__name__ for m, _ in SAMPLES])
def test_round_trip(msg: object, bufs: tuple) -> None:
    frames = P.encode(msg, *bufs, seq=42)
    assert all(isinstance(f, bytes) for f in frames)
    assert len(frames) == 1 + len(bufs)
    decoded = P.decode_frames(frames)
    assert decoded.seq == 42
    assert decoded.msg == msg and type(decoded.msg) is type(msg)
    assert [(b.typecode, list(b)) for b in decoded.buffers] == \
        [(b.typecode, list(b)) for b in bufs]
    assert P.decode(frames)[0] == msg


def test_messages_are_frozen_and_tagged() -> None:
    msg = P.Alloc(sizes=[1])
    with pytest.raises(AttributeError):
        msg.sizes = [2]  # type: ignore[misc]
    header = msgspec.msgpack.decode(P.encode(msg)[0])
    assert header["v"] == P.PROTOCOL_VERSION and header["msg"]["type"] == "Alloc"


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=40), max_size=5))
def test_free_buffers_round_trip(arrays: list[list[int]]) -> None:
    msg, bufs = P.decode(P.encode(P.Free(), *[array("q", a) for a in arrays]))
    assert msg == P.Free() and [list(b) for b in bufs] == arrays


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(0, 2 ** 40), max_size=200))
def test_token_buffer_is_compact_and_exact(tokens: list[int]) -> None:
    buf = P.token_buffer(tokens)
    assert buf.typecode == ("i" if all(t < 2 ** 31 for t in tokens) else "q")
    _, (back,) = P.decode(P.encode(P.MatchPrefix(), buf))
    assert list(back) == tokens


def test_as_int_array_accepts_views_and_rejects_bytes() -> None:
    base = array("q", [1, 2, 3])
    assert P.as_int_array(memoryview(base)) == base
    assert P.as_int_array(range(3)) == array("q", [0, 1, 2])
    assert P.as_int_array(array("l", [4])) == array("q", [4])
    with pytest.raises(TypeError):
        P.as_int_array(b"\x00" * 8)


def _header(**over: object) -> bytes:
    base = {"v": P.PROTOCOL_VERSION, "seq": 1, "bufs": [], "msg": {"type": "Stats"}}
    base.update(over)
    return msgspec.msgpack.encode(base)


@pytest.mark.parametrize("frames,code", [
    ([], P.ErrorCode.TRUNCATED),
    ([b"garbage\xff\x00"], P.ErrorCode.BAD_MESSAGE),
    ([b""], P.ErrorCode.BAD_MESSAGE),
    ([_header(v=P.PROTOCOL_VERSION + 1)], P.ErrorCode.VERSION),
    ([_header(v=99, extra_field=1)], P.ErrorCode.VERSION),
    ([_header(msg={"type": "NoSuchThing"})], P.ErrorCode.UNKNOWN_TYPE),
    ([_header(msg={"sizes": [1]})], P.ErrorCode.BAD_MESSAGE),
    ([_header(msg={"type": "Alloc", "sizes": [-1]})], P.ErrorCode.BAD_MESSAGE),
    ([_header(msg={"type": "Alloc", "sizes": "x"})], P.ErrorCode.BAD_MESSAGE),
    ([_header(msg={"type": "Evict", "num_tokens": 1, "bogus": 2})], P.ErrorCode.BAD_MESSAGE),
    ([_header(bufs=[["i8", 2]], msg={"type": "MatchPrefix"})], P.ErrorCode.TRUNCATED),
    ([_header(bufs=[["i8", 2]], msg={"type": "MatchPrefix"}), b"\x00" * 15],
     P.ErrorCode.TRUNCATED),
    ([_header(bufs=[["i4", 1]], msg={"type": "MatchPrefix"}), b"\x00" * 8],
     P.ErrorCode.TRUNCATED),
    ([_header(bufs=[["f8", 1]], msg={"type": "MatchPrefix"}), b"\x00" * 8],
     P.ErrorCode.BAD_MESSAGE),
    ([_header(), b"\x00" * 8], P.ErrorCode.BAD_FRAMES),
    ([_header(msg={"type": "MatchPrefix"})], P.ErrorCode.BAD_FRAMES),
    ([_header(bufs=[["i8", 1]], msg={"type": "Stats"}), b"\x00" * 8], P.ErrorCode.BAD_FRAMES),
])
def test_decode_rejects(frames: list[bytes], code: str) -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.decode_frames(frames)
    assert info.value.code == code


def test_truncating_any_frame_is_detected() -> None:
    frames = P.encode(P.Insert(), array("i", [1, 2, 3]), array("q", [4, 5, 6]))
    for i in range(1, len(frames)):
        cut = list(frames)
        cut[i] = cut[i][:-1]
        with pytest.raises(P.ProtocolError) as info:
            P.decode_frames(cut)
        assert info.value.code == P.ErrorCode.TRUNCATED
    with pytest.raises(P.ProtocolError):
        P.decode_frames(frames[:-1])


def test_encode_refuses_wrong_buffer_count_and_foreign_objects() -> None:
    with pytest.raises(ValueError):
        P.encode(P.Insert(), array("q", [1]))
    with pytest.raises(ValueError):
        P.encode(P.AllocReply(sizes=[1, 2]), array("q", [1]))
    with pytest.raises(TypeError):
        P.encode({"type": "Stats"})


def test_little_endian_int64_wire_layout() -> None:
    frames = P.encode(P.ReturnLease(lease_id=1), array("q", [1, -2]))
    assert frames[1] == (1).to_bytes(8, "little") + (-2).to_bytes(8, "little", signed=True)


# ------------------------------------------------------------------ fuzzing the decoder
@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_decode_of_random_frames_only_raises_protocol_error(frames: list[bytes]) -> None:
    try:
        P.decode(frames)
    except P.ProtocolError as exc:
        assert exc.code in {P.ErrorCode.BAD_MESSAGE, P.ErrorCode.VERSION,
                            P.ErrorCode.TRUNCATED, P.ErrorCode.BAD_FRAMES,
                            P.ErrorCode.UNKNOWN_TYPE}


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(range(len(SAMPLES))), st.data())
def test_mutated_valid_messages_decode_or_fail_cleanly(i: int, data: st.DataObject) -> None:
    msg, bufs = SAMPLES[i]
    frames = P.encode(msg, *bufs, seq=5)
    head = bytearray(frames[0])
    pos = data.draw(st.integers(0, len(head) - 1))
    head[pos] = data.draw(st.integers(0, 255))
    try:
        out, _ = P.decode([bytes(head), *frames[1:]])
    except P.ProtocolError:
        return
    assert type(out) in P.message_types()  # a flip that still parses is a valid message


# ------------------------------------------------------------------ scheduler <-> workers
CONTROL_SAMPLES = (
    P.Resize(3, 1, 12.5), P.ResizeAck("decode", 3, 1, 40, 12.6), P.ResizeRequest(0.3),
    P.IterationStat(role="prefill", iteration=7, split=2, mode="extend", batch_size=3,
                    tokens=4096, start=1.0, end=1.2, queued=5),
    P.ReleaseIdle(2), P.Released(2), P.Retire(1), P.ResizeRequest(policy="static"),
)


def test_control_records_round_trip() -> None:
    for msg in CONTROL_SAMPLES:
        assert P.decode_control(P.encode_control(msg)) == msg


def test_control_decoder_refuses_other_tags_versions_and_types() -> None:
    with pytest.raises(P.ProtocolError):
        P.decode_control(P.encode_handoff(P.HandOff(rid="r")))  # a hand-off is not control
    with pytest.raises(P.ProtocolError):
        P.decode_control([P.CONTROL_TAG, msgspec.msgpack.encode(P.Resize(1, 0, v=1))])
    with pytest.raises(P.ProtocolError):
        P.decode_control([P.CONTROL_TAG, msgspec.msgpack.encode({"type": "resize", "seq": "x",
                                                                 "split": 0})])
    with pytest.raises(P.ProtocolError):
        P.decode_control([P.CONTROL_TAG, msgspec.msgpack.encode({"type": "reboot"})])


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(range(len(CONTROL_SAMPLES))), st.data())
def test_mutated_control_records_decode_or_fail_cleanly(i: int, data: st.DataObject) -> None:
    frames = P.encode_control(CONTROL_SAMPLES[i])
    body = bytearray(frames[1])
    for _ in range(data.draw(st.integers(1, 3))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    try:
        out = P.decode_control([frames[0], bytes(body[:cut])])
    except P.ProtocolError:
        return
    assert type(out) in typing.get_args(P.ControlMsg)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.binary(max_size=48), min_size=0, max_size=3))
def test_random_frames_are_never_a_control_record_or_a_crash(frames: list[bytes]) -> None:
    for decode in (P.decode_control, P.decode_handoff):
        try:
            decode(frames)
        except P.ProtocolError:
            pass
