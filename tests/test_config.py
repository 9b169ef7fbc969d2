from pathlib import Path

from mlxllm import MlxllmError, RunConfig, load_config
from mlxllm.config import dump_toml

import pytest

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny.toml", "shakespeare.toml", "small.toml"])
def test_shipped_configs_load_and_round_trip(name: str, tmp_path: Path):
    run = load_config(CONFIGS / name)
    assert isinstance(run, RunConfig) and run.model.d_model % run.model.n_heads == 0
    path = tmp_path / "again.toml"
    path.write_text(dump_toml(run))
    assert load_config(path) == run


def test_overrides_by_section_or_unique_key():
    run = load_config(
        None,
        [
            "model.n_layers=3",
            "learning_rate=5e-4",
            "train.data=notes/*.txt",
            "dtype=bfloat16",
            "max_seconds=none",
            "tie_embeddings=false",
        ],
    )
    assert run.model.n_layers == 3 and run.train.learning_rate == 5e-4
    assert run.train.data == "notes/*.txt" and run.train.dtype == "bfloat16"
    assert run.train.max_seconds is None and run.model.tie_embeddings is False


def test_unknown_keys_name_the_valid_ones(tmp_path: Path):
    with pytest.raises(MlxllmError, match="Unknown config key 'train.learnig_rate'.*learning_rate"):
        load_config(None, ["train.learnig_rate=1"])
    path = tmp_path / "typo.toml"
    path.write_text("[model]\nn_layer = 4\n")
    with pytest.raises(MlxllmError, match="Unknown model config key.*n_layer.*Valid keys:.*n_layers"):
        load_config(path)
    path.write_text("[modle]\nn_layers = 4\n")
    with pytest.raises(MlxllmError, match=r"Unknown config table.*\[modle\]"):
        load_config(path)
    path.write_text("[tokenizer]\nvocab = 4\n")
    with pytest.raises(MlxllmError, match="Unknown tokenizer config key.*vocab_size"):
        load_config(path)


def test_bad_files_are_explained(tmp_path: Path):
    with pytest.raises(MlxllmError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    path = tmp_path / "broken.toml"
    path.write_text("[model\n")
    with pytest.raises(MlxllmError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(MlxllmError, match="key=value"):
        load_config(None, ["n_layers"])
