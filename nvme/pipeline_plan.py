"""The NVMe optimizer pipeline's shape: its unit, how far it reads ahead, and the host memory it holds.

With optimizer state on NVMe the step walks the chunk groups in order (hetmem/optimizer.py): while
group i is updated by the CPU Adam, the next ``depth`` groups are being read from NVMe and groups
already updated are written back (the host budget spills them first).  So the step holds
``depth + 2`` groups in host memory at once: one being written back, one being updated, ``depth``
being read.

The unit is one chunk group.  Splitting a group into sub-group slices for IO is not done: the
chunk manager keeps whole chunks resident (a chunk's payload is one buffer, its tier one state),
so the unit's size is set through ``chunk_size`` (a group holds ``chunk_size`` parameters of every
kind; a parameter larger than that gets a group of its own).  "auto" chunk sizing already gives
many groups per step (73 for the 151.5M GPT of ``benchmarks/nvme_train.py``, each at most 72 MiB
of state: about 4.7M parameters, below DeepSpeed's best ``sub_group_size`` of 2e7 on this kind of
machine), so the pipeline's fill (the first group's read) and drain (the last write) are a small
share of the step.  Measured there (README "NVMe tier"): ``chunk_size`` 2M elements moved 44%
more bytes per step and was slower; 8M elements needs a host budget of 3 x 144 MiB.

Depth, ``nvme_pipeline_depth``: an int >= 1, or "auto", which is 1.  Reading one group ahead
keeps the disk busy whenever it is the bottleneck: the read of group i+1 and the writes of updated
groups are in flight while group i computes, and the CPU Adam ran at about 7x the disk's mixed
rate on the development VM.  When the CPU is the bottleneck instead, the disk idles whatever the
depth.  A deeper read-ahead only holds more groups in host memory, which displaces others: on the
development VM (README "NVMe tier", ``benchmarks/nvme_train.py --pipeline-depth``) depths 2 and 3
moved 10-15% more bytes per step and were no faster.
"""
from __future__ import annotations

from dataclasses import dataclass

from hetmem._core.units import format_bytes

AUTO = "auto"
AUTO_DEPTH = 1           # what "auto" reads ahead (see the module docstring)
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
                  total_bytes: int | None = None) -> PipelinePlan:
    """The plan for groups of up to ``group_bytes`` under ``host_budget``; ValueError naming the
    value and the fix when the host budget cannot hold it.  ``total_bytes``: every group's bytes,
    the most the step can hold (a model of one or two groups needs no room for three)."""
    check_depth_setting(setting)
    if setting == AUTO:
        depth, reason = AUTO_DEPTH, "auto: one group ahead keeps the disk busy"
    else:
        depth, reason = setting, "nvme_pipeline_depth"
    plan = PipelinePlan(depth, group_bytes, reason)
    need = plan.host_bytes if total_bytes is None else min(plan.host_bytes, total_bytes)
    if need > host_budget:
        raise ValueError(
            f"host_budget={format_bytes(host_budget)} is too small for the NVMe pipeline: it keeps {plan.host_groups} "
            f"chunk groups of up to {format_bytes(group_bytes)} in host memory (one written back, one updated, "
            f"{depth} read ahead: nvme_pipeline_depth={setting!r}); raise host_budget to at least "
            f"{format_bytes(need)}, " + ("lower nvme_pipeline_depth, " if setting != AUTO and setting > 1
                                                    else "") + "or lower chunk_size")
    return plan
