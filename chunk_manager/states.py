"""Tiers, chunk kinds, tensor and chunk states, and their legal transitions as data.

A transition that is not in a table raises ``IllegalTransition``; nothing returns silently.
Chunk state is derived from where the chunk is, whether it is moving, and its tensors' states.
"""
from __future__ import annotations

import enum


class Tier(enum.Enum):
    """Where a chunk's payload lives."""

    DEVICE = "device"  # the compute device (a GPU, or the CPU under an enforced budget)
    HOST = "host"      # host memory (pinned on GPU machines), limited by host_budget
    NVME = "nvme"      # a swap file under nvme_dir


class ChunkKind(enum.Enum):
    """What a chunk holds.  Chunk i of every kind covers the same parameters (chunk group i)."""

    PARAM = "PARAM"            # parameters in the compute dtype; in mixed precision also their
                               # gradients after backward (in-slot gradients)
    MASTER = "MASTER"          # fp32 master weights (mixed precision only)
    EXP_AVG = "EXP_AVG"        # Adam first moment, fp32
    EXP_AVG_SQ = "EXP_AVG_SQ"  # Adam second moment, fp32
    GRAD = "GRAD"              # fp32 gradients, where they cannot live in the PARAM slot


class TensorState(enum.Enum):
    """The state of one parameter's slot in its PARAM chunk."""

    HOLD = "hold"                      # the slot holds the current weights; not in use
    COMPUTE = "compute"                # weights in use by a forward/backward computation; the
                                       # chunk is pinned on the compute device
    HOLD_AFTER_FWD = "hold_after_fwd"  # used by this iteration's forward; waiting for backward
    HOLD_AFTER_BWD = "hold_after_bwd"  # this iteration's gradient is complete and lives in a GRAD
                                       # chunk; the slot still holds the weights
    GRAD_IN_SLOT = "grad_in_slot"      # the slot holds this iteration's gradient (mixed precision):
                                       # the weights exist only in the fp32 master until the step


class ChunkState(enum.Enum):
    """Derived from the chunk's tier, transfer and tensors; never set directly."""

    UNPLACED = "unplaced"    # no payload anywhere yet (during materialisation)
    IN_FLIGHT = "in_flight"  # a transfer between two tiers is under way; wait before use
    COMPUTE = "compute"      # pinned: in use by compute or the optimizer; may not move
    HOLD = "hold"            # resident on a tier and idle: may be moved or evicted


class IllegalTransition(RuntimeError):
    """A state change that the transition tables do not allow (a bug or a misuse)."""


T = TensorState
TENSOR_TRANSITIONS: dict[TensorState, frozenset[TensorState]] = {
    T.HOLD: frozenset({T.COMPUTE, T.HOLD_AFTER_BWD, T.GRAD_IN_SLOT}),
    T.COMPUTE: frozenset({T.HOLD, T.HOLD_AFTER_FWD, T.HOLD_AFTER_BWD, T.GRAD_IN_SLOT}),
    T.HOLD_AFTER_FWD: frozenset({T.COMPUTE, T.HOLD, T.HOLD_AFTER_BWD, T.GRAD_IN_SLOT}),
    # A gradient kept in a GRAD chunk leaves the weights usable (gradient accumulation).
    T.HOLD_AFTER_BWD: frozenset({T.COMPUTE, T.HOLD, T.HOLD_AFTER_BWD}),
    # Only the optimizer step (or an fp16 overflow restore) puts weights back in the slot.
    T.GRAD_IN_SLOT: frozenset({T.HOLD}),
}
del T

# Moves between tiers a chunk may make (src, dst).  NVMe <-> device goes through the host.
TIER_MOVES: frozenset[tuple[Tier, Tier]] = frozenset({
    (Tier.HOST, Tier.DEVICE), (Tier.DEVICE, Tier.HOST),
    (Tier.HOST, Tier.NVME), (Tier.NVME, Tier.HOST),
})


def check_tensor_transition(name: str, src: TensorState, dst: TensorState) -> None:
    if src is dst:
        return
    if dst not in TENSOR_TRANSITIONS[src]:
        hint = ""
        if src is TensorState.GRAD_IN_SLOT:
            hint = (" (its slot holds the gradient until engine.step(); a forward or backward use of "
                    "the weights before the step is a schedule the warm-up did not see)")
        raise IllegalTransition(f"parameter {name!r}: {src.name} -> {dst.name} is not a legal transition{hint}")


def check_tier_move(chunk_name: str, src: Tier, dst: Tier) -> None:
    if (src, dst) not in TIER_MOVES:
        raise IllegalTransition(f"{chunk_name}: a move {src.value} -> {dst.value} is not legal; "
                                f"legal moves: {sorted((a.value, b.value) for a, b in TIER_MOVES)}")
