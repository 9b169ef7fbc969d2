"""The BLAS loaded where several are found: the faster on this machine, measured once per machine in child
processes and cached; MLXLLM_BLAS overrides it (mlxllm/cpu/blas_choice.py)."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

from mlxllm.cpu import blas
from mlxllm.cpu.blas_choice import cache_key, choose, measure, pick

import pytest

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
MKL = os.path.join(sys.prefix, "lib", "libmkl_rt.so.3")
INSTALLED = [p for p in (OPENBLAS, MKL) if os.path.isfile(p)]
both_installed = pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(INSTALLED) < 2,
    reason="needs Debian's OpenBLAS (libopenblas0-pthread) and the mkl wheel",
)


def _libraries(tmp_path: Path) -> list[str]:
    """Two files named as the libraries are (what the cache key reads of them: their path and size)."""
    paths = []
    for name in ("libopenblas.so.0", "libmkl_rt.so.3"):
        (tmp_path / name).write_bytes(b"\0")
        paths.append(str(tmp_path / name))
    return paths


def _counting(rates: dict[str, float | None]):
    """A measurement that returns `rates` and records each library it was asked about."""
    calls: list[str] = []

    def timed(path: str) -> float | None:
        calls.append(path)
        return rates[path]

    return timed, calls


def test_the_faster_library_is_picked_whichever_vendor_it_is():
    openblas, mkl = "/lib/libopenblas.so.0", "/venv/lib/libmkl_rt.so.3"
    assert pick({openblas: 147.0, mkl: 66.0}, [openblas, mkl]) == openblas  # as on an AMD EPYC
    assert pick({openblas: 60.0, mkl: 70.0}, [openblas, mkl]) == mkl
    assert pick({openblas: 60.0, mkl: 70.0}, [mkl, openblas]) == mkl
    assert pick({openblas: None, mkl: 5.0}, [openblas, mkl]) == mkl  # a failed measurement never wins
    assert pick({openblas: 50.0, mkl: 50.0}, [mkl, openblas]) == mkl  # a tie: the order searched
    assert pick({openblas: None, mkl: None}, [openblas, mkl]) == openblas  # nothing measured: the first


def test_the_choice_is_measured_once_then_read_from_the_cache(tmp_path):
    openblas, mkl = _libraries(tmp_path)
    cache = tmp_path / "cache" / "blas.json"
    timed, calls = _counting({openblas: 40.0, mkl: 90.0})
    first = choose([openblas, mkl], timed, cache)
    assert first.path == mkl and calls == [openblas, mkl] and first.status == "measured"
    assert json.loads(cache.read_text())[cache_key([openblas, mkl])]["choice"] == mkl
    assert "OpenBLAS 40 GFLOP/s, MKL 90 GFLOP/s" in first.describe() and f"cached in {cache}" in first.describe()

    second = choose([openblas, mkl], timed, cache)
    assert calls == [openblas, mkl]  # not measured again
    assert (second.path, second.gflops, second.status) == (mkl, first.gflops, "cached")
    assert f"read from {cache}" in second.describe()

    Path(openblas).write_bytes(b"\0\0")  # an upgraded library: measured again
    timed, calls = _counting({openblas: 95.0, mkl: 90.0})
    assert choose([openblas, mkl], timed, cache).path == openblas and calls == [openblas, mkl]
    assert len(json.loads(cache.read_text())) == 2  # the earlier entry is kept beside it


def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    openblas, mkl = _libraries(tmp_path)
    cache, key = tmp_path / "blas.json", cache_key([openblas, mkl])
    for junk in ("{not json", "[1, 2]", json.dumps({key: {"gflops": {openblas: "fast", mkl: 1.0}}})):
        cache.write_text(junk)
        timed, calls = _counting({openblas: 80.0, mkl: 20.0})
        assert choose([openblas, mkl], timed, cache).path == openblas and calls == [openblas, mkl]
        assert json.loads(cache.read_text())[key] == {"choice": openblas, "gflops": {openblas: 80.0, mkl: 20.0}}
        assert choose([openblas, mkl], timed, cache).status == "cached" and len(calls) == 2


def test_a_cache_that_cannot_be_written_costs_only_the_measurement(tmp_path):
    openblas, mkl = _libraries(tmp_path)
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "blas.json"  # its directory cannot be made
    timed, calls = _counting({openblas: 30.0, mkl: 20.0})
    for _ in range(2):
        choice = choose([openblas, mkl], timed, cache)
        assert choice.path == openblas and "not cached" in choice.describe()
    assert calls == [openblas, mkl] * 2
    # Every measurement failed: the first searched, and nothing recorded as if it were a result.
    timed, calls = _counting({openblas: None, mkl: None})
    choice = choose([openblas, mkl], timed, tmp_path / "blas.json")
    assert choice.path == openblas and "no measurement succeeded" in choice.describe()
    assert not (tmp_path / "blas.json").exists()


def test_locate_keeps_one_path_per_library(tmp_path):
    real = tmp_path / "libopenblas.so.0"
    real.write_bytes(b"\0")
    (tmp_path / "alias.so").symlink_to(real)
    found = blas.locate([str(tmp_path / "missing.so"), str(real), str(tmp_path / "alias.so")])
    assert found == [str(real)]


def _mapped(paths: list[str]) -> list[str]:
    """Those of `paths` whose library is loaded into this process."""
    maps = Path("/proc/self/maps").read_text()
    return [p for p in paths if os.path.realpath(p) in maps]


@both_installed
def test_each_installed_library_is_measured_in_a_child_process():
    before = _mapped(INSTALLED)
    rates = {path: measure(path) for path in INSTALLED}
    assert all(g is not None and g > 0 for g in rates.values()), rates
    assert _mapped(INSTALLED) == before  # measuring loaded neither into this process
    assert measure("/nonexistent/libblas.so") is None
    assert measure(ctypes.util.find_library("c")) is None  # loads, but has no cblas_sgemm
    assert measure(MKL, timeout=0.001) is None


_IMPORT = (
    "import json, os, sys, mlxllm\n"
    "from mlxllm.cpu import blas\n"
    "maps = open('/proc/self/maps').read()\n"
    "mapped = [p for p in sys.argv[1:] if os.path.realpath(p) in maps]\n"
    "print(json.dumps({'loaded': blas.loaded, 'describe': blas.describe(), 'mapped': mapped}))\n"
)


def _import_mlxllm(cache: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "MLXLLM_BLAS"}
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT, *INSTALLED],
        capture_output=True,
        text=True,
        env={**clean, "MLXLLM_CACHE_DIR": str(cache), **env},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@both_installed
def test_import_loads_the_faster_library_measured_and_only_that_one(tmp_path):
    first = _import_mlxllm(tmp_path)
    (entry,) = json.loads((tmp_path / "blas.json").read_text()).values()
    rates = entry["gflops"]
    assert set(INSTALLED) <= set(rates)
    assert first["loaded"] == entry["choice"] == max(rates, key=lambda p: rates[p] or 0)
    assert first["mapped"] == [first["loaded"]]  # the slower one was never loaded here
    assert "measured" in first["describe"] and "cached in" in first["describe"]
    written = (tmp_path / "blas.json").read_text()
    second = _import_mlxllm(tmp_path)
    assert second["loaded"] == first["loaded"] and "read from" in second["describe"]
    assert (tmp_path / "blas.json").read_text() == written


@both_installed
def test_mlxllm_blas_overrides_the_measurement(tmp_path):
    for path in INSTALLED:
        out = _import_mlxllm(tmp_path, MLXLLM_BLAS=path)
        assert out["loaded"] == path and out["mapped"] == [path]
        assert "set by MLXLLM_BLAS" in out["describe"]
    assert not (tmp_path / "blas.json").exists()  # nothing was measured
