"""One builder per C++ extension: sources, flags, cache, ahead-of-time or on-demand build.

An op is compiled the first time it is used (``torch.utils.cpp_extension.load`` driving
ninja) into a cache folder keyed by the torch version, the Python version and a hash of
its sources and flags, so an edit to a kernel or an upgrade of torch rebuilds it and
nothing else does.  ``HETMEM_BUILD_OPS=1 pip install --no-build-isolation .`` builds the
same sources ahead of time into ``hetmem._ops``; a prebuilt module is used only when it
was built from the same sources.

Kernel sources include no torch headers: each op has a core with plain C++ and one thin
pybind11 binding that takes pointers and sizes, so a build from scratch costs seconds,
not the minute a ``torch/extension.h`` include costs on a small machine.

This module imports nothing from hetmem and torch only inside functions, so setup.py can
load it by path.

Environment:
  HETMEM_CACHE_DIR     where JIT builds go (default: $XDG_CACHE_HOME/hetmem or ~/.cache/hetmem)
  HETMEM_DISABLE_OPS   "all" or a comma list of op names: treat them as unbuildable, so the
                       pure-PyTorch fallbacks run (for tests and for comparison)
  HETMEM_REQUIRE_OPS   "1": an op that fails to build is an error (OpRequiredError), not a
                       fallback with a warning -- unless HETMEM_DISABLE_OPS names it (CI sets it)
  CXX                  the C++ compiler (as for torch.utils.cpp_extension)
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("hetmem.ops.builder")

# hetmem/csrc is a link to the repository's csrc/ in a checkout and a copy when installed.
CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
PREBUILT_PACKAGE = "hetmem._ops"

# Flags every op is built with.  No -march=native: the kernels pick their SIMD level at
# run time (per-function target attributes), so one build runs on any x86-64 CPU.
COMMON_CFLAGS = ("-O3", "-fvisibility=hidden", "-Wall", "-Wno-unused-function")


class OpBuildError(RuntimeError):
    """An op could not be built or loaded.  The message says why and what to do."""


class OpRequiredError(RuntimeError):
    """HETMEM_REQUIRE_OPS=1 and an op that is not disabled failed to build (no fallback then)."""


REQUIRE_ENV = "HETMEM_REQUIRE_OPS"


def check_fallback_allowed(op: "OpBuilder", exc: OpBuildError) -> None:
    """Called where a failed op would fall back: raises OpRequiredError under HETMEM_REQUIRE_OPS=1,
    unless HETMEM_DISABLE_OPS names the op (then the fallback is what was asked for)."""
    if os.environ.get(REQUIRE_ENV, "0") == "1" and op.disabled_reason() is None:
        raise OpRequiredError(f"{REQUIRE_ENV}=1 and hetmem op {op.name!r} failed to build: {exc}") from exc


@dataclass(frozen=True)
class OpBuilder:
    """How to build one extension.  Paths are relative to ``csrc/``."""

    name: str                       # short op name: "cpu_adam", "aio"
    sources: tuple[str, ...]        # .cpp files compiled into the extension
    description: str                # one line for `hetmem env`
    cflags: tuple[str, ...] = ()    # added to COMMON_CFLAGS
    ldflags: tuple[str, ...] = ()
    root: Path = CSRC_DIR           # the csrc/ folder; tests point it elsewhere

    # -- sources and cache ---------------------------------------------------------------

    def source_paths(self) -> list[Path]:
        return [self.root / s for s in self.sources]

    def _hashed_files(self) -> list[Path]:
        """Sources plus every header they could include (their folders and csrc/include)."""
        files = set(self.source_paths())
        folders = {p.parent for p in files} | {self.root / "include"}
        for folder in folders:
            if folder.is_dir():
                files.update(p for p in folder.iterdir() if p.suffix in (".h", ".hpp", ".cpp"))
        return sorted(files)

    def source_hash(self) -> str:
        """sha256 of the sources, headers and flags; changes whenever the binary would."""
        h = hashlib.sha256()
        for path in self._hashed_files():
            h.update(str(path.relative_to(self.root)).encode())
            h.update(b"\0")
            h.update(path.read_bytes())
        h.update(repr((COMMON_CFLAGS, self.cflags, self.ldflags)).encode())
        return h.hexdigest()[:16]

    @property
    def module_name(self) -> str:
        return f"hetmem_{self.name}_{self.source_hash()}"

    def cache_dir(self) -> Path:
        import torch

        base = os.environ.get("HETMEM_CACHE_DIR")
        if base is None:
            xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            base = str(Path(xdg) / "hetmem")
        tag = f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
        return Path(base) / "ops" / tag / self.module_name

    def _cached_library(self) -> Path | None:
        path = self.cache_dir() / f"{self.module_name}.so"
        return path if path.is_file() else None

    def _cflags(self) -> list[str]:
        return [*COMMON_CFLAGS, *self.cflags, f"-DHETMEM_SOURCE_HASH={self.source_hash()}"]

    # -- status --------------------------------------------------------------------------

    def disabled_reason(self) -> str | None:
        names = {n.strip() for n in os.environ.get("HETMEM_DISABLE_OPS", "").split(",") if n.strip()}
        if "all" in names or self.name in names:
            return f"disabled by HETMEM_DISABLE_OPS={os.environ['HETMEM_DISABLE_OPS']!r}"
        return None

    def missing_sources(self) -> str | None:
        missing = [str(p) for p in self.source_paths() if not p.is_file()]
        if missing:
            return f"sources missing: {', '.join(missing)} (a broken install; reinstall hetmem)"
        return None

    def toolchain_problem(self) -> str | None:
        """None when a JIT build could run here, else the reason in one sentence."""
        missing = self.missing_sources()
        if missing:
            return missing
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            return (f"no C++ compiler: {cxx!r} is not on PATH; install one "
                    f"(e.g. `apt-get install g++`) or set CXX")
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            return "ninja is not installed; `pip install ninja`"
        return None

    def status(self) -> str:
        """One line for `hetmem env`: prebuilt / built / would build / cannot build."""
        reason = self.disabled_reason() or self.missing_sources()
        if reason:
            return reason
        if self._prebuilt_module() is not None:
            return "prebuilt (HETMEM_BUILD_OPS=1)"
        lib = self._cached_library()
        if lib is not None:
            return f"built, cached at {lib.parent}"
        problem = self.toolchain_problem()
        if problem:
            return f"cannot build: {problem}"
        return f"not built yet; builds on first use with {compiler_version()}"

    def needs_build(self) -> bool:
        """Whether load() would compile now: usable here, but neither loaded, prebuilt nor cached."""
        if self.name in _LOADED or self.disabled_reason() or self.missing_sources():
            return False
        return self._prebuilt_module() is None and self._cached_library() is None

    # -- loading -------------------------------------------------------------------------

    def _prebuilt_module(self):
        try:
            mod = importlib.import_module(f"{PREBUILT_PACKAGE}.{self.name}")
        except ImportError:
            return None
        if getattr(mod, "source_hash", None) != self.source_hash():
            logger.info("prebuilt %s is from other sources; building on demand instead", self.name)
            return None
        return mod

    def load(self):
        """The extension module: prebuilt, cached, or built now.  Raises OpBuildError."""
        with _LOCK:
            if self.name in _LOADED:
                return _LOADED[self.name]
            module = self._load_uncached()
            _LOADED[self.name] = module
            return module

    def _load_uncached(self):
        reason = self.disabled_reason()
        if reason:
            raise OpBuildError(f"hetmem op {self.name!r} is {reason}")
        missing = self.missing_sources()
        if missing:
            raise OpBuildError(f"cannot build hetmem op {self.name!r}: {missing}")
        import torch  # noqa: F401  (the extension links against torch's libraries)

        module = self._prebuilt_module()
        if module is not None:
            return module
        lib = self._cached_library()
        if lib is not None:
            try:
                return _import_library(self.module_name, lib)
            except ImportError as exc:  # a stale or truncated file: rebuild
                logger.warning("cached %s could not be loaded (%s); rebuilding", lib, exc)
        return self.build()

    def build(self):
        """Compile now (JIT) and return the module.  Raises OpBuildError."""
        problem = self.toolchain_problem()
        if problem:
            raise OpBuildError(f"cannot build hetmem op {self.name!r}: {problem}")
        from torch.utils.cpp_extension import load

        build_dir = self.cache_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        logger.info("building hetmem op %s in %s", self.name, build_dir)
        try:
            module = load(
                name=self.module_name,
                sources=[str(p) for p in self.source_paths()],
                extra_cflags=self._cflags(),
                extra_ldflags=list(self.ldflags),
                extra_include_paths=[str(self.root / "include"), str(CSRC_DIR / "include")],
                build_directory=str(build_dir),
                with_cuda=False,
                verbose=logger.isEnabledFor(logging.DEBUG),
            )
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            lines = str(exc).strip().splitlines()
            first_error = next((ln.strip() for ln in lines if ": error:" in ln or ": fatal error:" in ln), None)
            logger.debug("build output of %s:\n%s", self.name, exc)
            raise OpBuildError(
                f"building hetmem op {self.name!r} failed: {first_error or (lines[-1] if lines else exc)} "
                f"(HETMEM_LOG=debug shows the compiler output)"
            ) from exc
        logger.info("built hetmem op %s in %.1f s", self.name, time.perf_counter() - started)
        return module

    # -- ahead of time -------------------------------------------------------------------

    def aot_extension(self, project_root: Path):
        """A CppExtension for setup.py (HETMEM_BUILD_OPS=1); paths relative to setup.py's folder."""
        from torch.utils.cpp_extension import CppExtension

        return CppExtension(
            name=f"{PREBUILT_PACKAGE}.{self.name}",
            sources=[os.path.relpath(p, project_root) for p in self.source_paths()],
            include_dirs=[str(self.root / "include")],
            extra_compile_args=self._cflags(),
            extra_link_args=list(self.ldflags),
        )


_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}


def _import_library(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no loader for {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module


def compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0].strip() if out.stdout else cxx
    except (OSError, subprocess.TimeoutExpired):
        return f"{cxx} (not runnable)"


# The ops.  Each op's Python wrapper (hetmem/ops/<name>.py or hetmem/nvme) owns its fallback.
CPU_ADAM = OpBuilder(
    name="cpu_adam",
    sources=("adam/kernels.cpp", "adam/kernels_scalar.cpp", "adam/kernels_avx2.cpp",
             "adam/kernels_avx512.cpp", "adam/thread_pool.cpp", "adam/binding.cpp"),
    description="SIMD CPU Adam/AdamW (AVX-512, AVX2, scalar; chosen at run time)",
)
AIO = OpBuilder(
    name="aio",
    sources=("aio/engine.cpp", "aio/platform.cpp", "aio/uring.cpp", "aio/linux_aio.cpp", "aio/thread_pool.cpp",
             "aio/crc32c.cpp", "aio/binding.cpp"),
    description="async file IO engine (io_uring, Linux AIO, thread pool) with O_DIRECT",
)

ALL_BUILDERS = (CPU_ADAM, AIO)


def builder(name: str) -> OpBuilder:
    for b in ALL_BUILDERS:
        if b.name == name:
            return b
    raise ValueError(f"unknown hetmem op {name!r}; known: {', '.join(b.name for b in ALL_BUILDERS)}")

