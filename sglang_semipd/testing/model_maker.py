"""Offline test models in Hugging Face format, made in seconds with a fixed seed.

* ``tiny``: a random-weight ``LlamaForCausalLM`` (hidden 256, 4 layers, 4 query heads, 2 KV
  heads = GQA, head dim 64, vocab 49152), float32 or bfloat16. Weights ~ N(0, 0.02) from a
  seeded generator, norms = 1, so the same call always writes the same bytes.
* ``llama3.1-8b``: Meta-Llama-3.1-8B's shape as a config-only directory, to be served with
  ``--load-format dummy`` (random weights made on the GPU, no files).
* ``deepseek-v2-lite``: DeepSeek-V2-Lite's shape (MLA + MoE), config-only, for the same use.
* ``tiny-deepseek-v2``: the same architecture (MLA head dims as DeepSeek-V2's, 8 routed
  experts, 3 layers, hidden 256), config-only: a DeepSeek model that starts in seconds.

Every directory gets the SmolLM2 tokenizer shipped in ``sglang_semipd/assets`` (49152 ids).
A preset with a larger vocabulary gets it padded to the vocabulary's size with entries no
text encodes to (``" [<id>]"``, no merge leads there): encoding is unchanged, and every id a
dummy-weight model samples decodes to text. Without them, most of an 8B-shaped model's ids
decoded to nothing, so streamed chat deltas stayed empty and bench_serving, which times the
first non-empty delta, reported TTFT 0. Writing weights needs torch and safetensors.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
DTYPES = ("float32", "bfloat16")

_LLAMA_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
    "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_LLAMA_COMMON, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=49152,
                 max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False),
    "llama3.1-8b": dict(
        _LLAMA_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_act="silu",
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, scoring_func="softmax", norm_topk_prob=False,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, vocab_size=102400, max_position_embeddings=163840, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
        aux_loss_alpha=0.001, seq_aux=True, initializer_range=0.02, use_cache=True,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                      "mscale_all_dim": 0.707}),
}
# DeepSeek-V2's architecture (MLA with its real head dims, MoE with shared experts, a dense
# first layer) at a size that starts in seconds: for GPU parity tests with --load-format dummy
PRESETS["tiny-deepseek-v2"] = dict(
    PRESETS["deepseek-v2-lite"], hidden_size=256, intermediate_size=512,
    moe_intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    vocab_size=49152, max_position_embeddings=8192, rope_scaling=None)
WEIGHTED_PRESETS = ("tiny",)

_WORDS = ("the of and to in is was for on that with as by at from his her it an were are "
          "which this be or has had not first one their its new after who they two have but "
          "been more time year city during also would about other some people into there when "
          "most world only over where between many school state may later under used water "
          "system music river light small house early life great number game paper model "
          "train value data north south east west market story order power field center road "
          "book table color garden window morning evening question answer simple strong quiet "
          "bright careful happy").split()


def tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer files shipped with the package."""
    return Path(str(resources.files("sglang_semipd") / "assets" / "tokenizer-smollm2"))


def copy_tokenizer(out: Path, vocab_size: Optional[int] = None) -> dict[str, int]:
    """Copy the tokenizer into ``out``, padded to ``vocab_size`` ids if that is larger (see
    the module docstring); return its bos/eos/pad ids and its size."""
    src = tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    if vocab_size is not None and vocab_size > len(vocab):
        _pad_vocab(tok, vocab_size)
        (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    special = json.loads((src / "special_tokens_map.json").read_text())
    return {"bos": vocab[special["bos_token"]], "eos": vocab[special["eos_token"]],
            "pad": vocab[special["pad_token"]], "size": len(vocab)}


def _pad_vocab(tok: dict[str, Any], vocab_size: int) -> None:
    """Add byte-level BPE entries ``"\u0120[<id>]"`` (text ``" [<id>]"``) for ids
    ``len(vocab) .. vocab_size - 1``. No merge produces them and the pre-tokenizer splits
    digits and brackets apart, so no input encodes to one."""
    model = tok["model"]
    vocab = model["vocab"]
    if model["type"] != "BPE" or model.get("ignore_merges") or sorted(vocab.values()) != list(
            range(len(vocab))):
        raise ValueError("padding needs a BPE vocabulary with ids 0..n-1 and merges applied")
    for i in range(len(vocab), vocab_size):
        entry = f"\u0120[{i}]"
        if entry in vocab:
            raise ValueError(f"{entry!r} is already in the vocabulary")
        vocab[entry] = i


def write_config(out: Path, preset: str, dtype: str, tok: dict[str, int]) -> dict[str, Any]:
    cfg = dict(PRESETS[preset], bos_token_id=tok["bos"], eos_token_id=tok["eos"],
               pad_token_id=tok["pad"], torch_dtype=dtype)
    if tok["size"] > cfg["vocab_size"]:
        raise ValueError(f"tokenizer ({tok['size']}) larger than {preset}'s vocabulary")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    gen = {"bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "pad_token_id": tok["pad"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return cfg


def llama_weight_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor of a Llama checkpoint with this config."""
    h, i, v, d = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                  cfg["head_dim"])
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_weights(out: Path, cfg: dict[str, Any], dtype: str, seed: int) -> int:
    """Write ``model.safetensors``; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in llama_weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch_dtype)
        else:
            tensors[name] = (torch.randn(*shape, generator=gen) * 0.02).to(torch_dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def make_model(out: Path | str, preset: str = "tiny", dtype: str = "bfloat16", seed: int = 0,
               config_only: Optional[bool] = None) -> Path:
    """Write a model directory; config-only unless the preset has weights we generate."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {DTYPES}")
    if config_only is None:
        config_only = preset not in WEIGHTED_PRESETS
    if not config_only and preset not in WEIGHTED_PRESETS:
        raise ValueError(f"{preset} is config-only (serve it with --load-format dummy)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = write_config(out, preset, dtype, copy_tokenizer(out, PRESETS[preset]["vocab_size"]))
    if not config_only:
        n = write_weights(out, cfg, dtype, seed)
        logger.info("%s: %s, %.1fM params (%s, seed %d)", out, preset, n / 1e6, dtype, seed)
    return out


def write_sharegpt(path: Path | str, n: int = 1000, seed: int = 0) -> Path:
    """A synthetic ShareGPT-format file, so that bench_serving's datasets run offline."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))
        return s[0].upper() + s[1:] + "."

    data = [{"id": f"synth-{k}", "conversations": [
        {"from": "human", "value": text(40, 400)}, {"from": "gpt", "value": text(20, 200)}]}
        for k in range(n)]
    path = Path(path)
    path.write_text(json.dumps(data))
    return path
