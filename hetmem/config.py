"""The one typed configuration, validated once at the boundary.

``Config`` is a frozen dataclass; it may also be built from a plain dict with the same keys
(nested dicts for ``optimizer``) or from the path of a JSON file.  Sizes are ints (bytes) or
strings with units ("512MiB", "6GiB") and are parsed here, once.  Every bad value raises
``ValueError`` naming the key, the value and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

from hetmem.accelerator import validate_device_name
from hetmem.nvme.io_pool import LOCK_MODES  # nvme_lock_buffers values
from hetmem.nvme.pipeline_plan import SPILL_AHEAD, check_depth_setting, check_spill_ahead
from hetmem.units import parse_size

AUTO = "auto"
DTYPES = ("fp32", "fp16", "bf16")

NVME_BACKENDS = ("auto", "io_uring", "linux_aio", "threads")
ACTIVATION_OFFLOAD = ("auto", "off")


def _fail(key: str, value: Any, fix: str) -> None:
    raise ValueError(f"{key}={value!r} is invalid: {fix}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "give a finite number")
    return float(value)


@dataclass(frozen=True)
class AdamConfig:
    """Adam / AdamW hyperparameters, with torch.optim.Adam(W) semantics."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = True          # True: AdamW (decoupled weight decay); False: Adam (L2 in the gradient)
    bias_correction: bool = True

    def __post_init__(self) -> None:
        lr = _number("optimizer.lr", self.lr)
        if lr < 0:
            _fail("optimizer.lr", self.lr, "the learning rate must be >= 0")
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            _fail("optimizer.betas", betas, "give two numbers (beta1, beta2), each in [0, 1)")
        b1, b2 = (_number("optimizer.betas", b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            _fail("optimizer.betas", betas, "each beta must be in [0, 1)")
        eps = _number("optimizer.eps", self.eps)
        if eps <= 0:
            _fail("optimizer.eps", self.eps, "eps must be > 0")
        wd = _number("optimizer.weight_decay", self.weight_decay)
        if wd < 0:
            _fail("optimizer.weight_decay", self.weight_decay, "weight decay must be >= 0")
        for name in ("decoupled", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"optimizer.{name}", getattr(self, name), "give true or false")
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "betas", (b1, b2))
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "weight_decay", wd)


SizeOrAuto = Union[int, str]


@dataclass(frozen=True)
class Config:
    """How hetmem trains a model.  See the README for each key."""

    device: str = AUTO                       # "auto" | "cuda" | "cuda:N" | "cpu"
    device_budget: SizeOrAuto = AUTO         # bytes hetmem may keep on the compute device
    host_budget: SizeOrAuto = AUTO           # chunk bytes allowed in host memory; beyond: NVMe
    nvme_dir: str | None = None              # a folder turns the NVMe tier on
    dtype: str = "bf16"                      # parameters on the device: "fp32" | "fp16" | "bf16"
    chunk_size: SizeOrAuto = AUTO            # elements per chunk (int), bytes ("64MiB"), or "auto"
    optimizer: AdamConfig = field(default_factory=AdamConfig)
    gradient_clipping: float | None = None  # max global L2 norm, or None (as torch)
    gradient_accumulation_steps: int = 1
    loss_scale: float | str = "dynamic"      # fp16 only: "dynamic" or a fixed scale
    device_margin: SizeOrAuto = AUTO         # device bytes kept free for allocator slack
    prefetch: bool = True                    # fetch the next moment's chunks ahead of use
    overlap_step: bool = True                # apply the optimizer step group by group during the
                                             # next forward (hetmem/step_pipeline.py); false: in step()
    step_speculation: bool | str = AUTO      # update the last layers' groups during backward, rolled back
                                             # exactly if the step differs (hetmem/speculation.py)
    shard_params: bool = False               # data parallel: keep only this rank's groups' parameter chunks,
                                             # gather the others before use (README "Data parallel")
    memory_trace: bool = True                # record the trace behind engine.memory_report()
    nvme_backend: str = "auto"               # "auto" | "io_uring" | "linux_aio" | "threads"
    nvme_block_size: SizeOrAuto = "1MiB"
    nvme_queue_depth: int = 16
    nvme_threads: int = 1
    nvme_checksum: bool = True               # crc32c on every swap write, verified on read
    nvme_lock_buffers: str = "auto"          # mlock the IO buffers: "auto" (warn if refused) | "required" | "off"
    nvme_release_idle: bool | str = AUTO     # hand the IO buffers' idle pages back to the OS for each backward:
                                             # "auto" (when the compute device is the CPU) | true | false
    nvme_pipeline_depth: int | str = AUTO    # chunk groups the NVMe optimizer step reads ahead: "auto" | int >= 1
    nvme_spill_ahead: int = SPILL_AHEAD      # groups past the read-ahead whose room each update makes (stores
                                             # started early): int 0..8, 0 = when a read needs it
    activation_offload: str = AUTO           # "auto": saved activations to host memory when the
                                             # budget needs it (hetmem/activations); "off": never

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass

        device = self.device
        device_fix = validate_device_name(device)
        if device_fix is not None:
            _fail("device", device, device_fix)
        for key in ("device_budget", "host_budget", "device_margin"):
            value = getattr(self, key)
            if value != AUTO:
                set_(key, parse_size(value, key=key))
        if self.device_budget != AUTO and self.device_budget == 0:
            _fail("device_budget", self.device_budget, "give a positive size such as '6GiB', or 'auto'")
        if self.nvme_dir is not None:
            if not isinstance(self.nvme_dir, (str, os.PathLike)) or str(self.nvme_dir) == "":
                _fail("nvme_dir", self.nvme_dir, "give a folder path, or None to keep the NVMe tier off")
            set_("nvme_dir", str(self.nvme_dir))
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"use one of {', '.join(DTYPES)}")
        if self.chunk_size != AUTO:
            if isinstance(self.chunk_size, bool):
                _fail("chunk_size", self.chunk_size, "give elements (int), bytes ('64MiB') or 'auto'")
            if isinstance(self.chunk_size, str):
                set_("chunk_size", parse_size(self.chunk_size, key="chunk_size"))
                if self.chunk_size <= 0:
                    _fail("chunk_size", self.chunk_size, "give a positive size")
                # bytes in the parameter dtype -> elements
                set_("chunk_size", max(1, self.chunk_size // self.param_bytes))
            elif not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
                _fail("chunk_size", self.chunk_size, "give a positive number of elements, bytes ('64MiB') or 'auto'")
        if isinstance(self.optimizer, Mapping):
            set_("optimizer", _from_mapping(AdamConfig, self.optimizer, prefix="optimizer."))
        elif not isinstance(self.optimizer, AdamConfig):
            _fail("optimizer", self.optimizer, "give hetmem.AdamConfig(...) or a dict of its keys")
        if self.gradient_clipping is not None:
            clip = _number("gradient_clipping", self.gradient_clipping)
            if clip <= 0:
                _fail("gradient_clipping", self.gradient_clipping, "give a max norm > 0, or None to disable")
            set_("gradient_clipping", clip)
        steps = self.gradient_accumulation_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            _fail("gradient_accumulation_steps", steps, "give an integer >= 1")
        if self.loss_scale != "dynamic":
            scale = _number("loss_scale", self.loss_scale)
            if scale <= 0:
                _fail("loss_scale", self.loss_scale, "give 'dynamic' or a fixed scale > 0")
            set_("loss_scale", scale)
        for key in ("prefetch", "memory_trace", "nvme_checksum", "overlap_step", "shard_params"):
            if not isinstance(getattr(self, key), bool):
                _fail(key, getattr(self, key), "give true or false")
        if self.activation_offload not in ACTIVATION_OFFLOAD:
            _fail("activation_offload", self.activation_offload,
                  "use 'auto' (saved activations go to host memory when the device budget needs it) or 'off'")
        if self.nvme_lock_buffers not in LOCK_MODES:
            _fail("nvme_lock_buffers", self.nvme_lock_buffers,
                  "use 'auto' (lock, or warn and go on unlocked), 'required' (an error when mlock is refused) or 'off'")
        check_depth_setting(self.nvme_pipeline_depth)
        check_spill_ahead(self.nvme_spill_ahead)
        if self.nvme_release_idle != AUTO and not isinstance(self.nvme_release_idle, bool):
            _fail("nvme_release_idle", self.nvme_release_idle,
                  "use 'auto' (release when the compute device is the CPU, whose activations share host RAM "
                  "with the IO buffers), true or false")
        self._check_speculation()
        if self.nvme_backend not in NVME_BACKENDS:
            _fail("nvme_backend", self.nvme_backend, f"use one of {', '.join(NVME_BACKENDS)}")
        block = parse_size(self.nvme_block_size, key="nvme_block_size")
        if block < 4096 or block % 4096:
            _fail("nvme_block_size", self.nvme_block_size, "give a multiple of 4 KiB, e.g. '1MiB'")
        set_("nvme_block_size", block)
        for key, low in (("nvme_queue_depth", 1), ("nvme_threads", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                _fail(key, value, f"give an integer >= {low}")
        self._check_keys_take_effect()

    def _check_speculation(self) -> None:
        """``step_speculation``: "auto", true or false; true needs what speculation needs."""
        value = self.step_speculation
        if value != AUTO and not isinstance(value, bool):
            _fail("step_speculation", value, "use 'auto' (speculate when overlap_step is on, the NVMe tier is on, "
                                             "one process, no gradient accumulation, no clipping), true or false")
        if value is True:
            missing = [why for why, bad in (("overlap_step=true", not self.overlap_step),
                                             ("nvme_dir set", self.nvme_dir is None),
                                             ("gradient_accumulation_steps=1", self.gradient_accumulation_steps != 1))
                       if bad]
            if missing:
                _fail("step_speculation", value, f"speculation needs {' and '.join(missing)}; set those, or "
                                                 f"step_speculation to 'auto' or false")

    def _check_keys_take_effect(self) -> None:
        """A key set to a non-default value that the chosen config ignores: ``loss_scale``
        without fp16 is refused (the user expects scaling that would not happen); ``nvme_*``
        without ``nvme_dir`` is warned about (a tuned IO config file merged in before the
        NVMe tier is turned on is harmless)."""
        if self.loss_scale != "dynamic" and not self.uses_loss_scaling:
            _fail("loss_scale", self.loss_scale, f"loss scaling applies only to dtype='fp16', not "
                                                 f"dtype={self.dtype!r}; remove loss_scale or use dtype='fp16'")
        if self.nvme_dir is None:
            unused = [f.name for f in dataclasses.fields(self) if f.name.startswith("nvme_") and f.name != "nvme_dir"
                      and getattr(self, f.name) != _default(f)]
            if unused:
                message = (f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without "
                           f"nvme_dir (the NVMe tier is off); set nvme_dir to a folder to turn it on, or remove "
                           f"{'it' if len(unused) == 1 else 'them'}")
                warnings.warn(message, UserWarning, stacklevel=4)

    # -- derived -----------------------------------------------------------------------

    @property
    def mixed_precision(self) -> bool:
        return self.dtype != "fp32"

    @property
    def param_bytes(self) -> int:
        """Bytes per element of a parameter on the device."""
        return 4 if self.dtype == "fp32" else 2

    @property
    def uses_loss_scaling(self) -> bool:
        return self.dtype == "fp16"

    # -- construction ------------------------------------------------------------------

    @classmethod
    def coerce(cls, value: "Config | Mapping[str, Any] | str | os.PathLike | None") -> "Config":
        """A Config from a Config, a dict of its keys, a JSON file path, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, Config):
            return value
        if isinstance(value, Mapping):
            return _from_mapping(cls, value)
        if isinstance(value, (str, os.PathLike)):
            return cls.from_json(value)
        raise ValueError(f"config={value!r} is not a config: give hetmem.Config(...), a dict of its keys, "
                         f"or the path of a JSON file")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Config":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"config file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a JSON object of config keys")
        return _from_mapping(cls, data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["optimizer"]["betas"] = list(self.optimizer.betas)
        return data

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def _default(f: dataclasses.Field) -> Any:
    """A field's default as __post_init__ leaves it (sizes parsed)."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return parse_size(value, key=f.name) if f.name == "nvme_block_size" else value


def _from_mapping(cls, data: Mapping[str, Any], prefix: str = ""):
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {prefix}{key!r}{hint} (valid keys: {', '.join(names)})")
    kwargs = dict(data)
    if cls is AdamConfig and "betas" in kwargs and isinstance(kwargs["betas"], list):
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(**kwargs)
