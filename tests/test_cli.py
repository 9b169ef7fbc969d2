import json
from pathlib import Path

from mlxllm.cli import app

import pytest
from typer.testing import CliRunner

TINY = [
    "--set",
    "model.n_layers=2",
    "--set",
    "model.d_model=64",
    "--set",
    "model.n_heads=4",
    "--set",
    "model.n_kv_heads=2",
    "--set",
    "model.max_seq_len=64",
    "--set",
    "tokenizer.kind=byte",
    "--set",
    "batch_size=8",
    "--set",
    "eval_batches=4",
    "--set",
    "learning_rate=3e-3",
    "--set",
    "warmup_steps=10",
]


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    # CliRunner catches what escapes: only typer.Exit (SystemExit, a user error's exit 1) may.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_train_resume_and_generate(corpus: Path, tmp_path: Path):
    out = tmp_path / "run"
    r = run(
        "train",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--steps",
        "60",
        "--set",
        "eval_interval=30",
        "--set",
        "sample_tokens=40",
        "--set",
        "sample_prompt=The",
        *TINY,
    )
    assert r.exit_code == 0, r.output
    assert "step 30" in r.output and "val" in r.output and "Sample:" in r.output and "Training summary" in r.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 60 and "val_bpb" in metrics[-1]

    r = run("train", "--data", str(corpus), "--out", str(out), "--steps", "60", *TINY)
    assert r.exit_code == 1 and "already holds a training run" in r.output

    r = run(
        "train",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--steps",
        "90",
        "--set",
        "eval_interval=30",
        "--set",
        "sample_tokens=0",
        "--resume",
        *TINY,
    )
    assert r.exit_code == 0, r.output
    assert "resuming at step 60" in r.output and "step 90" in r.output

    r = run("generate", str(out), "--prompt", "A dog", "--max-tokens", "30", "--temperature", "0")
    assert r.exit_code == 0 and r.output.startswith("A dog") and len(r.output) > 20


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "/nonexistent/corpus.txt"], "does not exist"),
        (["--set", "model.d_model=100", "--set", "model.n_heads=3"], "divisible by n_heads"),
        (["--set", "model.n_heads=4", "--set", "model.n_kv_heads=3"], "multiple of n_kv_heads"),
        (["--set", "train.batch_sise=4"], "Unknown config key"),
        (["--config", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_paragraph(args, needle, corpus: Path, tmp_path: Path):
    base = ["train", "--out", str(tmp_path / "bad"), *TINY]
    if "--data" not in args:
        base += ["--data", str(corpus)]
    r = run(*base, *args)
    assert r.exit_code == 1 and needle in r.output
    assert r.output.startswith("Error:")


def test_bad_corpus_files(tmp_path: Path):
    for name, content, needle in [
        ("empty.txt", b"", "is empty"),
        ("bin.txt", b"\x00\x01\x02", "binary"),
        ("latin.txt", b"caf\xe9\n", "not valid UTF-8"),
        ("short.txt", b"Too short.\n", "too short"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        r = run("train", "--data", str(path), "--out", str(tmp_path / ("run-" + name)), *TINY)
        assert r.exit_code == 1 and needle in r.output, r.output
        assert not (tmp_path / ("run-" + name) / "checkpoints").exists()


def test_info_names_the_blas():
    r = run("info")
    assert r.exit_code == 0 and "BLAS:" in r.output and "GFLOP/s" in r.output
    assert "training streams" in r.output


def test_generate_needs_a_run(tmp_path: Path):
    r = run("generate", str(tmp_path))
    assert r.exit_code == 1 and "no checkpoint" in r.output


def test_error_text_keeps_brackets(tmp_path: Path):
    path = tmp_path / "typo.toml"
    path.write_text("[modle]\nn_layers = 2\n")
    r = run("train", "--config", str(path), "--out", str(tmp_path / "x"))
    assert r.exit_code == 1 and "[modle]" in r.output and "[model]" in r.output
