"""A small, valid run trace whose every number is known, for the report's tests.

Two steps of a two-layer model (``layers.0``, ``layers.1``) in bf16 with fp32 Adam state:
step 0 is the warm-up, step 1 the steady step.  Chunks hold 2**20 elements; group 0 uses
1_000_000 of them, group 1 700_000.  Sizes below are MiB.

Chunks (id: kind, group, bytes):
    0: PARAM 0 (2)   1: PARAM 1 (2)   2: MASTER 0 (4)      3: MASTER 1 (4)
    4: EXP_AVG 0 (4) 5: EXP_AVG 1 (4) 6: EXP_AVG_SQ 0 (4)  7: EXP_AVG_SQ 1 (4)   8: GRAD 0 (2)

Step 1 moments (device PARAM, GRAD, non-model | host PARAM, GRAD, MASTER, EXP_AVG, EXP_AVG_SQ |
nvme MASTER, EXP_AVG, EXP_AVG_SQ | chunk budget); device totals 5, 13, 26, 16, 1:
    0 pre_forward  layers.0   2 0  3 | 2 2 4 4 4 | 4 4 4 | 61
    1 pre_forward  layers.1   4 0  9 | 0 2 4 4 4 | 4 4 4 | 55
    2 pre_backward layers.1   4 2 20 | 0 0 4 4 4 | 4 4 4 | 44
    3 pre_backward layers.0   2 2 12 | 2 0 4 4 4 | 4 4 4 | 52
    4 optimizer    ""         0 0  1 | 4 2 8 8 8 | 0 0 0 | 63
Step 0 has the same chunk bytes, non-model 4, 10, 22, 13, 1 and chunk budget 32 everywhere.

Step 1 moves (times are step 0's + 1.0 s; step 0's waits are doubled):
    host->device   PARAM 0, PARAM 1, GRAD 8     3 x 2 MiB, waits 0.003 + 0 + 0
    device->host   PARAM 1, PARAM 0, GRAD 8     3 x 2 MiB, waits 0.001 + 0 + 0
    nvme->host     MASTER 3, EXP_AVG 5, EXP_AVG_SQ 7   3 x 4 MiB (overlapping), waits 0.002 + 0 + 0
    host->nvme     the same three, 3 x 4 MiB (overlapping), no wait
Step 1 time: forward 0.2, backward 0.3, optimizer 0.25, wait 0.006, total 0.8 s.
"""
from __future__ import annotations

MIB = 1 << 20
ELEMENTS = 1 << 20
USED = {0: 1_000_000, 1: 700_000}          # used elements per chunk group

# (id, kind, group, dtype)
_CHUNKS = [(0, "PARAM", 0, "bfloat16"), (1, "PARAM", 1, "bfloat16"),
           (2, "MASTER", 0, "float32"), (3, "MASTER", 1, "float32"),
           (4, "EXP_AVG", 0, "float32"), (5, "EXP_AVG", 1, "float32"),
           (6, "EXP_AVG_SQ", 0, "float32"), (7, "EXP_AVG_SQ", 1, "float32"),
           (8, "GRAD", 0, "bfloat16")]
_SIZE = {"bfloat16": 2, "float32": 4}

# (kind, module, t offset, device (PARAM, GRAD), host (PARAM, GRAD, MASTER, EXP_AVG, EXP_AVG_SQ),
#  nvme (MASTER, EXP_AVG, EXP_AVG_SQ)) in MiB
_MOMENTS = [
    ("pre_forward", "layers.0", 0.00, (2, 0), (2, 2, 4, 4, 4), (4, 4, 4)),
    ("pre_forward", "layers.1", 0.10, (4, 0), (0, 2, 4, 4, 4), (4, 4, 4)),
    ("pre_backward", "layers.1", 0.20, (4, 2), (0, 0, 4, 4, 4), (4, 4, 4)),
    ("pre_backward", "layers.0", 0.35, (2, 2), (2, 0, 4, 4, 4), (4, 4, 4)),
    ("optimizer", "", 0.50, (0, 0), (4, 2, 8, 8, 8), (0, 0, 0)),
]
NON_MODEL = {0: (4, 10, 22, 13, 1), 1: (3, 9, 20, 12, 1)}                # MiB per moment, per step
CHUNK_BUDGET = {0: (32, 32, 32, 32, 32), 1: (61, 55, 44, 52, 63)}         # MiB

# (chunk, src, dst, MiB, t_start, t_end, wait_s in step 1, cause); times relative to the step
_MOVES = [
    (0, "host", "device", 2, 0.000, 0.004, 0.003, "fetch"),
    (1, "host", "device", 2, 0.050, 0.060, 0.0, "prefetch"),
    (8, "host", "device", 2, 0.190, 0.200, 0.0, "prefetch"),
    (1, "device", "host", 2, 0.340, 0.350, 0.001, "evict"),
    (0, "device", "host", 2, 0.490, 0.500, 0.0, "evict"),
    (8, "device", "host", 2, 0.495, 0.505, 0.0, "evict"),          # overlaps the one above
    (3, "nvme", "host", 4, 0.500, 0.560, 0.002, "optimizer"),
    (5, "nvme", "host", 4, 0.510, 0.570, 0.0, "optimizer"),
    (7, "nvme", "host", 4, 0.520, 0.580, 0.0, "optimizer"),
    (3, "host", "nvme", 4, 0.700, 0.750, 0.0, "optimizer"),
    (5, "host", "nvme", 4, 0.710, 0.760, 0.0, "optimizer"),
    (7, "host", "nvme", 4, 0.720, 0.770, 0.0, "optimizer"),
]
# (chunk, moment)
_EVICTIONS = [(1, 3), (0, 4), (8, 4)]
_TIME = {0: {"forward_s": 0.3, "backward_s": 0.4, "optimizer_s": 0.3, "wait_s": 0.010, "total_s": 1.0},
         1: {"forward_s": 0.2, "backward_s": 0.3, "optimizer_s": 0.25, "wait_s": 0.006, "total_s": 0.8}}
_PHASES = {0: [("forward", 0.0, 0.3), ("backward", 0.3, 0.7), ("optimizer", 0.7, 1.0)],
           1: [("forward", 1.0, 1.2), ("backward", 1.2, 1.5), ("optimizer", 1.5, 1.8)]}
_KIND = {c[0]: c[1] for c in _CHUNKS}


def _step(number: int) -> dict:
    start = float(number)
    moments = []
    for index, (kind, module, dt, device, host, nvme) in enumerate(_MOMENTS):
        moments.append({
            "index": index, "kind": kind, "module": module, "t": start + dt,
            "device": {"PARAM": device[0] * MIB, "GRAD": device[1] * MIB,
                       "non_model": NON_MODEL[number][index] * MIB},
            "host": dict(zip(("PARAM", "GRAD", "MASTER", "EXP_AVG", "EXP_AVG_SQ"), (v * MIB for v in host))),
            "nvme": dict(zip(("MASTER", "EXP_AVG", "EXP_AVG_SQ"), (v * MIB for v in nvme))),
            "chunk_budget": CHUNK_BUDGET[number][index] * MIB,
        })
    moves = [{"chunk": chunk, "kind": _KIND[chunk], "src": src, "dst": dst, "bytes": mib * MIB,
              "t_start": start + t0, "t_end": start + t1, "wait_s": wait * (2 if number == 0 else 1),
              "cause": cause}
             for chunk, src, dst, mib, t0, t1, wait, cause in _MOVES]
    evictions = [{"chunk": chunk, "kind": _KIND[chunk], "src": "device", "dst": "host",
                  "t": moments[moment]["t"], "moment": moment,
                  "reason": f"belady: chunk {chunk} is next used farthest away"}
                 for chunk, moment in _EVICTIONS]
    return {
        "step": number, "warmup": number == 0, "t_start": start, "t_end": start + _TIME[number]["total_s"],
        "phases": [{"name": n, "t_start": a, "t_end": b} for n, a, b in _PHASES[number]],
        "moments": moments, "moves": moves, "evictions": evictions, "time": dict(_TIME[number]),
    }


def synthetic_trace() -> dict:
    """A fresh copy of the trace described in the module docstring."""
    return {
        "format": "hetmem-trace",
        "version": 1,
        "meta": {
            "hetmem_version": "0.1.0", "torch_version": "2.13.0+cpu",
            "created": "2026-11-21T22:30:00+00:00", "device": "cpu", "dtype": "bf16",
            "budgets": {"device": 64 * MIB, "host": 256 * MIB, "nvme": 1024 * MIB},
            "chunk_elements": ELEMENTS,
            "model": {"name": "two-linear", "parameters": 1_700_000, "trainable_parameters": 1_700_000},
        },
        "chunks": [{"id": i, "kind": kind, "group": group, "dtype": dtype,
                    "capacity_elements": ELEMENTS, "used_elements": USED[group],
                    "bytes": ELEMENTS * _SIZE[dtype],
                    "params": [f"layers.{group}.weight", f"layers.{group}.bias"]}
                   for i, kind, group, dtype in _CHUNKS],
        "steps": [_step(0), _step(1)],
        "non_model_by_module": {"layers.0": 13 * MIB, "layers.1": 22 * MIB},
    }
