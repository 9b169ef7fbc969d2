"""Write an mlxllm model and its tokenizer as one GGUF file that llama.cpp runs (architecture `llama`).

The decoder already is Llama's (parameter names, RMSNorm, SwiGLU, rotate-half RoPE, grouped-query
attention), so the export is a renaming, plus two things llama.cpp does its own way:

- RoPE: llama.cpp's `llama` graph rotates adjacent pairs (x[2i], x[2i+1]), Hugging Face's and ours
  rotate x[i] with x[i + head_dim/2]. llama.cpp's own converter (convert_hf_to_gguf.py,
  `LlamaModel.permute`) therefore reorders the rows of q_proj and k_proj within each head; we do the same.
- Tokenizers: the sentencepiece BPE model is written as llama.cpp's `llama` (SPM) vocabulary, the
  byte tokenizer as a byte-level `gpt2` vocabulary without merges; both tokenize to exactly our ids.

Needs the `gguf` package (the export extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxllm.errors import MlxllmError
from mlxllm.hf_tokenizer import byte_level_chars
from mlxllm.model import Transformer
from mlxllm.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

try:
    import gguf
except ImportError:  # pragma: no cover - the error names the fix
    raise MlxllmError("Writing GGUF needs the gguf package: pip install 'mlxllm[export]' (or gguf).") from None

__all__ = ["GGUF_DTYPES", "gguf_tensor_name", "permute_rope_rows", "unpermute_rope_rows", "write_gguf"]

GGUF_DTYPES = ("float32", "float16", "bfloat16")
_FILE_TYPES = {
    "float32": gguf.LlamaFileType.ALL_F32,
    "float16": gguf.LlamaFileType.MOSTLY_F16,
    "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
}

# Our (Hugging Face Llama) module names -> GGUF's; llama.cpp finds tensors by these names only.
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}

# The byte tokenizer's end-of-document token; GPT-2's name for it, which llama.cpp also knows as end-of-generation.
_BYTE_EOS_TEXT = "<|endoftext|>"


def gguf_tensor_name(name: str) -> str:
    """The GGUF name of one of our parameters, e.g. model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
    module, _, leaf = name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{leaf}"
    parts = module.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}.{leaf}"
    raise MlxllmError(f"No GGUF name for parameter {name!r}: the model is not the Llama layout this export knows.")


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q_proj/k_proj (n_heads * head_dim, d_in) in llama.cpp's RoPE order.

    Per head, row i of the first half and row i of the second half (a rotate-half pair) become rows
    2i and 2i+1 (an adjacent pair), which is the pair llama.cpp rotates. Same as convert_hf_to_gguf.py."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_rope_rows`: a GGUF attn_q/attn_k back in our (Hugging Face) row order."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Writer(gguf.GGUFWriter):
    """A GGUFWriter that can also write an empty array.

    A byte-level vocabulary has no merges, llama.cpp refuses a `gpt2` vocabulary without the merges
    key, and the gguf package refuses to write an empty array (llama.cpp reads one fine)."""

    def _pack_val(
        self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type: gguf.GGUFValueType | None = None
    ) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _add_model_metadata(w: gguf.GGUFWriter, model: Transformer, dtype: str) -> None:
    cfg = model.config
    w.add_file_type(_FILE_TYPES[dtype])
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    # llama.cpp derives head_dim as d_model / n_heads, as we do; written anyway so no reader must guess.
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)  # RoPE turns the whole head
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)


def _add_tensors(w: gguf.GGUFWriter, model: Transformer, dtype: str) -> None:
    cfg = model.config
    for name, p in sorted(tree_flatten(model.parameters())):
        x = np.array(p.astype(mx.float32))  # numpy has no bfloat16; float32 holds every weight exactly
        if name.endswith("self_attn.q_proj.weight"):
            x = permute_rope_rows(x, cfg.n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            x = permute_rope_rows(x, cfg.kv_heads)
        # numpy's (out, in) row-major order is ggml's (ne0 = in, ne1 = out); the writer reverses the shape.
        # Norm weights stay float32, as llama.cpp's converter keeps all 1-D tensors.
        if x.ndim == 1 or dtype == "float32":
            w.add_tensor(gguf_tensor_name(name), x)
        elif dtype == "float16":
            w.add_tensor(gguf_tensor_name(name), x.astype(np.float16))
        else:
            bf16 = gguf.GGMLQuantizationType.BF16
            w.add_tensor(gguf_tensor_name(name), gguf.quants.quantize(x, bf16), raw_dtype=bf16)


def _check_vocab(n_tokens: int, vocab_size: int) -> None:
    # Training sets the model's vocab_size from its tokenizer; a mismatch means the two do not belong together.
    if n_tokens != vocab_size:
        raise MlxllmError(
            f"The tokenizer has {n_tokens} tokens but the model {vocab_size} embeddings: "
            "export a model with the tokenizer it was trained with."
        )


def _add_sentencepiece_vocab(w: gguf.GGUFWriter, tok: SentencePieceTokenizer, vocab_size: int) -> None:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto.FromString(tok.proto)
    kind = sp_pb2.ModelProto.SentencePiece.Type
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    # sentencepiece's piece types and GGUF's token types share their names (NORMAL, BYTE, USER_DEFINED...).
    # Keeping "\n" USER_DEFINED makes llama.cpp split it off before merging, as sentencepiece does.
    types = [int(gguf.TokenType[kind.Name(p.type)]) for p in proto.pieces]
    _check_vocab(len(tokens), vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.sp.unk_id())
    # Our training text has no bos and no space prefix, and the normalizer keeps whitespace as it is.
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_remove_extra_whitespaces(False)


def _add_byte_vocab(w: gguf.GGUFWriter, tok: ByteTokenizer, vocab_size: int) -> None:
    # A byte-level BPE without merges: llama.cpp maps each text byte to its byte-level character, and with
    # nothing to merge every character is its own token, so byte i -> id i. A SPM vocabulary of <0xNN>
    # pieces would not do: llama.cpp's SPM turns a space into "▁" (three bytes) before tokenizing.
    tokens = [c.encode("utf-8") for c in byte_level_chars()] + [_BYTE_EOS_TEXT.encode()]
    types = [int(gguf.TokenType.NORMAL)] * 256 + [int(gguf.TokenType.CONTROL)]
    _check_vocab(len(tokens), vocab_size)
    w.add_tokenizer_model("gpt2")
    # With no merges the pre-tokenizer's splitting cannot change the ids. "qwen2" is one whose llama.cpp
    # setting also turns off the detokenizer's clean-up of spaces before punctuation (" ." -> "."), which
    # the "default" one keeps on and which would make llama_detokenize change the text.
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    # No bos is ever used; it is set to eos, as GPT-2 does, because llama.cpp's gpt2 default (id 11) is a byte.
    w.add_bos_token_id(tok.eos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def write_gguf(
    model: Transformer, tokenizer: Tokenizer, path: str | Path, *, dtype: str = "float32", name: str | None = None
) -> Path:
    """Write `model` and `tokenizer` to `path` as a GGUF file for llama.cpp; returns the path.

    dtype: float32 (exact), float16 or bfloat16 for the matrices; norm weights are always float32.
    name: general.name in the file (default: the file's stem)."""
    if dtype not in GGUF_DTYPES:
        raise MlxllmError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)} (got {dtype!r}).")
    if isinstance(tokenizer, SentencePieceTokenizer):
        add_vocab: Any = _add_sentencepiece_vocab
    elif isinstance(tokenizer, ByteTokenizer):
        add_vocab = _add_byte_vocab
    else:
        raise MlxllmError(
            f"Cannot write a {type(tokenizer).__name__} to GGUF: only the bpe and byte tokenizers are supported."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = _Writer(str(path), "llama")
    w.add_name(name or path.stem)
    _add_model_metadata(w, model, dtype)
    add_vocab(w, tokenizer, model.config.vocab_size)
    _add_tensors(w, model, dtype)  # held in memory until written: no file exists before this point
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException:
        w.close()
        path.unlink(missing_ok=True)  # never leave a half-written file that looks like a model
        raise
    return path
