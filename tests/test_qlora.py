"""QLoRA: LoRA adapters trained over an mlx-lm quantized model (a 4-bit folder written by
mlx_lm.convert), its base frozen and packed; the memory estimate at the base's real size; an exact
resume from checkpoints that stand alone; and the merged export (dequantized, or quantized again)
loaded by mlx-lm with mlxllm's own logits."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, TokenizerConfig, load, lora, pretrained, runstate, train
from mlxllm import checkpoint as ckpt
from mlxllm import data as data_mod
from mlxllm.cli import app
from mlxllm.export import ExportOptions, export
from mlxllm.quant import QUANTIZED
from mlxllm.step import loss_fn

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_configs
from mlx.utils import tree_flatten
from typer.testing import CliRunner

mlx_lm = pytest.importorskip("mlx_lm", reason="the export extra (pip install '.[export]') is not installed")

TEXT = "Line 7: the quick brown fox jumps over 3 lazy dogs."
GROUP = 32  # not mlx-lm's default (64), so that a default taken for the real one would show
RANK = 4


@pytest.fixture(scope="module")
def q4(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-bit mlx-lm folder: a tiny mlxllm model (untied, so that lm_head is quantized too),
    exported, then quantized by mlx_lm.convert."""
    root = tmp_path_factory.mktemp("q4")
    m, t, _ = tiny_configs(corpus, root / "base", max_steps=10, eval_interval=10)
    tok = TokenizerConfig(kind="bpe", vocab_size=320)
    train(RunConfig(model=replace(m, tie_embeddings=False), tokenizer=tok, train=t), show_progress=False)
    hf = export(root / "base", root / "base-hf")
    mlx_lm.convert(str(hf), str(root / "q4"), quantize=True, q_bits=4, q_group_size=GROUP)
    return root / "q4"


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("other") / "other.txt"
    path.write_text("\n".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(3000)))
    return path


def _configs(other: Path, out: Path, init_from: Path, **overrides) -> RunConfig:
    settings = dict(max_steps=30, eval_interval=15, log_interval=1, lora_rank=RANK, learning_rate=1e-2)
    m, t, k = tiny_configs(other, out, init_from=str(init_from), **{**settings, **overrides})
    return RunConfig(model=m, tokenizer=k, train=t)


@pytest.fixture(scope="module")
def qlora(q4: Path, other: Path, tmp_path_factory: pytest.TempPathFactory):
    """A QLoRA run of 30 steps from the 4-bit folder: (its config, its result)."""
    run = _configs(other, tmp_path_factory.mktemp("qlora") / "run", q4)
    return run, train(run, show_progress=False)


def test_qlora_trains_adapters_over_the_frozen_quantized_base(q4, other, qlora):
    run, result = qlora
    t, run_dir = run.train, Path(run.train.out_dir)
    base, tok = load(q4)  # mlxllm's build of the folder: quantized, as mlx-lm builds it
    assert isinstance(base.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(base.lm_head, nn.QuantizedLinear) and base.lm_head.group_size == GROUP
    data = data_mod.prepare(str(other), TokenizerConfig(kind="hf"), tokenizer=tok, val_fraction=t.val_fraction)
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    batch = mx.array(data_mod.train_batch(data, t.seed, 0, t.batch_size, 64)[0])
    assert first["step"] == 1 and abs(first["loss"] - loss_fn(base, batch).item()) < 1e-5  # starts at the base
    val = [mx.array(b) for b in data_mod.eval_batches(data, t.batch_size, 64, t.eval_batches)]
    before = np.mean([loss_fn(base, b).item() for b in val])
    assert result.val_loss < before - 0.1, (before, result.val_loss)

    last = ckpt.latest_checkpoint(run_dir)
    saved = dict(mx.load(str(last / "model.safetensors")))
    start = dict(mx.load(str(q4 / "model.safetensors")))
    frozen = {n.replace(".base.", "."): w for n, w in saved.items() if "lora_" not in n}
    assert frozen.keys() == start.keys()
    assert saved["model.layers.0.mlp.down_proj.base.weight"].dtype == mx.uint32  # still packed: 4 bits a value
    for n in start:  # unchanged (scales and biases held in float32: the same values)
        assert mx.array_equal(frozen[n], start[n].astype(frozen[n].dtype)).item(), n
    assert any(mx.abs(w).max().item() > 0 for n, w in saved.items() if n.endswith(".lora_b"))  # the adapters learned
    assert set(mx.load(str(last / "optimizer.safetensors"))) <= {
        f"{n}.{s}" for n in saved if "lora_" in n for s in ("m", "v")
    } | {"step", "learning_rate"}
    layers = ckpt.read_state(last)["quantization"]["layers"]
    assert layers["model.layers.1.self_attn.k_proj.base"] == {"group_size": GROUP, "bits": 4, "mode": "affine"}
    assert {"model.embed_tokens", "lm_head"} <= layers.keys()


def test_memory_estimate_counts_the_quantized_base_at_its_size(q4, qlora):
    run, _ = qlora
    source = pretrained.find(q4)
    model = pretrained.build(source)
    lora.apply(model, RANK, run.train.lora_alpha)
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    run = replace(run, model=source.config)  # the shape training takes from the folder
    est = runstate.memory(run, 64, quantization=source.quantization)
    assert est["weights"] == held  # packed weights, float32 scales, biases and norms, and the adapters
    unquantized = runstate.memory(run, 64)
    assert est["weights"] < 0.3 * unquantized["weights"]
    assert est["optimizer"] == unquantized["optimizer"] == 2 * 4 * lora.trainable_params(run.model, RANK)


def test_qlora_resumes_exactly_without_its_init_folder(q4, other, qlora, tmp_path):
    straight, _ = qlora
    start = tmp_path / "q4-copy"
    shutil.copytree(q4, start)
    run = _configs(other, tmp_path / "split", start)
    first = train(run, show_progress=False, callback=lambda metrics: metrics["step"] >= 15)  # "crash" at 15
    assert first.step == 15 and first.stopped_by == "callback"
    shutil.rmtree(start)  # the checkpoint holds the quantized base: the folder is not read again
    with pytest.raises(MlxllmError, match="lora_rank = 4 and lora_alpha = 16.0, and this config has 8"):
        train(replace(run, train=replace(run.train, lora_rank=8)), show_progress=False, resume=True)
    assert train(run, show_progress=False, resume=True).step == 30

    a_dir, b_dir = ckpt.latest_checkpoint(Path(straight.train.out_dir)), ckpt.latest_checkpoint(tmp_path / "split")
    a, b = dict(mx.load(str(a_dir / "model.safetensors"))), dict(mx.load(str(b_dir / "model.safetensors")))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), atol=1e-6, rtol=0, err_msg=name)
    sa, sb = ckpt.read_state(a_dir), ckpt.read_state(b_dir)
    assert sa["val_loss"] == pytest.approx(sb["val_loss"], abs=1e-6) and sa["quantization"] == sb["quantization"]


def _logits(model: nn.Module, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


def test_the_merged_export_is_dequantized_and_mlx_lm_gives_our_logits(q4, qlora, tmp_path):
    run, _ = qlora
    run_dir = Path(run.train.out_dir)
    trained = pretrained.build(pretrained.find(q4))  # the model as training ran it: the 4-bit base + adapters
    lora.apply(trained, RANK, run.train.lora_alpha)
    trained.load_weights(list(mx.load(str(ckpt.choose(run_dir) / "model.safetensors")).items()))
    tok = load(q4)[1]
    ids = tok.encode(TEXT)
    merged, _ = load(run_dir)
    ours = _logits(merged, ids)
    assert not any(isinstance(m, QUANTIZED) for _, m in merged.named_modules())  # plain float32 weights
    assert np.abs(ours - _logits(trained, ids)).max() < 1e-4  # merging keeps what was trained, to rounding

    hf = export(run_dir, tmp_path / "merged")
    assert "quantization" not in json.loads((hf / "config.json").read_text())
    lm_model, lm_tok = mlx_lm.load(str(hf))
    assert lm_tok.encode(TEXT, add_special_tokens=False) == ids
    assert np.abs(_logits(lm_model, ids) - ours).max() < 1e-5
    card = (hf / "README.md").read_text()
    assert (
        "Weights: float32, not quantized" in card
        and f"frozen quantized base (4-bit, group size {GROUP}: QLoRA)" in card
    )
    assert "dequantized and the adapters merged into it." in card


def test_the_merged_export_quantized_again_loads_in_mlx_lm(q4, qlora, tmp_path):
    run, _ = qlora
    run_dir, out = Path(run.train.out_dir), tmp_path / "q"
    r = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), "--quantize", "4", "--group-size", "64"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
    }
    lm_model, _ = mlx_lm.load(str(out))
    q_proj = lm_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.bits, q_proj.group_size) == (4, 64)
    ids = load(q4)[1].encode(TEXT)
    theirs, merged = _logits(lm_model, ids), _logits(load(run_dir)[0], ids)
    assert np.abs(_logits(load(out)[0], ids) - theirs).max() < 1e-5  # mlxllm reads it back the same
    assert np.corrcoef(theirs.ravel(), merged.ravel())[0, 1] > 0.98  # 4-bit rounding: close, not equal
    card = (out / "README.md").read_text()
    assert "Weights: quantized to 4 bits, group size 64" in card and "merged into it, then quantized again." in card
    with pytest.raises(MlxllmError, match="--group-size must be one of 32, 64, 128"):
        ExportOptions(quantize=4, group_size=48)


def test_a_quantized_start_without_lora_is_refused_with_what_to_do(q4, other, tmp_path):
    run = _configs(other, tmp_path / "full", q4, lora_rank=0)
    with pytest.raises(MlxllmError, match=r"quantized \(4-bit, group size 32\).*train.lora_rank.*--dequantize"):
        train(run, show_progress=False)
    assert not (tmp_path / "full").exists()
