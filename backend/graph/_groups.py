"""Union-find over channel slots, and the step from merged slots to :class:`ChannelGroup` records.

A *slot* is one run of channels created by one producer (the model input, a conv's output, an
unknown op's output). Coupling ops union slots; each resulting set becomes one channel group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from prunetune.backend.graph._records import ChannelGroup, ChannelMember

__all__ = ["Channels", "Segment", "SlotSet"]


class Segment(NamedTuple):
    """A run of features along dim 1 of a tensor: ``size`` channels of one slot.

    ``mult`` is how many consecutive dim-1 features each channel spans (``H*W`` after a flatten).
    """

    slot: int
    size: int
    mult: int = 1


Channels = tuple[Segment, ...]
"""What dim 1 of a tensor is made of, in order (several segments after a concat)."""


@dataclass
class _Slot:
    size: int
    order: int
    producer: str
    step: int = 1
    reasons: list[str] = field(default_factory=list)
    members: list[tuple[int, ChannelMember]] = field(default_factory=list)


class SlotSet:
    """Slots of channels with union-find, fixed reasons, steps and members."""

    def __init__(self) -> None:
        self._slots: list[_Slot] = []
        self._parent: list[int] = []
        self._sequence = 0

    def new(self, size: int, producer: str, reason: str | None = None) -> int:
        """Create a slot of ``size`` channels produced by ``producer``; fixed if ``reason``."""
        index = len(self._slots)
        self._slots.append(_Slot(size=size, order=index, producer=producer))
        self._parent.append(index)
        if reason is not None:
            self._slots[index].reasons.append(reason)
        return index

    def find(self, slot: int) -> int:
        """The representative slot of ``slot``'s set."""
        root = slot
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[slot] != root:
            self._parent[slot], slot = root, self._parent[slot]
        return root

    def set_of(self, slot: int) -> list[int]:
        """Every slot in ``slot``'s set (coupled one to one with it), ``slot`` first."""
        root = self.find(slot)
        return [slot, *(s for s in range(len(self._slots)) if s != slot and self.find(s) == root)]

    def size(self, slot: int) -> int:
        """Channels in ``slot``."""
        return self._slots[slot].size

    def union(self, first: int, second: int) -> int:
        """Merge the sets of two slots of equal size; returns the new representative."""
        a, b = self.find(first), self.find(second)
        if a == b:
            return a
        if self._slots[b].order < self._slots[a].order:
            a, b = b, a
        keep, gone = self._slots[a], self._slots[b]
        keep.step = math.lcm(keep.step, gone.step)
        keep.reasons.extend(r for r in gone.reasons if r not in keep.reasons)
        keep.members.extend(gone.members)
        self._parent[b] = a
        return a

    def fix(self, slot: int, reason: str) -> None:
        """Mark ``slot``'s set as kept whole, for ``reason``."""
        reasons = self._slots[self.find(slot)].reasons
        if reason not in reasons:
            reasons.append(reason)

    def is_fixed(self, slot: int) -> bool:
        """Whether ``slot``'s set is kept whole."""
        return bool(self._slots[self.find(slot)].reasons)

    def add_step(self, slot: int, step: int) -> None:
        """Require kept widths of ``slot``'s set to be multiples of ``step``."""
        root = self._slots[self.find(slot)]
        root.step = math.lcm(root.step, step)

    def add_member(self, slot: int, member: ChannelMember) -> None:
        """Record that ``member`` is a channel dimension of ``slot``'s set."""
        self._sequence += 1
        self._slots[self.find(slot)].members.append((self._sequence, member))

    def build(self) -> tuple[tuple[ChannelGroup, ...], dict[int, str]]:
        """Turn every set that has members into a group, in producer order.

        Returns:
            The groups (ordered by their first producer in topological order) and the group name
            of every slot that belongs to one.
        """
        roots: dict[int, list[int]] = {}
        for slot in range(len(self._slots)):
            roots.setdefault(self.find(slot), []).append(slot)
        groups: list[ChannelGroup] = []
        names: dict[int, str] = {}
        used: set[str] = set()
        for root in sorted(roots, key=lambda r: self._slots[r].order):
            data = self._slots[root]
            if not data.members:
                continue
            name = data.producer
            suffix = 1
            while name in used:
                suffix += 1
                name = f"{data.producer}#{suffix}"
            used.add(name)
            members: list[ChannelMember] = []
            for _, member in sorted(data.members, key=lambda item: item[0]):
                if member not in members:
                    members.append(member)
            step = data.step
            reasons = list(data.reasons)
            if data.size % step != 0:
                reasons.append(f"its {data.size} channels cannot be split into {step} equal slices")
                step = 1
            groups.append(
                ChannelGroup(
                    name=name,
                    size=data.size,
                    members=tuple(members),
                    prunable=not reasons,
                    reason="; ".join(reasons) if reasons else None,
                    step=step if not reasons else 1,
                )
            )
            for slot in roots[root]:
                names[slot] = name
        return tuple(groups), names
