"""HETMEM_REQUIRE_OPS=1 (CI): an op that fails to build is an error, never a silent fallback."""
from __future__ import annotations

import importlib

import pytest

from hetmem.ops import OpRequiredError, adam


@pytest.fixture
def unbuildable(monkeypatch, tmp_path):
    """cpu_adam as if the compiler were missing: an empty cache and no compiler."""
    monkeypatch.setenv("HETMEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-hetmem")
    monkeypatch.delenv("HETMEM_DISABLE_OPS", raising=False)
    builder_module = importlib.import_module("hetmem.ops.builder")
    monkeypatch.delitem(builder_module._LOADED, "cpu_adam", raising=False)
    monkeypatch.setattr(builder_module.OpBuilder, "_prebuilt_module", lambda self: None)
    adam._reset()
    yield
    adam._reset()


def test_a_failed_build_is_an_error_when_ops_are_required(unbuildable, monkeypatch):
    monkeypatch.setenv("HETMEM_REQUIRE_OPS", "1")
    with pytest.raises(OpRequiredError, match="HETMEM_REQUIRE_OPS=1 and hetmem op 'cpu_adam' failed to build: "
                                              ".*no C\\+\\+ compiler"):
        adam.unavailable_reason()


def test_without_the_requirement_it_falls_back(unbuildable, monkeypatch):
    monkeypatch.delenv("HETMEM_REQUIRE_OPS", raising=False)
    assert "no C++ compiler" in adam.unavailable_reason()


def test_an_op_disabled_on_purpose_falls_back_even_when_required(unbuildable, monkeypatch):
    monkeypatch.setenv("HETMEM_REQUIRE_OPS", "1")
    monkeypatch.setenv("HETMEM_DISABLE_OPS", "cpu_adam")
    assert "HETMEM_DISABLE_OPS" in adam.unavailable_reason()
