"""The run trace: what the engine records and the report renders (format version 1).

A trace is one JSON object, saved as ``RUN_DIR/trace.json``.  All sizes are int bytes; all
times are float seconds since the engine was created, unless a key says otherwise::

    {
      "format": "hetmem-trace",
      "version": 1,
      "meta": {
        "hetmem_version": str, "torch_version": str,
        "created": str,                                  # ISO-8601
        "device": "cpu" | "cuda:0" | ...,
        "dtype": "fp32" | "bf16" | "fp16",               # parameter dtype on the device
        "budgets": {"device": int, "host": int | null, "nvme": int | null},
                                                         # null: no limit / tier off
        "chunk_elements": int,                           # chunk capacity in elements
        "model": {"name": str, "parameters": int, "trainable_parameters": int}
      },
      "chunks": [                                        # every chunk, once
        {"id": int, "kind": "PARAM" | "MASTER" | "EXP_AVG" | "EXP_AVG_SQ" | "GRAD",
         "group": int,                                   # chunk i of every kind covers the same params
         "dtype": "float32" | "bfloat16" | "float16",
         "capacity_elements": int, "used_elements": int, # used <= capacity; the rest is padding
         "bytes": int,                                   # capacity_elements * element size
         "params": [str, ...]}                           # qualified parameter names in the chunk
      ],
      "steps": [                                         # one per recorded iteration
        {"step": int,                                    # 0-based iteration index
         "warmup": bool,                                 # the tracer was (re)learning the schedule
         "t_start": float, "t_end": float,
         "phases": [{"name": "forward" | "backward" | "optimizer", "t_start": float, "t_end": float}],
         "moments": [
           {"index": int,                                # 0-based position within the step
            "kind": "pre_forward" | "pre_backward" | "optimizer",
            "module": str,                               # qualified module name ("" for the optimizer)
            "t": float,
            "device": {KIND: int, ..., "non_model": int},  # chunk bytes resident right after this
                                                         # moment's fetches; PEAK non-model bytes
                                                         # (activations, temporaries) until the next
            "host": {KIND: int, ...}, "nvme": {KIND: int, ...},
            "chunk_budget": int | null,                  # device bytes chunks may use in this interval
            "peak_total": int}                           # optional: the largest chunk + non-model device
                                                         # bytes measured at one instant in the interval
         ],
         "moves": [                                      # every chunk transfer between tiers
           {"chunk": int, "kind": KIND, "src": TIER, "dst": TIER, "bytes": int,
            "t_start": float, "t_end": float,
            "wait_s": float,                             # compute blocked on it (0: fully hidden)
            "cause": "fetch" | "prefetch" | "evict" | "spill" | "optimizer" | "checkpoint"}
         ],
         "evictions": [                                  # each decision to evict, with its reason
           {"chunk": int, "kind": KIND, "src": TIER, "dst": TIER, "t": float,
            "moment": int, "reason": str}
         ],
         "time": {"forward_s": float, "backward_s": float, "optimizer_s": float,
                  "wait_s": float,                       # sum of compute waits on transfers
                  "total_s": float},
         "activations": {"offloads": int, "offloaded_bytes": int,   # optional: saved activations
                         "restores": int, "restored_bytes": int,     # moved to host memory and back
                         "late_restores": int, "wait_s": float}}     # (activation_offload="auto")
      ],
      "non_model_by_module": {str: int},                 # optional: peak non-model bytes per module
      "losses": [                                        # optional: the training loop's loss per step
        {"step": int,                                    # 1-based optimizer step, increasing
         "loss": float | null,                           # null: not finite
         "lr": float | null}                             # optional: the learning rate it used
      ],
      "activation_offload": {"min_device_budget": int,          # optional: the smallest device
                             "min_device_budget_offload": int}   # budget without / with offload
    }

KIND is a chunk kind (``CHUNK_KINDS``), TIER a tier name (``TIERS``).  A kind with no bytes
may be left out of a tier dict (read it as 0).  Keys may be added in later versions:
readers ignore keys they do not know.  ``validate_trace`` checks all of the above plus the
cross-references (a move names a known chunk of the same kind, ``bytes`` agrees with the
capacity and dtype, moment indices count from 0, an eviction's moment exists).
"""
from __future__ import annotations

import math
from typing import Any

TRACE_FORMAT = "hetmem-trace"
TRACE_VERSION = 1

TIERS = ("device", "host", "nvme")
CHUNK_KINDS = ("PARAM", "MASTER", "EXP_AVG", "EXP_AVG_SQ", "GRAD")
NON_MODEL = "non_model"                      # the extra key of a moment's device dict
MODEL_DTYPES = ("fp32", "bf16", "fp16")
ELEMENT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
PHASES = ("forward", "backward", "optimizer")
MOMENT_KINDS = ("pre_forward", "pre_backward", "optimizer")
MOVE_CAUSES = ("fetch", "prefetch", "evict", "spill", "optimizer", "checkpoint")
TIME_KEYS = ("forward_s", "backward_s", "optimizer_s", "wait_s", "total_s")

# which phase a moment of each kind opens
PHASE_OF_MOMENT = {"pre_forward": "forward", "pre_backward": "backward", "optimizer": "optimizer"}


class TraceVersionError(ValueError):
    """The trace was written by a newer hetmem than this one."""


def validate_trace(trace: Any) -> None:
    """Check ``trace`` against format version 1; raise ValueError naming the first bad path.

    The message reads ``steps[1].moments[3].device.non_model: expected an int >= 0 (bytes),
    found -5``.  A trace from a newer format version raises TraceVersionError (a ValueError).
    """
    _Checker().trace(trace)


class _Checker:
    """Walks a trace; each method checks one object and knows its path for the message."""

    def trace(self, trace: Any) -> None:
        self._dict(trace, "trace")
        fmt = trace.get("format")
        if fmt != TRACE_FORMAT:
            raise ValueError(f"not a hetmem trace: format: expected {TRACE_FORMAT!r}, found {_show(fmt)}")
        version = trace.get("version")
        if not _is_int(version) or version < 1:
            raise ValueError(f"version: expected an int >= 1 (the trace format version), found {_show(version)}")
        if version > TRACE_VERSION:
            raise TraceVersionError(
                f"this trace has format version {version}, newer than the version {TRACE_VERSION} this "
                f"hetmem reads; upgrade hetmem (pip install -U hetmem) to read it")
        self.meta(self._key(trace, "meta", "", dict))
        chunks = self._key(trace, "chunks", "", list)
        chunk_kinds = {}
        for i, chunk in enumerate(chunks):
            chunk_id, kind = self.chunk(chunk, f"chunks[{i}]")
            if chunk_id in chunk_kinds:
                raise ValueError(f"chunks[{i}].id: expected a unique chunk id, found {chunk_id} twice")
            chunk_kinds[chunk_id] = kind
        steps = self._key(trace, "steps", "", list)
        numbers: set[int] = set()
        for i, step in enumerate(steps):
            self.step(step, f"steps[{i}]", chunk_kinds)
            if step["step"] in numbers:
                raise ValueError(f"steps[{i}].step: expected a unique iteration index, found {step['step']} twice")
            numbers.add(step["step"])
        if "non_model_by_module" in trace:
            by_module = self._key(trace, "non_model_by_module", "", dict)
            for name, value in by_module.items():
                if not isinstance(name, str):
                    raise ValueError(f"non_model_by_module: expected module names (str) as keys, found {name!r}")
                self._bytes(value, f"non_model_by_module[{name!r}]")
        if "losses" in trace:
            self.losses(self._key(trace, "losses", "", list))

    def losses(self, losses: list) -> None:
        previous = 0
        for i, entry in enumerate(losses):
            path = f"losses[{i}]"
            self._dict(entry, path)
            step = self._count(entry.get("step"), f"{path}.step", "an int >= 1 (the optimizer step)")
            if step <= previous:
                raise ValueError(f"{path}.step: expected steps in increasing order from 1, found {step} "
                                 f"after {previous}")
            previous = step
            for key in ("loss", "lr"):
                if entry.get(key) is not None:
                    self._number(entry[key], f"{path}.{key}", "a finite number or null")

    def meta(self, meta: dict) -> None:
        for key in ("hetmem_version", "torch_version", "created", "device"):
            self._key(meta, key, "meta", str)
        self._choice(meta.get("dtype"), MODEL_DTYPES, "meta.dtype")
        budgets = self._key(meta, "budgets", "meta", dict)
        self._bytes(budgets.get("device"), "meta.budgets.device")
        for tier in ("host", "nvme"):
            if tier not in budgets:
                raise ValueError(f"meta.budgets.{tier}: missing; expected an int (bytes) or null (no limit)")
            if budgets[tier] is not None:
                self._bytes(budgets[tier], f"meta.budgets.{tier}", "an int >= 0 (bytes) or null (no limit)")
        elements = self._key(meta, "chunk_elements", "meta", int)
        if elements < 1:
            raise ValueError(f"meta.chunk_elements: expected an int >= 1, found {elements!r}")
        model = self._key(meta, "model", "meta", dict)
        self._key(model, "name", "meta.model", str)
        for key in ("parameters", "trainable_parameters"):
            self._count(model.get(key), f"meta.model.{key}")

    def chunk(self, chunk: Any, path: str) -> tuple[int, str]:
        self._dict(chunk, path)
        chunk_id = self._count(chunk.get("id"), f"{path}.id", "an int >= 0 (chunk id)")
        kind = self._choice(chunk.get("kind"), CHUNK_KINDS, f"{path}.kind")
        self._count(chunk.get("group"), f"{path}.group")
        dtype = self._choice(chunk.get("dtype"), tuple(ELEMENT_SIZES), f"{path}.dtype")
        capacity = self._count(chunk.get("capacity_elements"), f"{path}.capacity_elements")
        used = self._count(chunk.get("used_elements"), f"{path}.used_elements")
        if used > capacity:
            raise ValueError(f"{path}.used_elements: expected <= capacity_elements={capacity}, found {used}")
        size = self._bytes(chunk.get("bytes"), f"{path}.bytes")
        if size != capacity * ELEMENT_SIZES[dtype]:
            raise ValueError(f"{path}.bytes: expected capacity_elements * element size = {capacity} * "
                             f"{ELEMENT_SIZES[dtype]} ({dtype}) = {capacity * ELEMENT_SIZES[dtype]}, found {size}")
        params = self._key(chunk, "params", path, list)
        for j, name in enumerate(params):
            if not isinstance(name, str):
                raise ValueError(f"{path}.params[{j}]: expected a parameter name (str), found {name!r}")
        return chunk_id, kind

    def step(self, step: Any, path: str, chunk_kinds: dict[int, str]) -> None:
        self._dict(step, path)
        self._count(step.get("step"), f"{path}.step", "an int >= 0 (iteration index)")
        self._key(step, "warmup", path, bool)
        self._interval(step, path)
        for i, phase in enumerate(self._key(step, "phases", path, list)):
            self._dict(phase, f"{path}.phases[{i}]")
            self._choice(phase.get("name"), PHASES, f"{path}.phases[{i}].name")
            self._interval(phase, f"{path}.phases[{i}]")
        moments = self._key(step, "moments", path, list)
        for i, moment in enumerate(moments):
            self.moment(moment, f"{path}.moments[{i}]", i)
        for i, move in enumerate(self._key(step, "moves", path, list)):
            self.move(move, f"{path}.moves[{i}]", chunk_kinds)
        for i, eviction in enumerate(self._key(step, "evictions", path, list)):
            self.eviction(eviction, f"{path}.evictions[{i}]", chunk_kinds, len(moments))
        time = self._key(step, "time", path, dict)
        for key in TIME_KEYS:
            self._seconds(time.get(key), f"{path}.time.{key}")

    def moment(self, moment: Any, path: str, position: int) -> None:
        self._dict(moment, path)
        index = moment.get("index")
        if not _is_int(index) or index != position:
            raise ValueError(f"{path}.index: expected {position} (moments count from 0, in order), "
                             f"found {_show(index)}")
        self._choice(moment.get("kind"), MOMENT_KINDS, f"{path}.kind")
        self._key(moment, "module", path, str)
        self._number(moment.get("t"), f"{path}.t")
        for tier in TIERS:
            tier_bytes = self._key(moment, tier, path, dict)
            for kind in CHUNK_KINDS:
                if kind in tier_bytes:
                    self._bytes(tier_bytes[kind], f"{path}.{tier}.{kind}")
        self._bytes(moment["device"].get(NON_MODEL), f"{path}.device.{NON_MODEL}")
        if "chunk_budget" not in moment:
            raise ValueError(f"{path}.chunk_budget: missing; expected an int (bytes) or null")
        if moment["chunk_budget"] is not None:
            self._bytes(moment["chunk_budget"], f"{path}.chunk_budget", "an int >= 0 (bytes) or null")
        if moment.get("peak_total") is not None:
            self._bytes(moment["peak_total"], f"{path}.peak_total")

    def move(self, move: Any, path: str, chunk_kinds: dict[int, str]) -> None:
        self._dict(move, path)
        self._chunk_ref(move, path, chunk_kinds)
        src = self._choice(move.get("src"), TIERS, f"{path}.src")
        dst = self._choice(move.get("dst"), TIERS, f"{path}.dst")
        if src == dst:
            raise ValueError(f"{path}.dst: expected a tier other than src={src!r}, found {dst!r}")
        self._bytes(move.get("bytes"), f"{path}.bytes")
        self._interval(move, path)
        self._seconds(move.get("wait_s"), f"{path}.wait_s")
        self._choice(move.get("cause"), MOVE_CAUSES, f"{path}.cause")

    def eviction(self, eviction: Any, path: str, chunk_kinds: dict[int, str], moments: int) -> None:
        self._dict(eviction, path)
        self._chunk_ref(eviction, path, chunk_kinds)
        self._choice(eviction.get("src"), TIERS, f"{path}.src")
        self._choice(eviction.get("dst"), TIERS, f"{path}.dst")
        self._number(eviction.get("t"), f"{path}.t")
        moment = eviction.get("moment")
        if not _is_int(moment) or not 0 <= moment < moments:
            raise ValueError(f"{path}.moment: expected a moment index of this step (0..{moments - 1}), "
                             f"found {_show(moment)}")
        self._key(eviction, "reason", path, str)

    # -- leaves ------------------------------------------------------------------------------

    def _chunk_ref(self, obj: dict, path: str, chunk_kinds: dict[int, str]) -> None:
        chunk = obj.get("chunk")
        if not _is_int(chunk) or chunk not in chunk_kinds:
            raise ValueError(f"{path}.chunk: expected the id of a chunk in the chunks table, found {_show(chunk)}")
        kind = self._choice(obj.get("kind"), CHUNK_KINDS, f"{path}.kind")
        if kind != chunk_kinds[chunk]:
            raise ValueError(f"{path}.kind: expected {chunk_kinds[chunk]!r} (the kind of chunk {chunk}), "
                             f"found {kind!r}")

    def _interval(self, obj: dict, path: str) -> None:
        start = self._number(obj.get("t_start"), f"{path}.t_start")
        end = self._number(obj.get("t_end"), f"{path}.t_end")
        if end < start:
            raise ValueError(f"{path}.t_end: expected >= t_start={start!r}, found {end!r}")

    @staticmethod
    def _dict(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a JSON object, found {_kind_of(value)}")

    @staticmethod
    def _key(obj: dict, key: str, parent: str, expected: type) -> Any:
        path = f"{parent}.{key}" if parent else key
        names = {dict: "a JSON object", list: "a list", str: "a string", bool: "true or false", int: "an int"}
        if key not in obj:
            raise ValueError(f"{path}: missing; expected {names[expected]}")
        value = obj[key]
        wrong_bool = expected is int and isinstance(value, bool)
        if not isinstance(value, expected) or wrong_bool:
            raise ValueError(f"{path}: expected {names[expected]}, found {_kind_of(value)}")
        return value

    @staticmethod
    def _choice(value: Any, choices: tuple[str, ...], path: str) -> str:
        if value not in choices or not isinstance(value, str):
            raise ValueError(f"{path}: expected one of {', '.join(map(repr, choices))}, found {_show(value)}")
        return value

    @staticmethod
    def _count(value: Any, path: str, expected: str = "an int >= 0") -> int:
        if not _is_int(value) or value < 0:
            raise ValueError(f"{path}: expected {expected}, found {_show(value)}")
        return value

    def _bytes(self, value: Any, path: str, expected: str = "an int >= 0 (bytes)") -> int:
        return self._count(value, path, expected)

    @staticmethod
    def _number(value: Any, path: str, expected: str = "a finite number (seconds)") -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: expected {expected}, found {_show(value)}")
        return value

    def _seconds(self, value: Any, path: str) -> float:
        seconds = self._number(value, path)
        if seconds < 0:
            raise ValueError(f"{path}: expected a number of seconds >= 0, found {value!r}")
        return seconds


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """The value as the message shows it: None is a missing key or a JSON null."""
    return "nothing (missing or null)" if value is None else _short(value)


def _kind_of(value: Any) -> str:
    names = {dict: "a JSON object", list: "a list", str: "a string", bool: "a boolean",
             int: "an int", float: "a number", type(None): "null"}
    return f"{names.get(type(value), type(value).__name__)} ({_short(value)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
