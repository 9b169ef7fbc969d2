"""mlxllm's tokenizers in Hugging Face's form: a `tokenizers` tokenizer.json with exactly our ids, and
the small tokenizer_config.json / special_tokens_map.json that transformers and mlx-lm read with it.

The sentencepiece BPE model becomes a `tokenizers` BPE model over the same pieces: the merges are
every split of a piece into two pieces of the vocabulary, ranked by the merged piece's id (the
order sentencepiece's BPE applies them), spaces become U+2581 as sentencepiece writes them, there
is no prefix space (trained with add_dummy_prefix=False), user-defined pieces ("\n") are added
tokens matched whole, and characters outside the vocabulary fall back to byte pieces. The byte
tokenizer becomes a byte-level model whose 256 tokens are the bytes in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlxllm.errors import MlxllmError
from mlxllm.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer
from mlxllm.tokenizer import Tokenizer as MlxllmTokenizer

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

SPACE = "\u2581"
EOS, UNK = "</s>", "<unk>"


def byte_level_chars() -> list[str]:
    """GPT-2's byte-level alphabet, which tokenizers' ByteLevel and llama.cpp use: the character that
    stands for each byte 0..255, in byte order. Printable Latin-1 bytes stand for themselves; the
    others (controls, space, 0x7f-0xa0, 0xad) get U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def _byte_tokenizer() -> Tokenizer:
    vocab = {c: i for i, c in enumerate(byte_level_chars())}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])  # id 256, as ours
    return tk


_KINDS = {1: "normal", 2: "unknown", 3: "control", 4: "user", 5: "unused", 6: "byte"}


def _pieces(tok: SentencePieceTokenizer) -> list[tuple[str, str]]:
    """(piece, kind) for every id: kind is normal, byte, control, unknown, user (user-defined) or unused."""
    try:  # sentencepiece's own proto types; they need the protobuf package (the export extra)
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise MlxllmError("Writing a tokenizer.json needs protobuf: pip install 'mlxllm[export]'.") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.proto)
    return [(p.piece, _KINDS.get(p.type, "normal")) for p in proto.pieces]


def _merges(pieces: list[tuple[str, str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for piece, kind in pieces:
        if kind != "normal" or len(piece) < 2:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(vocab[piece], vocab[a], vocab[b], a, b) for a, b in splits]
    return [(a, b) for *_, a, b in sorted(merges)]


def _sentencepiece_tokenizer(tok: SentencePieceTokenizer) -> Tokenizer:
    pieces = _pieces(tok)
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    bpe = models.BPE(vocab=vocab, merges=_merges(pieces, vocab), unk_token=UNK, byte_fallback=True, fuse_unk=True)
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Replace(" ", SPACE)
    tk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for p, k in pieces if k in ("unknown", "control")]
    )
    tk.add_tokens([AddedToken(p, special=False, normalized=False) for p, k in pieces if k == "user"])
    return tk


def to_tokenizers(tok: MlxllmTokenizer) -> Tokenizer:
    """A `tokenizers` Tokenizer that encodes and decodes exactly as tok does."""
    if isinstance(tok, ByteTokenizer):
        return _byte_tokenizer()
    if isinstance(tok, SentencePieceTokenizer):
        return _sentencepiece_tokenizer(tok)
    if isinstance(tok, HFTokenizer):  # an imported model's, kept as it came
        return Tokenizer.from_str(tok.text)
    raise TypeError(f"no tokenizer.json form for {type(tok).__name__}")


def write_tokenizer(tok: MlxllmTokenizer, directory: Path, *, max_len: int) -> list[Path]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and tokenizer.model for
    sentencepiece) into directory, as transformers 4 and 5 and mlx-lm read them."""
    directory = Path(directory)
    hf = to_tokenizers(tok)
    hf.save(str(directory / "tokenizer.json"))
    special: dict[str, Any] = {"eos_token": hf.id_to_token(tok.eos_id)}
    if isinstance(tok, SentencePieceTokenizer):
        special["unk_token"] = UNK
        (directory / "tokenizer.model").write_bytes(tok.proto)
    # Hand-written and minimal: the file transformers 5 writes (extra_special_tokens) breaks 4.x.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "bos_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    if isinstance(tok, HFTokenizer) and tok.chat:  # an imported model's chat template goes with it
        config.update({k: v for k, v in tok.chat.items() if k != "eos_token"})
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return [directory / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
