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


# The registry: (role -> patches). Roles are the process roles of ARCHITECTURE.md section 2.
PATCHES: dict[str, tuple[Patch, ...]] = {}


def apply(role: str) -> None:
    """Check the SGLang pin, then apply every patch registered for ``role``."""
    check_sglang_version()
    for patch in PATCHES.get(role, ()):
        patch.apply()
