"""Channel spaces: the channel axes that widening may grow.

A :class:`ChannelSpace` is created for every producer (a conv or linear
output, ...) and for every tensor that must never change (model inputs,
results of ops the analysis does not understand).  Its channels get global
ids ``base .. base + size - 1``; labels (see :mod:`graphgrow.core.labels`)
carry these ids through the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .labels import MAX_CHANNELS


@dataclass
class ChannelSpace:
    id: int
    name: str
    size: int
    base: int
    kind: str  # "produced" or "fixed"
    producers: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    carriers: list = field(default_factory=list)
    frozen_reasons: list = field(default_factory=list)

    @property
    def chan_ids(self) -> np.ndarray:
        return np.arange(self.base, self.base + self.size, dtype=np.int64)

    def add_role(self, role: str, name: str) -> None:
        lst = {"producer": self.producers, "consumer": self.consumers, "carrier": self.carriers}[role]
        if name not in lst:
            lst.append(name)

    def freeze(self, reason: str) -> None:
        if reason not in self.frozen_reasons:
            self.frozen_reasons.append(reason)


class SpaceTable:
    """All channel spaces of one graph, with lookup from global channel id."""

    def __init__(self):
        self.spaces: list[ChannelSpace] = []
        self._bases: list[int] = []
        self.num_chans = 0

    def new_space(self, name: str, size: int, kind: str) -> ChannelSpace:
        size = int(size)
        if self.num_chans + size >= MAX_CHANNELS:
            raise OverflowError("too many channels for the label encoding")
        sp = ChannelSpace(id=len(self.spaces), name=name, size=size, base=self.num_chans, kind=kind)
        self.spaces.append(sp)
        self._bases.append(self.num_chans)
        self.num_chans += size
        return sp

    def space_ids_of(self, chans: np.ndarray) -> np.ndarray:
        bases = np.asarray(self._bases, dtype=np.int64)
        return np.searchsorted(bases, np.asarray(chans, dtype=np.int64), side="right") - 1

    def spaces_of(self, chans) -> list:
        ids = np.unique(self.space_ids_of(np.unique(np.asarray(chans, dtype=np.int64))))
        return [self.spaces[i] for i in ids]

    def produced(self) -> list:
        return [s for s in self.spaces if s.kind == "produced"]
