"""Every change sglang-semipd makes to SGLang's behaviour at run time lives here.

SGLang is pinned (:data:`sglang_semipd.SGLANG_PIN`); internals move between releases, so
this module refuses to load against any other version. Each patch is a :class:`Patch` record
naming the SGLang symbol it replaces, applied by :func:`apply` in the process that needs it.
Prefer SGLang's own hooks (``run_scheduler_process_func``, ``register_radix_cache_backend``,
``_decode_cuda_graph_runner_cls``) over a patch; a patch is the last resort.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
from typing import Any, Callable

from sglang_semipd import SGLANG_PIN

logger = logging.getLogger(__name__)


class SGLangVersionError(RuntimeError):
    """The installed SGLang is not the version these patches were written against."""


def check_sglang_version() -> str:
    """Return the installed SGLang version; raise :class:`SGLangVersionError` if not pinned."""
    try:
        found = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SGLangVersionError(f"sglang=={SGLANG_PIN} is required but not installed") from exc
    if found != SGLANG_PIN:
        raise SGLangVersionError(
            f"sglang-semipd is written against sglang=={SGLANG_PIN}, found {found}: "
            f"install sglang=={SGLANG_PIN}")
    return found


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace ``module.qualname`` (an SGLang symbol of version SGLANG_PIN) with a new value."""

    module: str
    qualname: str
    make: Callable[[Any], Any]  # receives the original, returns the replacement
    why: str

    def apply(self) -> None:
        mod = importlib.import_module(self.module)
        owner_path, _, attr = self.qualname.rpartition(".")
        owner: Any = mod
        for part in filter(None, owner_path.split(".")):
            owner = getattr(owner, part)
        original = getattr(owner, attr)
        if getattr(original, "__semipd_patched__", False):
            return
        replacement = self.make(original)
        try:
            replacement.__semipd_patched__ = True
        except AttributeError:
            pass
        setattr(owner, attr, replacement)
        logger.debug("patched %s.%s: %s", self.module, self.qualname, self.why)


def _delegate_to_pool_hooks(name: str) -> Callable[[Any], Any]:
    """Replacement factory: call ``pool_hooks.active_hooks().<name>(original, self, ...)``
    when hooks are active, SGLang's original otherwise."""

    def make(original: Any) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            from sglang_semipd.memory.pool_hooks import active_hooks

            hooks = active_hooks()
            if hooks is None:
                return original(self, *args, **kwargs)
            return getattr(hooks, name)(original, self, *args, **kwargs)

        method.__name__ = method.__qualname__ = name
        method.__doc__ = f"sglang-semipd: {name} via the active pool hooks (else SGLang's)."
        return method

    return make


_KVC = "sglang.srt.mem_cache.kv_cache_configurator"
POOL_PATCHES: tuple[Patch, ...] = (
    Patch(_KVC, "KVCacheConfigurator._profile_available_bytes",
          _delegate_to_pool_hooks("profile_available_bytes"),
          "memory manager: the KV budget pays every worker's headroom, not one process's"),
    Patch(_KVC, "KVCacheConfigurator._resolve_memory_pool_config",
          _delegate_to_pool_hooks("resolve_memory_pool_config"),
          "worker: reuse the memory manager's pool sizes; manager: remember them"),
    Patch(_KVC, "KVCacheConfigurator._init_pools", _delegate_to_pool_hooks("init_pools"),
          "manager: record the pool allocations for export; worker: replay them as CUDA-IPC "
          "views and hand allocation state to the manager"),
)

def _skip_rope_reservation(original: Any) -> Any:
    def reserve_rope_cache_for_long_sequences(model: Any, *args: Any, **kwargs: Any) -> None:
        logger.debug("memory manager: RoPE caches keep their built length (workers extend)")

    return reserve_rope_cache_for_long_sequences


MANAGER_PATCHES: tuple[Patch, ...] = (
    Patch("sglang.srt.model_executor.model_runner", "reserve_rope_cache_for_long_sequences",
          _skip_rope_reservation,
          "memory manager: never runs a forward pass, and the buffers it exports must have "
          "the shapes a freshly built model has (IpcModelLoader compares them); each worker "
          "pre-expands its RoPE caches itself, as a stock weight-cache client does"),
)

def _capture_on_split_stream(original: Any) -> Any:
    def graph_capture(stream: Any = None) -> Any:
        from sglang_semipd.partition.streams import current_capture_stream

        return original(stream=stream if stream is not None else current_capture_stream())

    graph_capture.__doc__ = ("sglang-semipd: SGLang's graph_capture, on the active split's "
                             "stream when one is set (partition.streams.capture_stream).")
    return graph_capture


def _also_reject_out_of_vocab_ids(original: Any) -> Any:
    def validate_input_length(req: Any, max_req_input_len: int,
                              allow_auto_truncate: bool) -> Any:
        from sglang_semipd.validation import out_of_vocab_error

        error = original(req, max_req_input_len, allow_auto_truncate)
        if error is None and req.multimodal_inputs is None:  # image pads use hashed ids
            error = out_of_vocab_error(req.origin_input_ids, getattr(req, "vocab_size", None))
        return error

    validate_input_length.__doc__ = ("sglang-semipd: SGLang's length check, then token ids "
                                     "outside the vocabulary (validation.out_of_vocab_error)")
    return validate_input_length


def _chunk_after_reserve(original: Any) -> Any:
    def add_chunked_req(self: Any, req: Any) -> Any:
        from sglang_semipd import chunk_reserve

        if self.rem_chunk_tokens is None or not chunk_reserve.current():
            return original(self, req)
        held = chunk_reserve.chunk_budget(self.rem_chunk_tokens, self.page_size)
        self.rem_chunk_tokens -= held
        try:
            left = original(self, req)
        finally:
            self.rem_chunk_tokens += held
        self.semipd_chunk_open = left is not None
        return left

    add_chunked_req.__doc__ = ("sglang-semipd: SGLang's add_chunked_req on the budget less "
                               "the prefill worker's reserve (chunk_reserve)")
    return add_chunked_req


def _no_second_chunked_req(original: Any) -> Any:
    def add_one_req(self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "semipd_chunk_open", False) and self.rem_chunk_tokens is not None:
            from sglang.srt.managers.schedule_policy import AddReqResult

            need = len(req.full_untruncated_fill_ids) - len(req.prefix_indices)
            if self.ceil_paged_tokens(need) > self.rem_chunk_tokens:
                return AddReqResult.OTHER
        return original(self, req, *args, **kwargs)

    add_one_req.__doc__ = ("sglang-semipd: SGLang's add_one_req, except that next to a "
                           "chunked request cut short by a reserve a prompt must fit whole")
    return add_one_req


WORKER_PATCHES: tuple[Patch, ...] = (
    Patch("sglang.srt.managers.scheduler", "validate_input_length",
          _also_reject_out_of_vocab_ids,
          "both workers: a prompt token id outside the vocabulary becomes SGLang's own "
          "bad-request abort (HTTP 400) instead of a device-side assert in the embedding "
          "lookup, which under MPS would take both workers down"),
    Patch("sglang.srt.model_executor.runner.decode_cuda_graph_runner", "graph_capture",
          _capture_on_split_stream,
          "decode worker: capture each split's decode CUDA graphs on that split's green "
          "stream (a graph keeps the SM set of its capture stream; SGLang would capture on a "
          "fresh ordinary stream, whose replay escapes the partition)"),
    Patch("sglang.srt.model_executor.runner.prefill_cuda_graph_runner", "graph_capture",
          _capture_on_split_stream,
          "prefill worker with --prefill-graphs: capture each split's prefill CUDA graphs on "
          "that split's green stream, as the decode worker's (without the flag the prefill "
          "worker captures none and SGLang's own function would run)"),
    Patch("sglang.srt.managers.schedule_policy", "PrefillAdder.add_chunked_req",
          _chunk_after_reserve,
          "prefill worker with --prefill-chunk-reserve: a long prompt's next chunk leaves "
          "room for the waiting prompts that fit whole (SGLang gives it the whole budget "
          "first); without a reserve SGLang's own method runs"),
    Patch("sglang.srt.managers.schedule_policy", "PrefillAdder.add_one_req",
          _no_second_chunked_req,
          "prefill worker with --prefill-chunk-reserve: while a chunk cut short by the "
          "reserve leaves its prompt unfinished, a prompt that does not fit whole is "
          "refused instead of becoming a second chunked request (SGLang tracks one); "
          "otherwise SGLang's own method runs"),
)

# The registry: (role -> patches). Roles are the process roles of ARCHITECTURE.md section 2.
PATCHES: dict[str, tuple[Patch, ...]] = {
    "memory_manager": POOL_PATCHES + MANAGER_PATCHES,
    "worker": POOL_PATCHES + WORKER_PATCHES,
}


def apply(role: str) -> None:
    """Check the SGLang pin, then apply every patch registered for ``role``."""
    check_sglang_version()
    for patch in PATCHES.get(role, ()):
        patch.apply()
