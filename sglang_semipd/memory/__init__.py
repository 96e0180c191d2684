"""Unified KV storage: one memory-manager process owns the KV slot allocator,
req->token rows and the radix tree; prefill and decode workers reach it over
:mod:`sglang_semipd.memory.rpc` / :mod:`sglang_semipd.memory.client`.  Import submodules directly (``ledger`` is
torch-free, ``service`` pulls in SGLang)."""
