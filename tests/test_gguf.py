"""GGUF export: the file reads back to the model exactly, and llama.cpp tokenizes, computes and
continues exactly as mlxllm does, for both tokenizers, tied and untied, with and without GQA.

The llama.cpp tests need llama-cpp-python, which has no CPU wheel on PyPI for every platform; built
from source (about 10 minutes on 2 cores) with:
    pip install scikit-build-core
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" pip install --no-build-isolation llama-cpp-python
Without it they are skipped.
"""

from __future__ import annotations

from pathlib import Path

from mlxllm import MlxllmError, ModelConfig, TokenizerConfig
from mlxllm.generate import generate_ids
from mlxllm.model import Transformer, build_model
from mlxllm.tokenizer import ByteTokenizer, Tokenizer, train_tokenizer

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_corpus
from mlx.utils import tree_flatten

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install gguf)")

from mlxllm.gguf import gguf_tensor_name, unpermute_rope_rows, write_gguf  # noqa: E402
from mlxllm.hf_tokenizer import byte_level_chars  # noqa: E402

NEEDS_LLAMA_CPP = "llama.cpp checks need llama-cpp-python (built from source, see tests/test_gguf.py)"

# Code, accents, CJK, emoji (with a skin-tone modifier), tabs, runs of spaces, blank lines, a space
# before punctuation (which llama.cpp's default detokenizer would "clean up"), and text that looks
# like special tokens but must stay plain text.
TEXT = (
    "def square(x):\n    return x ** 2  # 2 spaces before the comment\n\n"
    '\tcafé naïve façade Ωμέγα 日本語 😀👍🏽 it \'s "quoted" , odd .   end\n'
    "windows\r\nline 👩\u200d💻 ✓ \u00a0nbsp ﬁ\n"
    "</s> <unk> <0x41> <|endoftext|>     \n\n\n  trailing  "
)
# Besides the grammar, some code and Unicode so that the BPE has multi-space and non-ASCII pieces.
EXTRA_LINES = [
    "def square(x):",
    "    return x * x",
    "        if x > 10:",
    "\tprint('tab')",
    "café naïve façade",
    "Ωμέγα αλφα",
    "日本語のテキスト",
    "emoji 😀 😀 👍",
    "a  b   c    d",
] * 20

CASES = [  # (tokenizer kind, tied embeddings, n_kv_heads of 4 heads)
    pytest.param("bpe", True, 2, id="bpe-tied-gqa"),
    pytest.param("bpe", False, 4, id="bpe-untied-mha"),
    pytest.param("byte", False, 1, id="byte-untied-mqa"),
    pytest.param("byte", True, 4, id="byte-tied-mha"),
]
MAX_SEQ_LEN = 512  # a multiple of 256, which llama.cpp rounds its context up to


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    lines = make_corpus(400).splitlines() + EXTRA_LINES
    return train_tokenizer(iter(lines), TokenizerConfig(kind="bpe", vocab_size=360))


def _tokenizer(kind: str, bpe: Tokenizer) -> Tokenizer:
    return bpe if kind == "bpe" else ByteTokenizer()


def _model(vocab_size: int, tied: bool, kv_heads: int, seed: int = 3) -> Transformer:
    cfg = ModelConfig(
        vocab_size=vocab_size,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=kv_heads,
        max_seq_len=MAX_SEQ_LEN,
        tie_embeddings=tied,
        rope_theta=5000.0,
        norm_eps=1e-6,
    )
    model = build_model(cfg, seed=seed)
    # Livelier than a fresh init, and every norm different, so a swapped or misnamed tensor shows.
    new = {}
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        key = mx.random.key(100 + i)
        if name.endswith("norm.weight"):
            new[name] = 1 + 0.2 * mx.random.normal(p.shape, key=key)
        elif "embed_tokens" in name or "lm_head" in name:
            new[name] = 0.5 * mx.random.normal(p.shape, key=key)
        else:  # large enough that greedy decoding does not settle on repeating one token
            new[name] = (0.1 if "self_attn" in name else 0.2) * mx.random.normal(p.shape, key=key)
    model.load_weights(list(new.items()))
    mx.eval(model.parameters())
    return model


def _params(model: Transformer) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _field(reader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("kind,tied,kv_heads", CASES)
def test_gguf_reads_back_to_the_model(kind: str, tied: bool, kv_heads: int, bpe: Tokenizer, tmp_path: Path):
    tok = _tokenizer(kind, bpe)
    model = _model(tok.vocab_size, tied, kv_heads)
    cfg = model.config
    reader = gguf.GGUFReader(write_gguf(model, tok, tmp_path / "m.gguf"))
    expected = {
        "general.architecture": "llama",
        "general.name": "m",
        "general.file_type": 0,
        "llama.context_length": MAX_SEQ_LEN,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": tok.vocab_size,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == 5000.0
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size
    if kind == "bpe":
        sp = tok.sp
        assert _field(reader, "tokenizer.ggml.model") == "llama"
        assert tokens == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        assert _field(reader, "tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(len(tokens))])
        types = _field(reader, "tokenizer.ggml.token_type")
        assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED]
        byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        assert [i for i, t in enumerate(types) if t == gguf.TokenType.BYTE] == byte_ids
        assert _field(reader, "tokenizer.ggml.add_space_prefix") is False
        assert "tokenizer.ggml.bos_token_id" not in reader.fields
    else:
        assert _field(reader, "tokenizer.ggml.model") == "gpt2"
        assert tokens == byte_level_chars() + ["<|endoftext|>"]
        assert _field(reader, "tokenizer.ggml.merges") == []

    params = _params(model)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    assert {gguf_tensor_name(n) for n in params} == {t.name for t in reader.tensors}
    assert ("output.weight" in {t.name for t in reader.tensors}) == (not tied)  # tied: llama.cpp reuses token_embd
    for name, want in params.items():
        assert gguf_tensor_name(name) == tmap.get_name(name, try_suffixes=(".weight",))  # gguf-py's own map
        t = next(t for t in reader.tensors if t.name == gguf_tensor_name(name))
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(n) for n in t.shape] == list(reversed(want.shape))  # ggml lists the fastest axis first
        got = np.asarray(t.data).reshape(want.shape)
        if "q_proj" in name:
            got = unpermute_rope_rows(got, cfg.n_heads)
        elif "k_proj" in name:
            got = unpermute_rope_rows(got, cfg.kv_heads)
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("dtype,qtype", [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_precision_matrices_round_once_and_norms_stay_float32(dtype: str, qtype: str, tmp_path: Path):
    model = _model(257, False, 2)
    reader = gguf.GGUFReader(write_gguf(model, ByteTokenizer(), tmp_path / "h.gguf", dtype=dtype))
    params = _params(model)
    for t in reader.tensors:
        name = next(n for n in params if gguf_tensor_name(n) == t.name)
        want = params[name]
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType[qtype]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            got = unpermute_rope_rows(got, 4 if "q_proj" in name else 2)
        rounded = np.array(mx.array(want).astype(getattr(mx, dtype)).astype(mx.float32))
        np.testing.assert_array_equal(got, rounded, err_msg=name)


def test_a_bfloat16_model_is_written_exactly(tmp_path: Path):
    model = _model(257, True, 2)
    model.set_dtype(mx.bfloat16)  # as trained with train.dtype = "bfloat16"
    want = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    for dtype in ("float32", "bfloat16"):
        reader = gguf.GGUFReader(write_gguf(model, ByteTokenizer(), tmp_path / f"{dtype}.gguf", dtype=dtype))
        t = next(t for t in reader.tensors if t.name == "token_embd.weight")
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want["model.embed_tokens.weight"].shape)
        np.testing.assert_array_equal(got, want["model.embed_tokens.weight"])


def test_bad_dtype_and_a_foreign_tokenizer_are_refused(tmp_path: Path):
    with pytest.raises(MlxllmError, match="float16"):
        write_gguf(_model(257, True, 4), ByteTokenizer(), tmp_path / "x.gguf", dtype="int8")
    with pytest.raises(MlxllmError, match="257 tokens but the model 300"):
        write_gguf(_model(300, True, 4), ByteTokenizer(), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def _llama(path: Path, llama_cpp):
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=MAX_SEQ_LEN,
        n_batch=MAX_SEQ_LEN,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        flash_attn=False,
    )


def _llama_detokenize(llm, ids: list[int], llama_cpp) -> bytes:
    """llama.cpp's own whole-sequence detokenizer (the one with its space clean-up), not a piece loop."""
    buf = (llama_cpp.ctypes.c_char * 4096)()
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, len(buf), False, False)
    assert n >= 0
    return bytes(buf[:n])


@pytest.mark.parametrize("kind,tied,kv_heads", CASES)
def test_llama_cpp_tokenizes_computes_and_continues_as_mlxllm(
    kind: str, tied: bool, kv_heads: int, bpe: Tokenizer, tmp_path: Path
):
    llama_cpp = pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    tok = _tokenizer(kind, bpe)
    model = _model(tok.vocab_size, tied, kv_heads)
    llm = _llama(write_gguf(model, tok, tmp_path / "m.gguf"), llama_cpp)

    assert (llm.n_vocab(), llm._model.n_ctx_train(), llm.token_eos()) == (tok.vocab_size, MAX_SEQ_LEN, tok.eos_id)
    assert llm.detokenize([tok.eos_id]) == b""  # a control token: not text

    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) + 40 <= MAX_SEQ_LEN
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == ids  # the file asks for no bos
    assert llm.detokenize(ids).decode() == TEXT
    assert _llama_detokenize(llm, ids, llama_cpp).decode() == TEXT

    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    want = np.array(model(mx.array([ids]))[0])
    diff = float(np.abs(got - want).max())
    print(
        f"\n[{kind}, {'tied' if tied else 'untied'}, kv_heads={kv_heads}] {len(ids)} tokens, "
        f"max |logit| {np.abs(want).max():.2f}, max |llama.cpp - mlxllm| {diff:.2e}"
    )
    assert diff < 1e-4

    prompt = ids[:24]
    ours = generate_ids(model, prompt, 40, temperature=0)
    theirs = []
    for t in llm.generate(prompt, temp=0.0, reset=True):
        theirs.append(t)
        if len(theirs) == 40:
            break
    assert theirs == ours and len(set(ours)) > 3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_llama_cpp_runs_half_precision_files(dtype: str, bpe: Tokenizer, tmp_path: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    model = _model(bpe.vocab_size, False, 2)
    llm = _llama(write_gguf(model, bpe, tmp_path / "h.gguf", dtype=dtype), llama_cpp)
    ids = bpe.encode(TEXT)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    want = np.array(model(mx.array([ids]))[0])
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    print(f"\n[{dtype}] max |logit| {scale:.2f}, max |llama.cpp - mlxllm float32| {diff:.2e}")
    # Rounding the weights (and, in llama.cpp, the activations) to 16 bits: a few percent at most.
    assert diff < 0.05 * scale
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    assert agree > 0.9
