"""The NVMe optimizer pipeline's shape: its unit, how far it reads ahead, and the host memory it holds.

With optimizer state on NVMe the step walks the chunk groups in order (hetmem/optimizer.py): while
group i is updated by the CPU Adam, the next ``depth`` groups are being read from NVMe and groups
already updated are written back (the host budget spills them first).  So the step holds
``depth + 2`` groups in host memory at once: one being written back, one being updated, ``depth``
being read.

The unit is one chunk group.  The chunk manager keeps whole chunks resident (a chunk's payload
is one buffer, its tier one state), so the pipeline cannot read part of a group; the unit's size
is set through ``chunk_size`` (a group holds ``chunk_size`` parameters of every kind).  "auto"
chunk sizing gives several groups per device budget, which with state on NVMe is also many
groups per step: the pipeline's fill (the first group's read) and drain (the last write) are a
small share of the step.  Measured on the development VM (``benchmarks/nvme_train.py
--chunk-size`` / ``--pipeline-depth``, README "NVMe pipeline"), smaller units than "auto" did not
make the step faster.

Depth, ``nvme_pipeline_depth``: an int >= 1, or "auto".  Reading one group ahead already keeps
the disk busy whenever it is the bottleneck (the read of group i+1 and the writes of updated
groups are in flight while group i computes; the CPU Adam ran at 5-10x the disk's rate on the
development VM); a deeper read-ahead only adds host memory, and measured no faster.  "auto" is
therefore the depth that lets the CPU Adam hide behind the reads: ``ceil(adam_time /
read_time)`` of one group from the disk and Adam rates when they are known (at most
``AUTO_MAX_DEPTH``), else 1 - and never more than the host budget holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hetmem._core.units import format_bytes

AUTO = "auto"
AUTO_MAX_DEPTH = 4       # "auto" never reads further ahead than this
GROUPS_BESIDE_READS = 2  # the group being updated and the one being written back


@dataclass(frozen=True)
class PipelinePlan:
    depth: int            # chunk groups read ahead of the one being updated
    group_bytes: int      # the largest chunk group: the pipeline's unit
    reason: str           # how depth was chosen (logged, and reported by the benchmarks)

    @property
    def host_groups(self) -> int:
        """Chunk groups the step holds in host memory at once."""
        return self.depth + GROUPS_BESIDE_READS

    @property
    def host_bytes(self) -> int:
        return self.host_groups * self.group_bytes


def check_depth_setting(value) -> None:
    """ValueError naming ``nvme_pipeline_depth`` unless ``value`` is "auto" or an int >= 1."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"nvme_pipeline_depth={value!r} is invalid: give 'auto' or the number of chunk groups "
                         f"the optimizer step reads ahead from NVMe (an int >= 1; 1 is enough when the disk is "
                         f"the bottleneck)")


def plan_pipeline(group_bytes: int, host_budget: int, setting: int | str = AUTO, *,
                  read_bytes_per_s: float | None = None, adam_bytes_per_s: float | None = None) -> PipelinePlan:
    """The plan for groups of up to ``group_bytes`` under ``host_budget``.

    ``read_bytes_per_s`` / ``adam_bytes_per_s``: the disk's read rate and the CPU Adam's rate (bytes
    of state per second), when measured; "auto" uses them, else reads one group ahead.  Raises
    ValueError naming the value and the fix when the host budget cannot hold the plan."""
    check_depth_setting(setting)
    room = host_budget // group_bytes - GROUPS_BESIDE_READS  # groups that can be read ahead
    if setting == AUTO:
        if read_bytes_per_s and adam_bytes_per_s:
            wanted = max(1, math.ceil(read_bytes_per_s / adam_bytes_per_s))
            reason = (f"auto: the CPU Adam ({adam_bytes_per_s / 1e9:.2f} GB/s) hides behind {wanted} group read(s) "
                      f"at {read_bytes_per_s / 1e9:.2f} GB/s")
        else:
            wanted, reason = 1, "auto: one group ahead keeps the disk busy"
        depth = min(wanted, AUTO_MAX_DEPTH, max(room, 1))
        if depth < min(wanted, AUTO_MAX_DEPTH):
            reason += f", limited to {depth} by host_budget={format_bytes(host_budget)}"
    else:
        depth, reason = setting, "nvme_pipeline_depth"
    plan = PipelinePlan(depth, group_bytes, reason)
    if plan.host_bytes > host_budget:
        raise ValueError(
            f"host_budget={format_bytes(host_budget)} is too small for the NVMe pipeline: it keeps {plan.host_groups} "
            f"chunk groups of up to {format_bytes(group_bytes)} in host memory (one written back, one updated, "
            f"{depth} read ahead: nvme_pipeline_depth={setting!r}); raise host_budget to at least "
            f"{format_bytes(plan.host_bytes)}, " + ("lower nvme_pipeline_depth, " if setting != AUTO and setting > 1
                                                    else "") + "or lower chunk_size")
    return plan
