"""From a model to chunk groups: which parameters exist, under which names, in which slot.

Parameters are taken in ``named_modules()`` order (close to forward order), each unique
Parameter once; a tied weight keeps every qualified name as an alias.  Trainable and frozen
parameters are packed into separate chunk groups (a frozen group needs no optimizer state).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from hetmem.chunk_manager.chunk import ChunkGroup, ParamSlot
from hetmem.chunk_manager.sizing import choose_capacity, pack_trimmed


@dataclass
class Layout:
    slots: list[ParamSlot]                                   # unique parameters, layout order
    groups: list[ChunkGroup]                                 # trainable groups first, then frozen
    module_slots: dict[nn.Module, list[ParamSlot]]           # each module's direct parameters
    module_names: dict[nn.Module, str]                       # qualified names ("" for the root)
    by_name: dict[str, ParamSlot] = field(default_factory=dict)  # every alias -> slot
    by_param: dict[int, ParamSlot] = field(default_factory=dict)  # id(Parameter) -> slot
    chunk_elements: int = 0                                  # the chosen capacity (each chunk's tail is trimmed)

    def slot_of(self, param: nn.Parameter) -> ParamSlot:
        return self.by_param[id(param)]

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    @property
    def trainable_numel(self) -> int:
        return sum(s.numel for s in self.slots if s.trainable)


def collect_parameters(model: nn.Module) -> tuple[list[ParamSlot], dict[nn.Module, list[ParamSlot]],
                                                  dict[nn.Module, str]]:
    """Unique parameters in module order, with aliases; offsets are filled in later."""
    slots: list[ParamSlot] = []
    seen: dict[int, ParamSlot] = {}
    module_slots: dict[nn.Module, list[ParamSlot]] = {}
    module_names: dict[nn.Module, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(module, module_name)
        own = []
        for param_name, param in module.named_parameters(recurse=False):
            qualified = f"{module_name}.{param_name}" if module_name else param_name
            slot = seen.get(id(param))
            if slot is None:
                slot = ParamSlot(qualified, param, offset=0, trainable=param.requires_grad)
                seen[id(param)] = slot
                slots.append(slot)
            elif qualified not in slot.aliases:
                slot.aliases.append(qualified)
            if slot not in own:
                own.append(slot)
        if own:
            existing = module_slots.setdefault(module, [])
            existing.extend(s for s in own if s not in existing)
    return slots, module_slots, module_names


def build_layout(model: nn.Module, *, chunk_elements: int | None, max_chunk_elements: int) -> Layout:
    slots, module_slots, module_names = collect_parameters(model)
    trainable = [s for s in slots if s.trainable]
    frozen = [s for s in slots if not s.trainable]
    numels = [s.numel for s in slots]
    capacity = chunk_elements or choose_capacity(numels, max_elements=max_chunk_elements)
    groups: list[ChunkGroup] = []
    for members, is_trainable in ((trainable, True), (frozen, False)):
        packing = pack_trimmed([s.numel for s in members], capacity) if members else None
        if packing is None:
            continue
        for group_slots, group_capacity in zip(packing.groups, packing.capacities):
            placed = []
            for member_index, offset, _ in group_slots:
                slot = members[member_index]
                slot.offset = offset
                placed.append(slot)
            groups.append(ChunkGroup(len(groups), group_capacity, placed, is_trainable))
    layout = Layout(slots, groups, module_slots, module_names, chunk_elements=capacity)
    for slot in slots:
        layout.by_param[id(slot.param)] = slot
        for alias in slot.aliases:
            layout.by_name[alias] = slot
    return layout
