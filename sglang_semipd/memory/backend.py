"""``--radix-cache-backend semipd``: SGLang's radix-cache registry hook.

:func:`register_semipd_radix_backend` registers a factory under
:data:`BACKEND_NAME` with ``sglang.srt.mem_cache.registry``; SGLang's
``create_tree_cache`` then builds a
:class:`~sglang_semipd.memory.remote_radix_cache.RemoteRadixCache` from the
``TreeCacheBuildContext`` (``params.req_to_token_pool``,
``params.token_to_kv_pool_allocator``, ``params.page_size``).

The worker's allocator must already be a
:class:`~sglang_semipd.memory.remote_allocator.RemoteTokenAllocator`; the cache
uses the allocator's client (one client == one slot owner per worker).
``client_factory(ctx)`` names the client the worker process uses; when it
returns one, it must be that same client (checked).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Optional

from sglang_semipd.memory.client import KVStateClient

if TYPE_CHECKING:
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    from sglang_semipd.memory.remote_radix_cache import RemoteRadixCache

logger = logging.getLogger(__name__)

BACKEND_NAME = "semipd"

ClientFactory = Callable[["TreeCacheBuildContext"], Optional[KVStateClient]]

_STATE: dict[str, ClientFactory] = {}


def _build(ctx: TreeCacheBuildContext) -> RemoteRadixCache:
    """The registered factory: a RemoteRadixCache over the context's pools."""
    from sglang_semipd.memory.remote_allocator import RemoteTokenAllocator
    from sglang_semipd.memory.remote_radix_cache import RemoteRadixCache

    params = ctx.params
    alloc = params.token_to_kv_pool_allocator
    if not isinstance(alloc, RemoteTokenAllocator):
        raise TypeError(f"--radix-cache-backend {BACKEND_NAME} needs the worker's "
                        f"token_to_kv_pool_allocator to be a RemoteTokenAllocator, got "
                        f"{type(alloc).__name__}")
    client = _STATE[BACKEND_NAME](ctx)
    if client is not None and client is not alloc.client:
        raise ValueError("client_factory returned a client other than the allocator's: "
                         "slots and tree inserts must go through one client")
    cache = RemoteRadixCache(params)
    logger.info("semipd radix cache: client %d (%s), page_size %d", alloc.client.client_id,
                alloc.client.role, params.page_size)
    return cache


def register_semipd_radix_backend(client_factory: ClientFactory) -> None:
    """Register (or re-point) the ``semipd`` radix-cache backend.

    Idempotent: a second call only replaces ``client_factory``; SGLang's
    registry (which refuses duplicate names) is touched once per process."""
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )

    _STATE[BACKEND_NAME] = client_factory
    existing = get_radix_cache_factory(BACKEND_NAME)
    if existing is None:
        register_radix_cache_backend(BACKEND_NAME, _build)
    elif existing is not _build:
        raise ValueError(f"radix cache backend {BACKEND_NAME!r} is registered by someone else")
