"""Export to mlx-lm / Hugging Face, and back in: equal logits and ids in mlx-lm and transformers, the
mlx-lm tools on an export, fine-tuning from an export, and bad input refused with nothing written."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, TokenizerConfig, load, train
from mlxllm import data as data_mod
from mlxllm.cli import app
from mlxllm.export import ExportOptions, export
from mlxllm.generate import generate_ids
from mlxllm.step import loss_fn

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_configs
from typer.testing import CliRunner

mlx_lm = pytest.importorskip("mlx_lm", reason="the export extra (pip install '.[export]') is not installed")
transformers = pytest.importorskip("transformers", reason="the export extra (pip install '.[export]') is not installed")
torch = pytest.importorskip("torch", reason="PyTorch (CPU) is not installed; .ci/run installs it")

TEXT = "def f(x):\n    return {'ü': x  +  1}   # naïve café — 日本語 🎉🐍\n\n\tend  \n"
# (tokenizer, tied embeddings, KV heads of 4): every kind of each, tied and untied, GQA and not.
CASES = [("bpe", True, 2), ("bpe", False, 4), ("byte", False, 2), ("byte", True, 4)]


@pytest.fixture(scope="module")
def exports(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, tuple[Path, Path]]:
    """(run directory, fp32 export) per case, each trained for a few steps."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for kind, tied, kv in CASES:
        name = f"{kind}-{'tied' if tied else 'untied'}-kv{kv}"
        m, t, _ = tiny_configs(corpus, root / name, max_steps=10, eval_interval=10)
        m = replace(m, n_kv_heads=kv, tie_embeddings=tied)
        train(RunConfig(model=m, tokenizer=TokenizerConfig(kind=kind, vocab_size=320), train=t), show_progress=False)
        out[(kind, tied, kv)] = (root / name, export(root / name, root / f"{name}-hf"))
    return out


def _ours(run: Path, ids: list[int]) -> np.ndarray:
    model, _ = load(run)
    return np.array(model(mx.array([ids])).astype(mx.float32))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'tied' if c[1] else 'untied'}-kv{c[2]}")
def test_mlx_lm_and_transformers_give_our_logits_ids_and_greedy_text(exports, case):
    run, hf = exports[case]
    _, tok = load(run)
    ids = tok.encode(TEXT)
    ours = _ours(run, ids)

    lm_model, lm_tok = mlx_lm.load(str(hf))
    assert lm_tok.encode(TEXT, add_special_tokens=False) == ids
    assert lm_tok.decode(ids) == TEXT
    assert np.abs(np.array(lm_model(mx.array([ids]))) - ours).max() < 1e-5

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    assert hf_tok.encode(TEXT, add_special_tokens=False) == ids and hf_tok.decode(ids) == TEXT
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits.numpy()
    assert np.abs(logits - ours).max() < 1e-5

    prompt = ids[:12]
    model, _ = load(run)
    want = generate_ids(model, prompt, 16, temperature=0)
    with torch.no_grad():
        got = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=tok.eos_id
        )[0, len(prompt) :].tolist()
    assert got == want
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt), lm_model, max_tokens=16)
    assert [int(t) for t, _ in steps] == want


def test_export_writes_every_file_and_a_model_card(exports):
    run, hf = exports[("bpe", True, 2)]
    names = {p.name for p in hf.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "loss_curves.png",
    } <= names
    config = json.loads((hf / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and config["bos_token_id"] is None
    card = (hf / "README.md").read_text()
    assert "2 layers x 64" in card and "bits per byte" in card and "loss_curves.png" in card


def test_mlx_lm_generate_server_and_convert_on_an_export(exports, tmp_path):
    _, hf = exports[("bpe", True, 2)]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(hf),
            "--prompt",
            "The cat",
            "--max-tokens",
            "8",
            "--temp",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr

    q = tmp_path / "q4"
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(hf), "--mlx-path", str(q), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    model, tok = mlx_lm.load(str(q))
    assert len(mlx_lm.generate(model, tok, "The cat", max_tokens=8)) > 0

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(hf), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = json.dumps({"prompt": "The cat", "max_tokens": 8, "temperature": 0}).encode()
        deadline, reply = time.monotonic() + 60, None
        while reply is None and time.monotonic() < deadline and server.poll() is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
                )
                reply = json.loads(urllib.request.urlopen(req, timeout=10).read())
            except OSError:
                time.sleep(0.5)
        assert reply is not None, "mlx_lm.server did not answer within 60 s"
        assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] > 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_quantized_export_loads_in_mlx_lm_and_mlxllm(exports, tmp_path):
    run, _ = exports[("byte", False, 2)]
    q = export(run, tmp_path / "q8", ExportOptions(quantize=8))
    assert json.loads((q / "config.json").read_text())["quantization"]["bits"] == 8
    model, tok = mlx_lm.load(str(q))
    ids = tok.encode("The cat", add_special_tokens=False)
    ours = _ours(run, ids)
    assert np.abs(np.array(model(mx.array([ids]))) - ours).max() < 0.5  # 8-bit weights: close, not equal
    ours_q, _ = load(q)
    assert np.allclose(np.array(ours_q(mx.array([ids]))), np.array(model(mx.array([ids]))), atol=1e-5)


def test_fine_tuning_from_an_export_continues_its_weights_and_learns(exports, tmp_path):
    _, hf = exports[("bpe", True, 2)]
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(3000)))
    m, t, k = tiny_configs(other, tmp_path / "ft", max_steps=30, eval_interval=30, log_interval=1, init_from=str(hf))
    result = train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)

    model, tok = load(hf)
    data = data_mod.prepare(str(other), TokenizerConfig(kind="hf"), tokenizer=tok, val_fraction=t.val_fraction)
    batch = mx.array(data_mod.train_batch(data, t.seed, 0, t.batch_size, 64)[0])
    first = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and abs(first["loss"] - loss_fn(model, batch).item()) < 1e-5

    val = [mx.array(b) for b in data_mod.eval_batches(data, t.batch_size, 64, t.eval_batches)]
    before = np.mean([loss_fn(model, b).item() for b in val])
    assert result.val_loss < before - 0.1, (before, result.val_loss)
    assert load(tmp_path / "ft")[1].encode(TEXT) == tok.encode(TEXT)  # the run keeps the model's tokenizer
    again = export(tmp_path / "ft", tmp_path / "ft-hf")  # and exports again with it
    assert mlx_lm.load(str(again))[1].encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)


def test_gguf_export_writes_one_llama_file(exports, tmp_path):
    gguf = pytest.importorskip("gguf", reason="the export extra (pip install '.[export]') is not installed")
    run, _ = exports[("bpe", False, 4)]
    out = export(run, tmp_path / "gguf", ExportOptions(format="gguf", dtype="float16"))
    assert [p.name for p in out.iterdir()] == ["model.gguf"]
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "output.weight", "blk.1.attn_q.weight"}


def _fails(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    # A user error exits 1 through typer.Exit (SystemExit); anything else escaping is a bug.
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "Error:" in result.output
    return result.output


def test_bad_init_from_is_refused_with_nothing_written(exports, corpus, tmp_path):
    _, hf = exports[("byte", True, 4)]
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    assert "is not a model" in _fails(
        ["train", "--init-from", str(tmp_path / "empty"), "--data", str(corpus), "--out", str(out)]
    )
    wrong = tmp_path / "wrong-tokenizer"
    shutil.copytree(hf, wrong)
    bpe_hf = exports[("bpe", True, 2)][1]
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(bpe_hf / name, wrong / name)  # 320 pieces for embeddings of 257 rows
    assert "do not belong together" in _fails(
        ["train", "--init-from", str(wrong), "--data", str(corpus), "--out", str(out)]
    )
    mistral = tmp_path / "mistral"
    shutil.copytree(hf, mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "attention_bias": True}))
    message = _fails(["train", "--init-from", str(mistral), "--data", str(corpus), "--out", str(out)])
    assert "model_type" in message and "attention_bias" in message
    assert not out.exists()
    with pytest.raises(MlxllmError, match="not empty"):
        export(exports[("bpe", True, 2)][0], bpe_hf)
    assert (bpe_hf / "model.safetensors").exists()


def test_a_llama_saved_by_transformers_loads_with_equal_logits(exports, tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=256,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(str(tmp_path / "llama"))
    byte_hf = exports[("byte", True, 4)][1]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(byte_hf / name, tmp_path / "llama" / name)
    model, tok = load(tmp_path / "llama")
    ids = tok.encode(TEXT)
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits.numpy()
    assert np.abs(np.array(model(mx.array([ids]))) - want).max() < 1e-5


def test_lora_fine_tuning_trains_adapters_only_and_merges_on_load_and_export(exports, tmp_path):
    from mlxllm import lora, pretrained

    from mlx.utils import tree_flatten

    _, hf = exports[("bpe", False, 4)]
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(3000)))
    m, t, k = tiny_configs(
        other, tmp_path / "lora", max_steps=30, eval_interval=15, init_from=str(hf), lora_rank=4, learning_rate=1e-2
    )
    result = train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    last = max((tmp_path / "lora" / "checkpoints").iterdir())
    saved = dict(mx.load(str(last / "model.safetensors")))
    start = dict(mx.load(str(hf / "model.safetensors")))
    base = {n.replace(".base.weight", ".weight"): w for n, w in saved.items() if not n.endswith((".lora_a", ".lora_b"))}
    assert base.keys() == start.keys() and all(mx.array_equal(base[n], start[n]).item() for n in start)  # frozen
    assert any(mx.abs(w).max().item() > 0 for n, w in saved.items() if n.endswith(".lora_b"))  # the adapters learned
    assert set(mx.load(str(last / "optimizer.safetensors"))) <= {
        f"{n}.{s}" for n in saved if "lora_" in n for s in ("m", "v")
    } | {"step", "learning_rate"}

    adapted = pretrained.build(pretrained.find(hf))  # the model as training ran it: frozen weights + adapters
    lora.apply(adapted, 4, t.lora_alpha)
    adapted.load_weights(list(saved.items()))
    ids = load(hf)[1].encode(TEXT)
    want = np.array(adapted(mx.array([ids])))
    merged, _ = load(tmp_path / "lora")
    assert np.abs(np.array(merged(mx.array([ids]))) - want).max() < 1e-4
    lm_model, _ = mlx_lm.load(str(export(tmp_path / "lora", tmp_path / "lora-hf")))
    assert np.abs(np.array(lm_model(mx.array([ids]))) - want).max() < 1e-4
    assert len(tree_flatten(merged.parameters())) == len(start)  # plain Llama weights, no adapters left


def test_lora_without_a_pretrained_model_is_refused(corpus, tmp_path):
    with pytest.raises(MlxllmError, match="lora_rank needs init_from"):
        tiny_configs(corpus, tmp_path / "x", lora_rank=4)
