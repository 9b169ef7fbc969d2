"""The Hugging Face Llama `config.json`, both ways: written so that mlx-lm and transformers build the
same model as mlxllm, and read back into a ModelConfig, refusing what mlxllm's decoder cannot be."""

from __future__ import annotations

from typing import Any

from mlxllm.config import ModelConfig
from mlxllm.errors import MlxllmError

# Keys whose value, when present and not null, must be this one, else the decoder differs from ours.
# Other keys are read below or do not change the model (token ids, dtypes, training-time settings).
_MUST_BE: dict[str, Any] = {
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "rope_scaling": None,
    "rope_traditional": False,
    "pretraining_tp": 1,
    "sliding_window": None,
    "use_sliding_window": False,
}


def to_hf(cfg: ModelConfig, *, dtype: str, eos_id: int) -> dict[str, Any]:
    """config.json for a Llama model with mlxllm's weights; every field mlx-lm and transformers read
    is written, so no default that differs between them decides anything."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        # transformers 5 reads rope_parameters; mlx-lm reads a top-level rope_theta (else 10000).
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        # Dropout changes training only. LlamaConfig's one field, attention_dropout, drops attention
        # probabilities, which mlxllm never does (its fused kernels do not hold them): 0. mlxllm's
        # dropout is GPT-2's residual and embedding dropout, written under GPT-2's names, which
        # transformers keeps as plain config attributes and mlx-lm ignores.
        "attention_dropout": 0.0,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        # transformers defaults bos to 1, which is </s> in mlxllm's vocabularies: there is no bos.
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": dtype,
        "dtype": dtype,  # transformers 4 reads the first, 5 the second
    }


def _unsupported(d: dict[str, Any]) -> list[str]:
    bad = [f"{k} = {d[k]!r}" for k, want in _MUST_BE.items() if d.get(k) is not None and d[k] != want]
    if d.get("model_type", "llama") != "llama":
        bad.append(f"model_type = {d['model_type']!r} (only llama)")
    archs = d.get("architectures") or ["LlamaForCausalLM"]
    if archs != ["LlamaForCausalLM"]:
        bad.append(f"architectures = {archs!r} (only LlamaForCausalLM)")
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        bad.append(f"rope_parameters.rope_type = {rope['rope_type']!r} (only default)")
    if any(t != "full_attention" for t in d.get("layer_types") or []):
        bad.append("layer_types other than full_attention")
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
    if d.get("head_dim") not in (None, (hidden // heads) if heads and hidden else None):
        bad.append(f"head_dim = {d['head_dim']} (mlxllm's is hidden_size / num_attention_heads)")
    return bad


def from_hf(d: dict[str, Any], where: str) -> ModelConfig:
    """The ModelConfig of a Llama config.json; anything mlxllm's decoder cannot represent is refused."""
    bad = _unsupported(d)
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if k not in d
    ]
    if missing or bad:
        raise MlxllmError(
            f"{where} describes a model mlxllm cannot load: "
            + "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + bad)
            + ". mlxllm reads Llama models without biases or rope scaling (model_type llama, LlamaForCausalLM)."
        )
    rope = d.get("rope_parameters") or {}
    return ModelConfig(
        vocab_size=d["vocab_size"],
        n_layers=d["num_hidden_layers"],
        d_model=d["hidden_size"],
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads"),
        ffn_dim=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings") or 2048,
        rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        # mlxllm's own dropout, as to_hf writes it; another model's attention_dropout (on probabilities,
        # which mlxllm cannot drop) is not taken for it.
        dropout=d.get("resid_pdrop") or 0.0,
    )


def generation_config(eos_id: int) -> dict[str, Any]:
    return {
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
    }
