"""The op builder: a real JIT build of a tiny op, its cache, its keys and its errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hetmem.ops.builder import CSRC_DIR, OpBuilder, OpBuildError, builder

BINDING = """
#include <pybind11/pybind11.h>
#include <cstdint>
#include "hetmem_binding.h"
static int64_t add(int64_t a, int64_t b) { return a + b + OFFSET; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  HETMEM_MODULE_INFO(m);
  m.def("add", &add, pybind11::arg("a"), pybind11::arg("b") = 1);
}
"""


def _tiny_op(root: Path, offset: int = 0) -> OpBuilder:
    (root / "tiny").mkdir(parents=True, exist_ok=True)
    (root / "include").mkdir(exist_ok=True)
    (root / "tiny" / "binding.cpp").write_text(BINDING.replace("OFFSET", str(offset)))
    return OpBuilder(name="tiny", sources=("tiny/binding.cpp",), description="test op", root=root)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HETMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HETMEM_DISABLE_OPS", raising=False)
    return tmp_path / "cache"


def test_jit_build_loads_and_is_cached(tmp_path, cache):
    op = _tiny_op(tmp_path / "csrc")
    assert op.status().startswith("not built yet")
    module = op.build()
    assert module.add(2, 3) == 5 and module.add(2) == 3
    assert module.source_hash == op.source_hash()
    assert op.status().startswith("built, cached at")
    # A new process loads the cached library without compiling: with no compiler reachable a
    # build would raise, and the cached file is left as it was.
    library = op.cache_dir() / f"{op.module_name}.so"
    before = library.stat().st_mtime_ns
    code = textwrap.dedent(f"""
        from pathlib import Path
        from hetmem.ops.builder import OpBuilder
        op = OpBuilder(name="tiny", sources=("tiny/binding.cpp",), description="x", root=Path({str(op.root)!r}))
        assert op.toolchain_problem() is not None, "the compiler should be unreachable here"
        m = op._load_uncached()
        assert m.add(40, 2) == 42
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert library.stat().st_mtime_ns == before


def test_source_edit_changes_hash_and_cache_dir(tmp_path, cache):
    root = tmp_path / "csrc"
    first = _tiny_op(root, offset=0)
    h1, d1 = first.source_hash(), first.cache_dir()
    second = _tiny_op(root, offset=7)
    assert second.source_hash() != h1 and second.cache_dir() != d1
    assert second.build().add(1, 1) == 9


def test_hash_covers_flags_and_headers(tmp_path):
    root = tmp_path / "csrc"
    op = _tiny_op(root)
    flagged = OpBuilder(name="tiny", sources=op.sources, description="x", root=root, cflags=("-DX=1",))
    assert op.source_hash() != flagged.source_hash()
    before = op.source_hash()
    (root / "include" / "extra.h").write_text("#pragma once\n")
    assert op.source_hash() != before


def test_cache_dir_is_keyed_by_torch_and_python(tmp_path, cache):
    import torch

    op = _tiny_op(tmp_path / "csrc")
    path = op.cache_dir()
    assert path.parent.name == f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    assert path.name == f"hetmem_tiny_{op.source_hash()}"
    assert path.is_relative_to(cache)


def test_compile_error_is_one_clear_error(tmp_path, cache):
    root = tmp_path / "csrc"
    op = _tiny_op(root)
    (root / "tiny" / "binding.cpp").write_text("this is not C++;\n")
    with pytest.raises(OpBuildError, match="building hetmem op 'tiny' failed"):
        op.build()


def test_disabled_op_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HETMEM_DISABLE_OPS", "tiny,other")
    op = _tiny_op(tmp_path / "csrc")
    with pytest.raises(OpBuildError, match="HETMEM_DISABLE_OPS"):
        op._load_uncached()
    assert "disabled" in op.status()


def test_missing_compiler_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-hetmem")
    op = _tiny_op(tmp_path / "csrc")
    with pytest.raises(OpBuildError, match="no C\\+\\+ compiler: 'no-such-compiler-hetmem' is not on PATH"):
        op.build()


def test_missing_sources_named(tmp_path):
    op = OpBuilder(name="ghost", sources=("ghost/a.cpp",), description="x", root=tmp_path)
    assert op.status().startswith("sources missing")
    with pytest.raises(OpBuildError, match="ghost/a.cpp"):
        op._load_uncached()


def test_unknown_op_name():
    with pytest.raises(ValueError, match="unknown hetmem op 'nope'"):
        builder("nope")


def test_csrc_is_inside_the_package():
    # hetmem/csrc must resolve: a link in a checkout, a copy when installed
    assert (CSRC_DIR / "include" / "hetmem_binding.h").is_file()
