"""`mlxllm eval`: a model's loss on a corpus, the same as the run's own validation, its export's and mlx-lm's."""

import json
import math
from pathlib import Path

from mlxllm import RunConfig, train
from mlxllm.cli import app
from mlxllm.export import ExportOptions, export

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_corpus, tiny_configs
from typer.testing import CliRunner

SEQ = 64


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny byte-level run validated on a file of its own of 8 windows exactly: (run dir, val file, result)."""
    tmp = tmp_path_factory.mktemp("eval")
    val = tmp / "held_out.txt"
    val.write_text(make_corpus(100, seed=7)[: 8 * SEQ - 1] + "\n")  # 512 bytes, then the EOS
    m, t, k = tiny_configs(corpus, tmp / "run", max_steps=40, eval_interval=20, val_data=str(val))
    return tmp / "run", val, train(RunConfig(m, k, t), show_progress=False)


def test_eval_reproduces_the_runs_validation_loss_on_the_run_its_export_and_in_mlx_lm(trained, tmp_path: Path):
    run_dir, val, result = trained
    r = run("eval", str(run_dir), "--data", str(val), "--checkpoint", "latest", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert (got["tokens"], got["windows"], got["seq_len"], got["masked"]) == (8 * SEQ, 8, SEQ, False)
    assert got["loss"] == pytest.approx(result.val_loss, abs=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    assert got["bits_per_byte"] == pytest.approx(got["loss"] / math.log(2) / (512 / 513))  # EOS: a token, no byte

    hf = tmp_path / "export"
    export(run_dir, hf, ExportOptions(which="latest"))
    r = run("eval", str(hf), "--data", str(val), "--json")
    assert r.exit_code == 0, r.output
    exported = json.loads(r.stdout)
    assert exported["loss"] == pytest.approx(result.val_loss, abs=1e-4) and exported["tokens"] == 8 * SEQ

    from mlx_lm import load as mlx_lm_load

    model, _ = mlx_lm_load(str(hf))
    ids = np.array([*val.read_bytes(), 256])
    windows = np.stack([ids[i * SEQ : (i + 1) * SEQ + 1] for i in range(8)])
    logits = model(mx.array(windows[:, :-1])).astype(mx.float32)
    theirs = nn.losses.cross_entropy(logits, mx.array(windows[:, 1:]), reduction="mean").item()
    assert exported["loss"] == pytest.approx(theirs, abs=1e-4)


def test_eval_prints_a_summary_and_masks_jsonl_prompts(trained, tmp_path: Path):
    run_dir, _, _ = trained
    rows = [
        {"prompt": f"Question {i}: what is it?\nAnswer:", "completion": " The cat sees the red ball."}
        for i in range(60)
    ]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("eval", str(run_dir), "--data", str(qa))
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.stdout and "bits per byte" in r.stdout and "assistant turns only" in r.stdout
    masked = json.loads(run("eval", str(run_dir), "--data", str(qa), "--json").stdout)
    whole = json.loads(run("eval", str(run_dir), "--data", str(qa), "--json", "--no-mask-prompt").stdout)
    assert masked["masked"] and not whole["masked"]
    assert whole["tokens"] == whole["windows"] * SEQ and 0 < masked["tokens"] < whole["tokens"] / 2
    assert masked["windows"] == whole["windows"]


def test_eval_explains_bad_input_in_one_paragraph(trained, tmp_path: Path):
    run_dir, val, _ = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    cases = [
        ([str(tmp_path / "nope"), "--data", str(val)], "does not exist"),
        ([str(run_dir), "--data", str(tmp_path / "missing.txt")], "does not exist"),
        ([str(run_dir), "--data", str(empty)], "is empty"),
        ([str(run_dir), "--data", str(blank)], "holds no records"),
        ([str(run_dir), "--data", str(val), "--seq-len", "999"], "--seq-len"),
    ]
    for args, needle in cases:
        r = run("eval", *args)
        assert r.exit_code == 1 and needle in r.output, (args, r.output)
        assert r.output.startswith("Error:") and "Traceback" not in r.output
