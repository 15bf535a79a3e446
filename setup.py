"""hetmem: train PyTorch models far larger than the GPU, with chunked offload to host and NVMe.

Packages: everything installs under the one ``hetmem`` namespace.  The top-level folders
chunk_manager/, tracer/, nvme/, benchmarks/ and csrc/ are linked into hetmem/ (as
hetmem/chunk_manager and so on), so no generic top-level module lands in site-packages.

C++ ops build on first use.  ``HETMEM_BUILD_OPS=1 pip install --no-build-isolation .``
builds them now instead (it needs the torch they will run with).
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load_builder():
    spec = importlib.util.spec_from_file_location("_hetmem_builder", ROOT / "hetmem" / "ops" / "builder.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _ahead_of_time_ops():
    if os.environ.get("HETMEM_BUILD_OPS", "0") != "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        sys.exit("HETMEM_BUILD_OPS=1 builds the C++ ops against the installed torch, but torch "
                 "is not importable here; run `HETMEM_BUILD_OPS=1 pip install --no-build-isolation .`")
    builders = _load_builder().ALL_BUILDERS
    return {"ext_modules": [b.aot_extension(ROOT) for b in builders],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="hetmem",
    version="0.1.0",
    description="Heterogeneous-memory offload runtime for PyTorch: GPU, host and NVMe chunks",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hetmem", "hetmem.*"]),
    package_data={"hetmem": ["csrc/*/*.cpp", "csrc/*/*.h", "data/*"]},
    install_requires=[
        "torch>=2.1",          # a range, never a pin: an installed torch (CUDA or not) is kept
        "numpy",
        "ninja",
        "psutil",
        "nvidia-ml-py",        # provides pynvml
        "tqdm",
    ],
    extras_require={
        "aio": ["aiofiles"],
        "report": ["matplotlib"],
        "hf": ["transformers", "accelerate"],         # hetmem.integrations.transformers.HetmemTrainer
        "bench": ["deepspeed==0.19.8"],               # benchmarks/nvme_vs_deepspeed.py (also needs libaio-dev)
        "test": ["pytest", "hypothesis", "aiofiles", "matplotlib", "safetensors", "transformers", "accelerate",
                 "peft"],
    },
    entry_points={"console_scripts": ["hetmem=hetmem.cli:main"]},
    **_ahead_of_time_ops(),
)
