"""Chunks, chunk groups and parameter slots.

A chunk group is the unit of layout: an ordered list of parameter slots (offset, numel) and
one chunk per kind (PARAM, and for trainable groups MASTER/EXP_AVG/EXP_AVG_SQ/GRAD), all with
the same capacity, so slot *s* sits at the same offset in every chunk of the group and the
optimizer walks groups.
"""
from __future__ import annotations

import torch

from .states import ChunkKind, ChunkState, TensorState, Tier, check_tensor_transition

SLOT_ALIGN = 16      # elements: every slot starts 64-byte aligned in fp32 chunks
CHUNK_ALIGN = 4096   # elements: capacities are multiples, so payloads suit O_DIRECT IO


class ParamSlot:
    """One parameter's place in its chunk group, and its per-iteration bookkeeping."""

    def __init__(self, name: str, param: torch.nn.Parameter, offset: int, trainable: bool):
        self.name = name                        # first qualified name (state_dict key)
        self.aliases: list[str] = [name]        # every qualified name (tied weights share a slot)
        self.param = param                      # the user's Parameter; .data is a view or a placeholder
        self.shape = param.shape                # shape to view the slot as
        self.numel = param.numel()
        self.offset = offset                    # element offset inside the group's chunks
        self.trainable = trainable              # requires_grad at initialize()
        self.group: "ChunkGroup | None" = None  # set when the group is built
        self.state = TensorState.HOLD           # see TensorState; changed only via set_state()
        self.compute_users = 0                  # nested COMPUTE acquisitions (a param used by nested modules)
        self.step = 0                           # optimizer steps this parameter has taken (like torch)
        self.has_grad = False                   # a gradient was produced since the last step
        self.grad_fires = 0                     # gradient hook firings in the current backward
        self.expected_fires: int | None = None  # firings per backward seen in warm-up (None: unknown)

    def set_state(self, new: TensorState) -> None:
        check_tensor_transition(self.name, self.state, new)
        self.state = new

    @property
    def end(self) -> int:
        return self.offset + self.numel

    def __repr__(self) -> str:
        return f"ParamSlot({self.name!r}, numel={self.numel}, offset={self.offset}, {self.state.name})"


class ChunkGroup:
    """Slots plus one chunk per kind, all of ``capacity`` elements."""

    def __init__(self, index: int, capacity: int, slots: list[ParamSlot], trainable: bool):
        self.index = index                          # position in the layout (and in traces)
        self.capacity = capacity                    # elements per chunk of this group
        self.slots = slots                          # in layout order, non-overlapping
        self.trainable = trainable                  # frozen groups have only a PARAM chunk
        self.chunks: dict[ChunkKind, Chunk] = {}    # filled by the manager
        self.grad_in_slot = False                   # gradients go into the PARAM slots (decided after warm-up)
        for slot in slots:
            slot.group = self

    @property
    def used(self) -> int:
        """Elements up to the end of the last slot; the rest of each chunk is padding."""
        return self.slots[-1].end if self.slots else 0

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    @property
    def nbytes(self) -> int:
        """Bytes of all its chunks (the NVMe pipeline's unit is the largest group's)."""
        return sum(c.nbytes for c in self.chunks.values())

    def chunk(self, kind: ChunkKind) -> "Chunk":
        try:
            return self.chunks[kind]
        except KeyError:
            raise KeyError(f"chunk group {self.index} has no {kind.name} chunk "
                           f"(it has {', '.join(k.name for k in self.chunks)})") from None

    def __repr__(self) -> str:
        return f"ChunkGroup({self.index}, capacity={self.capacity}, slots={len(self.slots)})"


class Chunk:
    """A fixed-capacity 1-D buffer of one dtype that lives on one tier at a time."""

    def __init__(self, chunk_id: int, kind: ChunkKind, group: ChunkGroup, dtype: torch.dtype):
        self.id = chunk_id                      # unique over all chunks; names it in logs and traces
        self.kind = kind
        self.group = group                      # whose slots it stores
        self.dtype = dtype
        self.element_size = torch.empty((), dtype=dtype).element_size()
        self.capacity = group.capacity          # elements
        self.bound = False                      # PARAM: the params' .data are views of this payload
        self.tier: Tier | None = None           # where the payload is (the destination while in flight)
        self.payload: torch.Tensor | None = None  # 1-D, capacity; None while on NVMe or unplaced
        self.transfer = None                    # the Transfer in flight into self.tier, if any
        self.pins = 0                           # users that need it where it is; > 0 forbids moves
        self.resident = False                   # kept on the device for good (everything fits)
        self.nvme_valid = False                 # its NVMe blob holds its current bytes
        self.last_use = -1                      # moment clock of the last access (LRU)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.element_size

    @property
    def name(self) -> str:
        return f"{self.kind.name}#{self.group.index}"

    @property
    def state(self) -> ChunkState:
        if self.tier is None:
            return ChunkState.UNPLACED
        if self.transfer is not None and not self.transfer.done():
            return ChunkState.IN_FLIGHT
        if self.pins > 0 or any(s.state is TensorState.COMPUTE for s in self._tensor_slots()):
            return ChunkState.COMPUTE
        return ChunkState.HOLD

    def _tensor_slots(self) -> list[ParamSlot]:
        return self.group.slots if self.kind is ChunkKind.PARAM else []

    def view(self, slot: ParamSlot) -> torch.Tensor:
        """The slot as a tensor of the parameter's shape (the payload must be in memory)."""
        if self.payload is None:
            raise RuntimeError(f"{self.name} has no payload in memory (tier {self.tier})")
        return self.payload.narrow(0, slot.offset, slot.numel).view(slot.shape)

    def flat(self, start: int, stop: int) -> torch.Tensor:
        if self.payload is None:
            raise RuntimeError(f"{self.name} has no payload in memory (tier {self.tier})")
        return self.payload.narrow(0, start, stop - start)

    def __repr__(self) -> str:
        return f"Chunk({self.name}, id={self.id}, {self.dtype}, {self.capacity}, {self.tier}, pins={self.pins})"
