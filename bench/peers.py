"""The low-bit AdamWs of other libraries that the benchmarks measure beside AdaWarm's 8-bit
state, where they install: bitsandbytes' and torchao's (neither is a dependency; a peer that
does not import reports why)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata

import torch


@dataclass(frozen=True)
class Peer:
    package: str
    module: str
    name: str
    state: str  # what its state is stored in: "8-bit", "4-bit"

    @property
    def kind(self) -> str:
        """Its name as a training method's kind (``bench.grid.Method``)."""
        return f"{self.package} {self.name}"

    def load(self) -> type[torch.optim.Optimizer]:
        """Its optimizer class; ImportError (or the package's own error) where it does not
        install or import."""
        return getattr(importlib.import_module(self.module), self.name)

    def label(self) -> str:
        """Its name with the installed version, as reports print it."""
        return f"{self.package} {metadata.version(self.package)} {self.name}"


PEERS = (
    Peer("bitsandbytes", "bitsandbytes.optim", "AdamW8bit", "8-bit"),
    Peer("torchao", "torchao.optim", "AdamW8bit", "8-bit"),
    Peer("torchao", "torchao.optim", "AdamW4bit", "4-bit"),
)
EIGHT_BIT_PEERS = tuple(peer for peer in PEERS if peer.state == "8-bit")
BY_KIND = {peer.kind: peer for peer in PEERS}
