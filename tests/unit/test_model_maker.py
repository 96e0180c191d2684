"""Offline test models: deterministic, the right shapes, loadable by transformers and SGLang."""

from __future__ import annotations

import hashlib
import json

import pytest

from sglang_semipd.testing.model_maker import (PRESETS, llama_weight_shapes, make_model,
                                               tokenizer_dir, write_sharegpt)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "tiny-f32", "tiny", "float32", seed=0)


def test_seeded_weights_are_reproducible(tiny_f32, tmp_path):
    again = make_model(tmp_path / "again", "tiny", "float32", seed=0)
    other = make_model(tmp_path / "other", "tiny", "float32", seed=1)
    assert sha(again / "model.safetensors") == sha(tiny_f32 / "model.safetensors")
    assert sha(other / "model.safetensors") != sha(tiny_f32 / "model.safetensors")


@pytest.mark.parametrize("dtype,torch_name", [("float32", "float32"), ("bfloat16", "bfloat16")])
def test_tiny_shapes_and_dtype(tmp_path, dtype, torch_name):
    from safetensors import safe_open

    out = make_model(tmp_path / dtype, "tiny", dtype)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert names == set(llama_weight_shapes(cfg))
        t = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        assert tuple(t.shape) == (2 * 64, 256) and str(t.dtype) == f"torch.{torch_name}"
        assert 0.015 < float(t.float().std()) < 0.025


def test_tiny_runs_in_transformers_with_the_smollm2_tokenizer(tiny_f32):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_f32)
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    ids = tok("Hello world", return_tensors="pt").input_ids
    assert ids.tolist() == [[19556, 905]]
    model = AutoModelForCausalLM.from_pretrained(tiny_f32, dtype=torch.float32)
    logits = model(ids).logits
    assert logits.shape == (1, 2, 49152) and torch.isfinite(logits).all()


@pytest.mark.parametrize("preset,params_b", [("llama3.1-8b", (8.0, 8.1)),
                                             ("deepseek-v2-lite", (15.5, 16.0)),
                                             ("tiny-deepseek-v2", (0.02, 0.04))])
def test_config_only_presets_parse_in_sglang(tmp_path, preset, params_b):
    from sglang.srt.configs.model_config import ModelConfig

    out = make_model(tmp_path / preset, preset)
    assert not (out / "model.safetensors").exists()
    mc = ModelConfig(str(out))
    assert mc.hf_config.architectures == PRESETS[preset]["architectures"]
    assert mc.num_hidden_layers == PRESETS[preset]["num_hidden_layers"]
    if preset.startswith(("deepseek", "tiny-deepseek")):
        assert mc.attention_arch.name == "MLA" and mc.kv_lora_rank == 512
    else:
        assert mc.get_num_kv_heads(1) == 8 and mc.head_dim == 128
    with pytest.raises(ValueError, match="config-only"):
        make_model(tmp_path / "x", preset, config_only=False)
    n = _param_count(PRESETS[preset])
    assert params_b[0] * 1e9 < n < params_b[1] * 1e9


def _param_count(cfg) -> int:
    if cfg["model_type"] == "llama":
        return sum(_prod(s) for s in llama_weight_shapes(cfg).values())
    h, layers, experts = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["n_routed_experts"]
    heads, nope, rope, v = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"],
                            cfg["qk_rope_head_dim"], cfg["v_head_dim"])
    kv = cfg["kv_lora_rank"]
    attn = h * heads * (nope + rope) + h * (kv + rope) + kv * heads * (nope + v) + heads * v * h
    moe = 3 * h * cfg["moe_intermediate_size"] * (experts + cfg["n_shared_experts"]) + h * experts
    dense = 3 * h * cfg["intermediate_size"]
    first = cfg["first_k_dense_replace"]
    return (2 * cfg["vocab_size"] * h + layers * attn + first * dense + (layers - first) * moe)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_unknown_preset_and_dtype(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        make_model(tmp_path, "llama-70b")
    with pytest.raises(ValueError, match="unknown dtype"):
        make_model(tmp_path, "tiny", "float16")


def test_tokenizer_assets_are_packaged():
    names = {p.name for p in tokenizer_dir().iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names


def test_synthetic_sharegpt(tmp_path):
    path = write_sharegpt(tmp_path / "s.json", n=20, seed=3)
    data = json.loads(path.read_text())
    assert len(data) == 20
    assert [c["from"] for c in data[0]["conversations"]] == ["human", "gpt"]
    assert write_sharegpt(tmp_path / "t.json", n=20, seed=3).read_text() == path.read_text()


@pytest.mark.parametrize("preset", ["llama3.1-8b", "deepseek-v2-lite"])
def test_a_larger_vocabulary_gets_a_padded_tokenizer_that_encodes_as_before(tmp_path, preset):
    """Every id a dummy-weight model can sample decodes to text (bench_serving times the
    first non-empty streamed delta), and no text encodes differently from the SmolLM2
    tokenizer's own encoding."""
    from transformers import AutoTokenizer

    out = make_model(tmp_path / preset, preset)
    tok, base = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tokenizer_dir())
    size = PRESETS[preset]["vocab_size"]
    assert len(tok) == size > len(base) == 49152
    text = "Who wrote [49152] and 128255 in 2024? Café, naïve; [ 7 ]"
    assert tok(text).input_ids == base(text).input_ids
    assert tok.decode([size - 1]) == f" [{size - 1}]"
    assert tok.decode([49152, 905]) == base.decode([905]).join([" [49152]", ""])
    assert all(tok.decode([i]) for i in range(49152, size, 997))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (base.bos_token_id, base.eos_token_id)


def test_the_tiny_models_tokenizer_is_the_shipped_one(tiny_f32):
    assert sha(tiny_f32 / "tokenizer.json") == sha(tokenizer_dir() / "tokenizer.json")
