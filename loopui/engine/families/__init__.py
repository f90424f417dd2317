"""Model families behind one interface: ``family_for(pipe)`` picks the module that knows a pipeline's layout."""

from __future__ import annotations

from typing import Any

from .base import Family
from .cogvideox import CogVideoXFamily
from .wan import WanFamily

FAMILIES: dict[str, Family] = {family.name: family for family in (CogVideoXFamily(), WanFamily())}


def family_for(pipe: Any) -> Family:
    """The family that drives ``pipe``; ``ValueError`` naming the supported pipelines otherwise."""
    for family in FAMILIES.values():
        if family.matches(pipe):
            return family
    supported = ", ".join(name for family in FAMILIES.values() for name in family.pipelines)
    raise ValueError(f"unsupported pipeline {type(pipe).__name__} (supported: {supported})")


__all__ = ["FAMILIES", "Family", "family_for"]
