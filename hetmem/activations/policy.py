"""Which saved activations go to host memory, chosen from the warm-up's trace.

The warm-up records, per moment *t* of the micro-step, the chunk bytes that must be on the
device (``chunks[t]``: the moment's working set, or what was pinned, whichever is larger) and
the non-model peak as it would be with nothing offloaded (``non_model[t]``), and, per saved
activation (one record per device storage autograd saved; views share it):

- ``packed_at``: the moment whose interval saved it;
- ``free_from``: the first moment at which nothing but autograd held its storage, i.e. from
  when moving it to host memory really frees device bytes (a tensor the forward still holds
  in a local variable would stay on the device however many copies we make);
- ``used_at``: the moment at which backward first unpacked it (None: never).

An offloaded activation is back on the device at ``used_at - 1`` (its restore is issued there,
so the copy overlaps that moment's compute: one moment of lead), so it is off the device
during its *window* ``[free_from, used_at - 2]``.

**Choice: greedy by bytes x window length.**  ``deficit[t] = chunks[t] + non_model[t] -
usable``.  Records are taken largest ``nbytes * len(window)`` first (the bytes that stay unused
longest); a record is selected when its window covers a moment still in deficit, and its bytes
are subtracted over the whole window.  It stops when no moment is in deficit.  Nothing is
selected when every moment fits (``activation_offload="auto"`` moves nothing then).  The
greedy is feasible exactly when offloading every candidate would be (a moment left in deficit
has all its covering candidates selected), so ``floor_with_offload`` — the largest
``chunks[t] + non_model[t] - (bytes of all candidates covering t)`` — is the smallest budget
the plan can meet, and ``hetmem.profile`` reports it.

**Rejected: a transfer-cost model** (Fuyou/LoHan style: minimise bytes moved subject to the
copies hiding behind compute, from a measured link bandwidth and per-moment compute time).
It needs link and compute timings that the warm-up does not have on the CPU (where the
"device" and host are the same memory) and that differ between the warm-up and later steps;
the greedy above already moves few bytes (each selected record is the one freeing the most
byte-moments, and only deficits pull records in) and its result only depends on sizes and
the schedule, so it is the same on every machine and testable exactly.  Also rejected:
offloading every saved tensor (``torch.autograd.graph.save_on_cpu``), which moves all bytes
even when the budget holds them, and oldest-first, which ignores size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# saved tensors smaller than this stay on the device: the bookkeeping would cost more than they free
MIN_OFFLOAD_BYTES = 16 << 10


@dataclass
class SavedRecord:
    """What the warm-up saw of one saved device storage (see the module docstring)."""

    nbytes: int
    packed_at: int
    free_from: int | None = None
    used_at: int | None = None

    def window(self, moments: int) -> range:
        """Moments it spends in host memory when offloaded (empty: offloading gains nothing)."""
        if self.free_from is None or self.nbytes < MIN_OFFLOAD_BYTES:
            return range(0)
        end = moments if self.used_at is None else self.used_at - 1
        return range(self.free_from, max(self.free_from, end))

    @property
    def restore_at(self) -> int | None:
        """The moment whose start brings it back (None: never needed again)."""
        return None if self.used_at is None else self.used_at - 1


@dataclass
class OffloadPlan:
    restore_at: dict[int, int | None] = field(default_factory=dict)  # record index -> restore moment
    saving: list[int] = field(default_factory=list)   # per moment: bytes kept in host memory
    deficit: int = 0                                   # largest bytes over the budget left (0: fits)

    @property
    def feasible(self) -> bool:
        return self.deficit <= 0


def plan_offload(records: list[SavedRecord], chunks: list[int], non_model: list[int], usable: int,
                 excluded: set[int] = frozenset()) -> OffloadPlan:
    """The greedy plan (module docstring) for a device budget of ``usable`` bytes."""
    moments = len(chunks)
    deficit = [chunks[t] + non_model[t] - usable for t in range(moments)]
    plan = OffloadPlan(saving=[0] * moments)
    if max(deficit, default=0) > 0:
        ranked = sorted((i for i in range(len(records)) if i not in excluded),
                        key=lambda i: (-records[i].nbytes * len(records[i].window(moments)), i))
        for i in ranked:
            record = records[i]
            window = record.window(moments)
            if not window or not any(deficit[t] > 0 for t in window):
                continue
            plan.restore_at[i] = record.restore_at
            for t in window:
                deficit[t] -= record.nbytes
                plan.saving[t] += record.nbytes
            if max(deficit) <= 0:
                break
    plan.deficit = max(0, max(deficit, default=0))
    return plan


def floor_with_offload(records: list[SavedRecord], chunks: list[int], non_model: list[int]) -> int:
    """The smallest usable budget the plan can meet: every candidate offloaded."""
    moments = len(chunks)
    saving = [0] * moments
    for record in records:
        for t in record.window(moments):
            saving[t] += record.nbytes
    return max((chunks[t] + non_model[t] - saving[t] for t in range(moments)), default=0)


def floor_without_offload(chunks: list[int], non_model: list[int]) -> int:
    return max((c + n for c, n in zip(chunks, non_model)), default=0)
