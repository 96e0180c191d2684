"""Wire protocol of the memory-manager RPC (workers <-> KV-state server).

Besides the KV-state requests (allocation, radix tree, req rows) it carries the storage
records a worker needs once to attach to the shared pools: :class:`TensorHandle` (CUDA IPC or
shared-memory identity of one tensor view) inside a :class:`PoolManifest`, answered to
:class:`GetPoolManifest` by :class:`PoolManifestReply`.

Every message is a frozen, tagged :class:`msgspec.Struct` (tag field ``type``,
tag value = class name).  A message travels as a ZeroMQ multipart message::

    frame 0      msgpack header {v: PROTOCOL_VERSION, seq: int,
                                 bufs: [[dtype, count], ...], msg: <tagged struct>}
    frame 1..N   raw little-endian integer buffers, one per ``bufs`` entry
                 (dtype "i8" = int64, "i4" = int32; byte length must be
                 exactly ``count * itemsize``)

Contracts:

* ``decode`` never returns a partially valid message: a wrong version, an
  unknown tag, a missing/extra frame, a frame whose length disagrees with its
  declared count, or a buffer count that disagrees with the message type all
  raise :class:`ProtocolError` (whose ``code`` goes into an ``ErrorReply``).
* Nothing is ever pickled.  Token ids and KV indices travel as buffers (never
  as msgpack lists) so long prompts cost one memcpy.
* ``seq`` is chosen by the requester and echoed in the reply so a client can
  drop stale replies after a timeout.

Buffers expected per message type (``None`` = any number): see
:func:`expected_buffers`.
"""

from __future__ import annotations

import logging
import sys
from array import array
from typing import Annotated, Any, Iterable, Literal, NamedTuple, Optional, Sequence, Union

import msgspec

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 3  # 3: PrefillHandOff
MAX_BUFFER_ITEMS = 1 << 28

NonNeg = Annotated[int, msgspec.Meta(ge=0)]

_ITEMSIZE = {"i8": 8, "i4": 4}
_TYPECODE = {"i8": "q", "i4": "i"}
assert array("q").itemsize == 8 and array("i").itemsize == 4
_BIG_ENDIAN = sys.byteorder == "big"


class ErrorCode:
    """String codes carried by :class:`ErrorReply` / :class:`KVStateError`."""

    BAD_MESSAGE = "bad_message"
    VERSION = "version_mismatch"
    TRUNCATED = "truncated"
    BAD_FRAMES = "bad_frames"
    UNKNOWN_TYPE = "unknown_type"
    BAD_REQUEST = "bad_request"
    INVALID_INDICES = "invalid_indices"
    DUPLICATE_INDICES = "duplicate_indices"
    DOUBLE_FREE = "double_free"
    DOUBLE_ISSUE = "double_issue"
    NOT_OWNED = "not_owned"
    UNKNOWN_NODE = "unknown_node"
    NOT_LOCKED = "not_locked"
    UNKNOWN_LEASE = "unknown_lease"
    OUT_OF_MEMORY = "out_of_memory"
    NOT_REGISTERED = "not_registered"
    UNKNOWN_CLIENT = "unknown_client"
    NO_MANIFEST = "no_manifest"
    BUSY = "busy"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class KVStateError(Exception):
    """A request was refused; ``code`` is an :class:`ErrorCode` value."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"[{code}] {message}" if message else code)
        self.code = code
        self.message = message


class ProtocolError(KVStateError):
    """Frames could not be decoded into a valid message."""


# --------------------------------------------------------------------------------------------
# Storage handles: sent once, memory manager -> worker, when a worker attaches to the shared
# weights/KV pool (see sglang_semipd.memory.tensor_ipc and .pool_attach). Plain fields only.


class TensorHandle(msgspec.Struct, frozen=True, tag="tensor_handle"):
    """Where a tensor's bytes live (CUDA IPC or a shared-memory file) and how to view them."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements, of the view inside its storage
    dtype: str  # torch dtype name without "torch."
    device: str  # "cuda" or "cpu"
    device_index: int = -1
    # CUDA IPC (the fields of torch.multiprocessing.reductions.reduce_tensor)
    storage_handle: bytes = b""
    storage_size_bytes: int = 0
    storage_offset_bytes: int = 0
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False
    # CPU shared memory (torch's file_system sharing)
    manager_handle: bytes = b""


class AllocationRecord(msgspec.Struct, frozen=True):
    """One factory call of the manager's pool construction, in call order."""

    index: int
    shape: tuple[int, ...]
    dtype: str
    handle: Optional[TensorHandle] = None  # set iff the tensor is shared storage


class PoolSizes(msgspec.Struct, frozen=True):
    """SGLang's resolved ``MemoryPoolConfig`` of the manager, which every worker must reuse
    (its pools are replays of the manager's, so their sizes must be the same)."""

    max_total_num_tokens: int
    max_running_requests: Optional[int] = None
    full_max_total_num_tokens: Optional[int] = None
    swa_max_total_num_tokens: Optional[int] = None
    mem_fraction_static: Optional[float] = None


class PoolManifest(msgspec.Struct, frozen=True):
    """Everything a worker needs to rebuild the manager's pools as views and to map its
    weights (SGLang's weight-cache socket, served by the same memory manager)."""

    device: str
    records: tuple[AllocationRecord, ...]
    sizes: Optional[PoolSizes] = None
    weight_socket: str = ""
    weights_bytes: int = 0

    @property
    def shared(self) -> tuple[AllocationRecord, ...]:
        return tuple(r for r in self.records if r.handle is not None)


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True,
           forbid_unknown_fields=True):
    """Base of every wire message."""


# ----------------------------------------------------------------- requests
class Hello(_Msg):
    """Register the sending socket as a client.  Reply: HelloReply."""

    name: str
    role: str = ""


class Alloc(_Msg):
    """Allocate KV slots for ``len(sizes)`` requests atomically (all or none).

    Reply: AllocReply + one i8 buffer per request holding ``ceil(size/page)*page``
    slot indices (whole pages)."""

    sizes: list[NonNeg]


class Free(_Msg):
    """Free every index of every attached buffer (any number), atomically."""


class Lease(_Msg):
    """Take a block of >= n slots (whole pages) to hand out locally.  Reply: LeaseReply."""

    n: NonNeg


class ReturnLease(_Msg):
    """Close a lease; the one attached buffer holds its unused indices (freed)."""

    lease_id: int


class AllocReqRows(_Msg):
    """Allocate ``n`` req->token rows.  Reply: ReqRowsReply."""

    n: NonNeg


class FreeReqRows(_Msg):
    """Free req->token rows held by the caller."""

    rows: list[int]


class MatchPrefix(_Msg):
    """Longest cached prefix of the token ids in buffer 0; optionally lock it atomically."""

    extra_key: Optional[str] = None
    lock: bool = False


class Insert(_Msg):
    """Insert token ids (buffer 0) with slot values (buffer 1, same length).

    Slots past the already-present prefix move from the caller to the tree;
    the reply's ``prefix_len`` tells the caller which of its slots are duplicates."""

    extra_key: Optional[str] = None
    lock: bool = False
    priority: int = 0


class IncLockRef(_Msg):
    node: int


class DecLockRef(_Msg):
    node: int


class Evict(_Msg):
    num_tokens: NonNeg


class Stats(_Msg):
    """Cheap counters (no structural walk).  Reply: InvariantReport(full=False)."""


class CheckInvariant(_Msg):
    """Full structural check.  Reply: InvariantReport(full=True)."""


class Reset(_Msg):
    """Drop the whole tree; refused (BUSY) while any client holds anything."""


class ReleaseClient(_Msg):
    """Supervisor: free everything a (dead) client held and drop its lock refs."""

    client_id: int


class Goodbye(_Msg):
    """The caller releases everything it holds and unregisters."""


class Transfer(_Msg):
    """Hand the attached slots (buffer 0), ``rows`` and one lock ref per handle in ``locks``
    over to client ``to_client`` (prefill -> decode hand-off; all or nothing)."""

    to_client: int = 0  # 0: the one client registered with role ``to_role``
    to_role: str = ""
    rows: list[int] = []
    locks: list[int] = []


class HandOffEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One request of a :class:`PrefillHandOff`."""

    row: NonNeg  # its req -> token row, handed over
    protected: NonNeg = 0  # tokens of its prompt the tree already held for it (locked)
    unlock: int = 0  # node whose lock ref the request held before (0: none): dropped
    hand_lock: int = 0  # without tokens: the node whose lock ref is handed over (0: none)
    extra_key: Optional[str] = None
    priority: int = 0


class PrefillHandOff(_Msg):
    """Cache several prefilled prompts and hand the requests to the ``to_role`` client (the
    prefill -> decode hand-off of one prefill batch, one round trip). Entry ``i`` travels
    with three buffers, ``3i`` .. ``3i + 2``: its page-aligned token ids, their slots (as
    :class:`Insert`), and the slots past them (its unaligned tail). In order, per entry:

    1. token ids given: :class:`Insert` them, locked (``values[prefix_len:]`` pass to the
       tree; the caller frees its duplicates ``values[protected:prefix_len]``);
    2. ``unlock``: :class:`DecLockRef` of it;
    3. :class:`Transfer` of the tail slots, ``row`` and one lock ref -- on the inserted
       node, else on ``hand_lock`` -- to the ``to_role`` client.

    The first refusal stops the batch and is the reply; the entries before it stay done.
    Reply: :class:`PrefillHandOffReply`."""

    to_role: str
    entries: list[HandOffEntry]


class GetPoolManifest(_Msg):
    """Ask for the shared pools' manifest (a worker attaching to the KV pool)."""


class Shutdown(_Msg):
    """Stop the server loop after replying."""


# ------------------------------------------------------------------ replies
class HelloReply(_Msg):
    client_id: int
    page_size: int
    capacity: int
    req_rows: int
    version: int = PROTOCOL_VERSION


class AllocReply(_Msg):
    sizes: list[NonNeg]


class FreeReply(_Msg):
    freed: int


class LeaseReply(_Msg):
    lease_id: int
    n: int


class ReturnLeaseReply(_Msg):
    returned: int


class ReqRowsReply(_Msg):
    rows: list[int]


class FreeReqRowsReply(_Msg):
    freed: int


class MatchPrefixReply(_Msg):
    prefix_len: int
    node: int
    locked: bool


class InsertReply(_Msg):
    prefix_len: int
    node: int
    locked: bool


class LockRefReply(_Msg):
    node: int
    delta: int
    lock_count: int


class EvictReply(_Msg):
    num_evicted: int


class InvariantReport(_Msg):
    """``free + evictable + in_use == capacity`` (all in tokens), where
    ``in_use = sum(client_held) + protected``; ``leased`` is the part of
    ``client_held`` sitting in open leases."""

    ok: bool
    full: bool
    capacity: int
    free: int
    evictable: int
    protected: int
    client_held: dict[int, int]
    leased: int
    in_use: int
    lock_refs: int
    req_rows_capacity: int
    req_rows_free: int
    req_rows_held: dict[int, int]
    errors: list[str] = []


class ReleaseReply(_Msg):
    client_id: int
    freed_tokens: int
    dropped_locks: int
    freed_rows: int
    closed_leases: int


class OkReply(_Msg):
    pass


class TransferReply(_Msg):
    tokens: int
    rows: int
    locks: int


class PrefillHandOffReply(_Msg):
    """Per entry of a :class:`PrefillHandOff`: the prefix the tree already held
    (``prefix_lens``), the inserted node (0: nothing inserted), the lock refs its ``unlock``
    released (``unlock_deltas``, as :class:`LockRefReply`'s ``delta``). Buffer ``i``: the
    tree's slots for tokens ``[protected, prefix_len)`` of entry ``i`` (empty unless the
    tree held more than ``protected``), which the caller's req row must now name."""

    prefix_lens: list[int]
    nodes: list[int]
    unlock_deltas: list[int]


class PoolManifestReply(_Msg):
    manifest: PoolManifest


class ErrorReply(_Msg):
    code: str
    message: str = ""


Request = Union[
    Hello, Alloc, Free, Lease, ReturnLease, AllocReqRows, FreeReqRows, MatchPrefix,
    Insert, IncLockRef, DecLockRef, Evict, Stats, CheckInvariant, Reset, ReleaseClient,
    Goodbye, Shutdown, GetPoolManifest, Transfer, PrefillHandOff,
]
Reply = Union[
    HelloReply, AllocReply, FreeReply, LeaseReply, ReturnLeaseReply, ReqRowsReply,
    FreeReqRowsReply, MatchPrefixReply, InsertReply, LockRefReply, EvictReply,
    InvariantReport, ReleaseReply, OkReply, PoolManifestReply, TransferReply,
    PrefillHandOffReply, ErrorReply,
]
Message = Union[Request, Reply]

_FIXED_BUFFERS: dict[type, int] = {
    MatchPrefix: 1, Insert: 2, ReturnLease: 1, LeaseReply: 1, MatchPrefixReply: 1,
    Transfer: 1,
}


def expected_buffers(msg: Any) -> Optional[int]:
    """Number of buffers ``msg`` must travel with (``None``: any number)."""
    if isinstance(msg, Free):
        return None
    if isinstance(msg, AllocReply):
        return len(msg.sizes)
    if isinstance(msg, PrefillHandOff):
        return 3 * len(msg.entries)
    if isinstance(msg, PrefillHandOffReply):
        return len(msg.nodes)
    return _FIXED_BUFFERS.get(type(msg), 0)


class _BufSpec(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    dtype: Literal["i8", "i4"]
    count: Annotated[int, msgspec.Meta(ge=0, le=MAX_BUFFER_ITEMS)]


class _Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    seq: int
    bufs: list[_BufSpec]
    msg: msgspec.Raw


class _Version(msgspec.Struct):
    v: int


class Decoded(NamedTuple):
    seq: int
    msg: Any
    buffers: list[array]


_hdr_decoder = msgspec.msgpack.Decoder(_Header)
_ver_decoder = msgspec.msgpack.Decoder(_Version)
_msg_decoder = msgspec.msgpack.Decoder(Message)
_encoder = msgspec.msgpack.Encoder()

BufferLike = Union[array, memoryview, Sequence[int], range]


def as_int_array(buf: Any) -> array:
    """Normalise an index/token container to ``array('q')`` or ``array('i')``.

    Accepts ``array`` ('q', 'i', 8-byte 'l'), a memoryview with an integer
    format of item size 4 or 8, or any iterable of ints (-> int64)."""
    if isinstance(buf, array):
        if buf.typecode in ("q", "i"):
            return buf
        if buf.typecode in ("l", "Q", "L") and buf.itemsize == 8:
            return array("q", memoryview(buf).cast("B").cast("q"))
        return array("q", buf)
    if isinstance(buf, memoryview):
        fmt = buf.format.lstrip("@=<")
        if fmt in ("q", "l") and buf.itemsize == 8:
            return array("q", buf.cast("B").cast("q"))
        if fmt == "i" and buf.itemsize == 4:
            return array("i", buf.cast("B").cast("i"))
        raise TypeError(f"unsupported memoryview format {buf.format!r}")
    if isinstance(buf, (bytes, bytearray, str)):
        raise TypeError("raw bytes are ambiguous; pass an array('q') or array('i')")
    return array("q", buf)


def _to_wire(buf: array) -> tuple[str, bytes]:
    dtype = "i8" if buf.typecode == "q" else "i4"
    if _BIG_ENDIAN:  # pragma: no cover - little-endian hosts only in practice
        buf = array(buf.typecode, buf)
        buf.byteswap()
    return dtype, buf.tobytes()


def encode(msg: Any, *buffers: BufferLike, seq: int = 0) -> list[bytes]:
    """Encode ``msg`` plus integer ``buffers`` into ZeroMQ frames.

    Raises ``ValueError`` when the buffer count does not match
    :func:`expected_buffers` (so a sender can never emit an undecodable message)."""
    if not isinstance(msg, _Msg):
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    want = expected_buffers(msg)
    if want is not None and want != len(buffers):
        raise ValueError(f"{type(msg).__name__} needs {want} buffers, got {len(buffers)}")
    specs, payload = [], []
    for buf in buffers:
        dtype, raw = _to_wire(as_int_array(buf))
        specs.append(_BufSpec(dtype, len(raw) // _ITEMSIZE[dtype]))
        payload.append(raw)
    header = _Header(v=PROTOCOL_VERSION, seq=seq, bufs=specs,
                     msg=msgspec.Raw(_encoder.encode(msg)))
    return [_encoder.encode(header), *payload]


def _decode_header(frame0: Any) -> _Header:
    try:
        return _hdr_decoder.decode(frame0)
    except UnicodeDecodeError as exc:  # msgspec lets invalid UTF-8 in a str field through
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"bad header: {exc}") from None
    except msgspec.DecodeError as exc:
        # Tell a version mismatch apart from plain garbage when we can.
        try:
            ver = _ver_decoder.decode(frame0).v
        except Exception:
            ver = PROTOCOL_VERSION
        if ver != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.VERSION,
                                f"protocol version {ver}, expected {PROTOCOL_VERSION}") from None
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"bad header: {exc}") from None


def _decode_msg(raw: msgspec.Raw) -> Any:
    try:
        return _msg_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        unknown = text.startswith("Invalid value") and text.endswith("`$.type`")
        code = ErrorCode.UNKNOWN_TYPE if unknown else ErrorCode.BAD_MESSAGE
        raise ProtocolError(code, text) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None


def _decode_buffers(specs: list[_BufSpec], frames: Sequence[Any]) -> list[array]:
    out = []
    for i, (spec, frame) in enumerate(zip(specs, frames)):
        view = memoryview(frame).cast("B")
        if len(view) != spec.count * _ITEMSIZE[spec.dtype]:
            raise ProtocolError(ErrorCode.TRUNCATED,
                                f"buffer {i}: {len(view)} bytes, declared {spec.count} x {spec.dtype}")
        arr = array(_TYPECODE[spec.dtype])
        arr.frombytes(view)
        if _BIG_ENDIAN:  # pragma: no cover
            arr.byteswap()
        out.append(arr)
    return out


def decode_frames(frames: Sequence[Any]) -> Decoded:
    """Decode frames (bytes / zmq.Frame / memoryview) into ``Decoded(seq, msg, buffers)``.

    Raises :class:`ProtocolError`; never returns a partially valid message."""
    if not frames:
        raise ProtocolError(ErrorCode.TRUNCATED, "no frames")
    frames = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    header = _decode_header(frames[0])
    if header.v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION,
                            f"protocol version {header.v}, expected {PROTOCOL_VERSION}")
    if len(frames) - 1 < len(header.bufs):
        raise ProtocolError(ErrorCode.TRUNCATED,
                            f"header declares {len(header.bufs)} buffers, got {len(frames) - 1}")
    if len(frames) - 1 > len(header.bufs):
        raise ProtocolError(ErrorCode.BAD_FRAMES,
                            f"header declares {len(header.bufs)} buffers, got {len(frames) - 1}")
    msg = _decode_msg(header.msg)
    want = expected_buffers(msg)
    if want is not None and want != len(header.bufs):
        raise ProtocolError(ErrorCode.BAD_FRAMES,
                            f"{type(msg).__name__} carries {want} buffers, got {len(header.bufs)}")
    return Decoded(header.seq, msg, _decode_buffers(header.bufs, frames[1:]))


def decode(frames: Sequence[Any]) -> tuple[Any, list[array]]:
    """``(msg, buffers)`` of ``frames``; see :func:`decode_frames`."""
    decoded = decode_frames(frames)
    return decoded.msg, decoded.buffers


def message_types() -> tuple[type, ...]:
    """Every concrete message class (requests then replies)."""
    from typing import get_args

    return get_args(Request) + get_args(Reply)


def token_buffer(tokens: Iterable[int]) -> array:
    """Token ids as a compact buffer: arrays/memoryviews pass through
    :func:`as_int_array`; other iterables become int32 when every id fits, else int64."""
    if isinstance(tokens, (array, memoryview)):
        return as_int_array(tokens)
    try:
        return array("i", tokens)
    except OverflowError:
        return array("q", tokens)



# ------------------------------------------------------------------ prefill -> decode
HANDOFF_TAG = b"semipd/handoff"


class HandOff(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A request whose prefill finished in the prefill worker, for the decode worker.

    Metadata only: the KV stays where it is (shared pool); ownership of the request's row,
    its own slots and its radix lock has already moved to the decode worker (``Transfer``)
    when this is sent. ``finished``: the request ended at prefill (the decode worker drops
    its parked copy; nothing was transferred). The ``send_*`` cursors are the prefill
    worker's stream-output positions, so the decode worker continues the stream exactly
    where the first token left it. ``logprob`` carries SGLang's ``ReqLogprob`` list fields.
    Sent as ``[HANDOFF_TAG, msgpack(HandOff)]`` on the prefill worker's output socket, so it
    is ordered after the first token it announces."""

    v: int = PROTOCOL_VERSION
    rid: str
    finished: bool = False
    req_pool_idx: int = 0
    kv_len: int = 0
    first_token: int = 0
    cache_protected_len: int = 0
    last_node: int = 0
    last_node_prefix_len: int = 0
    cached_tokens: int = 0
    send_token_offset: int = 0
    send_decode_id_offset: int = 0
    send_output_token_logprobs_offset: int = 0
    input_logprob_sent: bool = False
    logprob: Optional[dict[str, Any]] = None


def encode_handoff(h: HandOff) -> list[bytes]:
    return [HANDOFF_TAG, msgspec.msgpack.encode(h)]


def decode_handoff(frames: Sequence[Any]) -> HandOff:
    """Inverse of :func:`encode_handoff`; raises :class:`ProtocolError` on anything else."""
    raw = [bytes(f.buffer if hasattr(f, "buffer") else f) for f in frames]
    if len(raw) != 2 or raw[0] != HANDOFF_TAG:
        raise ProtocolError(ErrorCode.BAD_FRAMES, "not a hand-off message")
    try:
        h = msgspec.msgpack.decode(raw[1], type=HandOff)
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_FRAMES, f"bad hand-off: {exc}") from None
    if h.v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION, f"hand-off version {h.v}, expected "
                            f"{PROTOCOL_VERSION}")
    return h


# ------------------------------------------------------------------ scheduler <-> workers
CONTROL_TAG = b"semipd/ctl"


class Resize(msgspec.Struct, frozen=True, tag="resize", forbid_unknown_fields=True):
    """Scheduler -> both workers: run on planned split ``split`` from the next iteration on.
    ``seq`` increases with every command; ``sent_at`` is the scheduler's ``time.monotonic()``
    (one clock for all processes of a host), so a worker's ack yields the resize latency."""

    seq: int
    split: int
    sent_at: float = 0.0
    v: int = PROTOCOL_VERSION


class ResizeAck(msgspec.Struct, frozen=True, tag="resize_ack", forbid_unknown_fields=True):
    """Worker -> scheduler: ``seq`` took effect; ``iteration`` is the first iteration that runs
    on ``split``; ``applied_at`` the worker's ``time.monotonic()`` when it switched."""

    role: str
    seq: int
    split: int
    iteration: int
    applied_at: float = 0.0
    v: int = PROTOCOL_VERSION


class ResizeRequest(msgspec.Struct, frozen=True, tag="resize_request",
                    forbid_unknown_fields=True):
    """Prefill worker -> scheduler: an operator asked, through SGLang's
    ``/set_internal_state``, for a prefill SM share (``{"semipd_prefill_sm_share": x}``: the
    scheduler picks the nearest planned split) and/or a partition policy
    (``{"semipd_slo_policy": 0 | 1}``: ``static`` (0) pins the split, ``slo`` (1) hands it back
    to the SLO controller; the record carries the policy's name). At least one is set."""

    share: Optional[float] = None
    policy: Optional[str] = None
    v: int = PROTOCOL_VERSION


class IterationStat(msgspec.Struct, frozen=True, tag="iteration",
                    forbid_unknown_fields=True):
    """Worker -> scheduler, after every forward pass: what ran, on which split, and how long
    it took (``start``/``end``: ``time.monotonic()``, ``end`` after the GPU finished)."""

    role: str
    iteration: int
    split: int
    mode: str  # "extend" | "decode" | other SGLang forward modes, lower case
    batch_size: int
    tokens: int
    start: float
    end: float
    queued: int = 0  # requests waiting in this worker when the iteration started
    v: int = PROTOCOL_VERSION


class ReleaseIdle(msgspec.Struct, frozen=True, tag="release_idle",
                  forbid_unknown_fields=True):
    """Scheduler -> decode worker, before a cache flush reaches the prefill worker: hand back
    what the worker holds idle in the shared pool (buffered frees, its slot lease), so the
    memory manager can reset the tree once no request holds anything."""

    seq: int
    v: int = PROTOCOL_VERSION


class Released(msgspec.Struct, frozen=True, tag="released", forbid_unknown_fields=True):
    """Decode worker -> scheduler: :class:`ReleaseIdle` ``seq`` done."""

    seq: int
    v: int = PROTOCOL_VERSION


class Retire(msgspec.Struct, frozen=True, tag="retire", forbid_unknown_fields=True):
    """Scheduler -> both workers of a generation swapped out by an ``--sm-partition mps``
    resize (:mod:`sglang_semipd.partition.standby`), once its last request finished: hand back
    everything held in the shared pool, say goodbye to the memory manager, exit with 0."""

    generation: int
    v: int = PROTOCOL_VERSION


ControlMsg = Union[Resize, ResizeAck, ResizeRequest, IterationStat, ReleaseIdle, Released,
                   Retire]
_control_decoder = msgspec.msgpack.Decoder(ControlMsg)


def encode_control(msg: Any) -> list[bytes]:
    """``[CONTROL_TAG, msgpack(msg)]`` for any :data:`ControlMsg` record."""
    return [CONTROL_TAG, msgspec.msgpack.encode(msg)]


def decode_control(frames: Sequence[Any]) -> Any:
    """Inverse of :func:`encode_control`; raises :class:`ProtocolError` on anything else
    (wrong tag or frame count, unknown record type, bad field, other protocol version)."""
    raw = [bytes(f.buffer if hasattr(f, "buffer") else f) for f in frames]
    if len(raw) != 2 or raw[0] != CONTROL_TAG:
        raise ProtocolError(ErrorCode.BAD_FRAMES, "not a control message")
    try:
        msg = _control_decoder.decode(raw[1])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"bad control message: {exc}") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION, f"control message version {msg.v}, expected "
                            f"{PROTOCOL_VERSION}")
    return msg
