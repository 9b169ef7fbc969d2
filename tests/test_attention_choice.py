"""Which attention a model runs: recorded choices keyed by what decides them, never an implementation that
cannot run the shape, and kernels that do not build falling back under 'auto' and refused under 'flash'.

The GPU's facts are inputs: a Shape names the device (a Metal or CUDA one here, on a CPU machine), and the
kernel probe is the real one, which fails here as a GPU's compiler would (MLX's CPU build has no Metal or
CUDA back-end to build the kernels with), or one given the error to report.
"""

import json
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, RunConfig
from mlxllm.attention import resolve_attention, shape_of
from mlxllm.device import device_name
from mlxllm.kernels import Shape, choose, fused, record_choice, resolve_auto, select
from mlxllm.runstate import _attention, _model

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import tiny_configs

MAC = "metal:Apple M2 Max"
H100 = "cuda:NVIDIA H100 80GB HBM3"
NVRTC = "RuntimeError: [jit_module] Failed to compile kernel: error: identifier 'inf' is undefined"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An attention.json of this test's own, and the once-per-process lines said afresh."""
    monkeypatch.setenv("MLXLLM_CACHE_DIR", str(tmp_path))
    select._recorded.cache_clear()
    select._said.clear()
    yield tmp_path / "attention.json"
    select._recorded.cache_clear()


def _fails(error: str):
    def probe(backend: str, dtype: str, head_dim: int, groups: int) -> str:
        return error

    return probe


def _builds(backend: str, dtype: str, head_dim: int, groups: int) -> None:
    return None


def test_choices_are_recorded_per_device_dtype_head_dim_and_training(cache):
    train64 = Shape(MAC, "float32", 64, training=True)
    record_choice("flash", train64)
    record_choice("tiled", replace(train64, dtype="bfloat16"))
    assert json.loads(cache.read_text()) == {train64.key: "flash", replace(train64, dtype="bfloat16").key: "tiled"}
    assert resolve_auto(train64) == "flash"
    assert resolve_auto(replace(train64, dtype="bfloat16")) == "tiled"
    for other in (replace(train64, head_dim=128), replace(train64, training=False), replace(train64, device=H100)):
        assert resolve_auto(other) == "fast", other  # nothing recorded for it: the GPU's default
    assert resolve_auto(Shape("cpu:x86_64:AMD EPYC", "float32", 64, True)) == "halves"
    assert len({s.key for s in (train64, replace(train64, head_dim=32), replace(train64, training=False))}) == 3


def test_a_recorded_flash_is_never_used_for_a_head_dim_its_kernels_lack(cache, capsys):
    record_choice("flash", Shape(MAC, "float32", 64, True))
    cache.write_text(json.dumps({**json.loads(cache.read_text()), MAC: "flash"}))  # and one for the whole Mac
    select._recorded.cache_clear()
    d16 = Shape(MAC, "float32", 16, True)  # configs/search/tiny.toml's head dim
    assert resolve_auto(d16) == "fast"
    assert resolve_auto(d16) == "fast"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "'flash'" in lines[0] and "head dim" in lines[0] and "'fast'" in lines[0]
    assert resolve_auto(Shape(MAC, "bfloat16", 128, False)) == "flash"  # the Mac's choice, where it can run
    # On the CPU 'flash' is the tiled form, which runs any head dim.
    cpu = Shape("cpu:x86_64:AMD EPYC", "float32", 16, True)
    record_choice("flash", cpu)
    assert resolve_auto(cpu) == "flash" and choose("auto", cpu, groups=2) == "flash"


def test_choices_recorded_for_a_whole_device_by_older_mlxllm_still_load(cache):
    cache.write_text(json.dumps({device_name(): "tiled", MAC: "reference", "cuda:old": "bogus"}))
    assert resolve_auto() == "tiled"  # the device's own choice, as before
    here = shape_of(mx.zeros((1, 2, 8, 16)), training=True)
    assert here.device == device_name() and (here.dtype, here.head_dim) == ("float32", 16)
    assert resolve_attention("auto", here) == "tiled"
    assert resolve_auto(Shape(MAC, "float32", 64, True)) == "halves"  # 'reference' once named the halves path
    assert resolve_auto(Shape("cuda:old", "float32", 64, True)) == "fast"  # an unknown entry is ignored
    record_choice("fast", here)  # a shape's own record comes first
    assert resolve_auto(here) == "fast" and resolve_auto(replace(here, head_dim=32)) == "tiled"


def test_a_recorded_flash_with_head_dim_16_trains_with_fast_and_says_so(cache, capsys, tmp_path):
    m, t, k = tiny_configs(tmp_path / "corpus.txt", tmp_path / "run")
    run = RunConfig(model=replace(m, vocab_size=64), tokenizer=k, train=t)
    assert run.model.head_dim == 16 and run.model.attention == "auto"
    record_choice("flash", Shape(MAC, "float32", 16, True))
    impl = _attention(run, device=MAC)
    assert impl == "fast"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "head dim" in err and "using 'fast'" in err
    model, _, _ = _model(run, None, None, None, impl)
    assert {layer.self_attn.impl for layer in model.model.layers} == {"fast"}
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    loss, grads = nn.value_and_grad(model, lambda mdl, x: mdl(x)[:, :-1].mean())(model, tokens)
    mx.eval(loss, grads)  # it trains: a step's gradients with the fast attention
    assert mx.isfinite(loss).item()


def test_an_explicit_flash_on_a_shape_its_kernels_lack_is_one_paragraph_before_training(cache, tmp_path):
    m, t, k = tiny_configs(tmp_path / "corpus.txt", tmp_path / "run")
    run = RunConfig(model=replace(m, vocab_size=64, attention="flash"), tokenizer=k, train=t)
    with pytest.raises(MlxllmError, match=r"model.attention = 'flash' cannot run this model") as e:
        _attention(run, device=H100)
    assert "head dims 32, 64 and 128" in str(e.value) and "\n" not in str(e.value)
    assert _attention(run, device="cpu:x86_64:AMD EPYC") == "flash"  # the tiled form runs it
    # The kernels themselves refuse with the same kind of message, were they called anyway.
    q = mx.zeros((1, 4, 8, 16))
    with pytest.raises(MlxllmError, match="'flash' cannot run this model"):
        fused.fused_attention(q, q, q, scale=0.25, backend="cuda")


@pytest.mark.parametrize("device", [H100, MAC])
def test_kernels_that_do_not_build_fall_back_under_auto_and_are_refused_under_flash(cache, capsys, device):
    shape = Shape(device, "bfloat16", 64, True)
    backend = shape.backend
    error = fused.kernel_error(backend, "bfloat16", 64, 2)  # the real kernels: no Metal or CUDA to build them here
    assert error and ("Metal" in error or "CUDA" in error or "GPU" in error), error
    record_choice("flash", shape)
    assert choose("auto", shape, groups=2) == "fast"
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "do not build or run" in line and error in line
    with pytest.raises(MlxllmError, match="fused attention kernels do not build or run") as e:
        choose("flash", shape, groups=2)
    assert error in str(e.value) and "'auto' or 'fast'" in str(e.value)
    # A GPU compiler's error given as the probe's finding is decided on the same way.
    assert choose("auto", shape, groups=2, probe=_fails(NVRTC)) == "fast"
    with pytest.raises(MlxllmError, match="identifier 'inf' is undefined"):
        choose("flash", shape, groups=2, probe=_fails(NVRTC))
    # Kernels that build are used, whether recorded or asked for; other implementations need no probe.
    assert choose("auto", shape, groups=2, probe=_builds) == choose("flash", shape, groups=2, probe=_builds) == "flash"
    assert choose("tiled", shape, groups=2, probe=_fails(NVRTC)) == "tiled"
    assert choose("auto", replace(shape, training=False), groups=2, probe=_fails(NVRTC)) == "fast"


def test_the_benchmark_never_offers_flash_where_it_cannot_run(cache):
    from mlxllm.bench.attention import available_impls
    from mlxllm.kernels import gpu_backend

    here = Shape(device_name(), "float32", 64, True)
    assert {"reference", "halves", "fast", "tiled"} <= set(available_impls(here, probe=_fails(NVRTC)))
    assert "flash" not in available_impls(here, probe=_fails(NVRTC))
    assert "flash" not in available_impls(replace(here, head_dim=16), probe=_builds)
    # Offered on a GPU whose kernels build (on the CPU 'flash' is the tiled path, timed as 'tiled').
    assert ("flash" in available_impls(here, probe=_builds)) == (gpu_backend() is not None)
