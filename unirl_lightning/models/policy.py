"""What every policy shares, whatever it generates: the frozen reference, FSDP2 hooks, and the
save/load contract the recipes rely on (`UnifiedPolicy`, `FlowPolicy` and `TextPolicy` build on it)."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path

from torch import Tensor, nn


class Policy(nn.Module, ABC):
    """Base of the policy interfaces.

    Subclasses implement `save_pretrained` / `from_pretrained` (recipes save the trained policy and
    load warm starts with them) and may name FSDP units and entry points.
    """

    #: Methods that read parameters outside `forward`; under FSDP2 they are registered as forward
    #: methods so the sharded parameters are gathered for them (nested calls are fine: the root
    #: keeps its parameters gathered until the outermost call ends).
    fsdp_entry_points: tuple[str, ...] = ()

    def fsdp_units(self) -> list[nn.Module]:
        """Sub-modules to shard one by one under FSDP (e.g. transformer blocks); the rest shard as the
        root."""
        return []

    def make_reference(self) -> "Policy":
        """A frozen copy of the current policy (the KL / regulariser anchor), in eval mode."""
        ref = copy.deepcopy(self)
        ref.requires_grad_(False)
        return ref.eval()

    @abstractmethod
    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Save weights and config in the family's format. `state_dict` (this module's keys) replaces
        the live weights, e.g. the full weights gathered from FSDP shards."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "Policy":
        """Load what `save_pretrained` wrote (or the family's released weights); kwargs override options."""
