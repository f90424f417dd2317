"""A request's LoRAs as values: ``LoraRef``, read from the CLI / API spelling ``source[:scale[:expert]]`` or a
sidecar's record, and checked (a leaf: no torch; loading them is ``loopui.models.lora``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .values import number_text

# Which denoiser of a two-expert model (Wan 2.2 A14B) a LoRA adapts: the high-noise expert (diffusers'
# ``transformer``), the low-noise one (``transformer_2``) or both. One-expert models take only "both".
LORA_EXPERTS = ("both", "high", "low")
LORA_SCALE_MIN, LORA_SCALE_MAX = -4.0, 4.0
LORA_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of a request: its ``source`` (a local ``.safetensors`` file, a hub repo id, or
    ``owner/repo/file.safetensors``), its ``scale`` and, on a two-expert model, the ``expert`` it adapts.
    ``sha256`` (from a sidecar's record) makes loading refuse a file that has changed since."""

    source: str
    scale: float = 1.0
    expert: str = "both"
    sha256: Optional[str] = None

    def text(self) -> str:
        """The CLI / API spelling, ``source:scale`` (``:expert`` when not both)."""
        tail = "" if self.expert == "both" else f":{self.expert}"
        return f"{self.source}:{number_text(self.scale)}{tail}"

    def to_dict(self) -> dict:
        out = {"source": self.source, "scale": self.scale, "expert": self.expert}
        if self.sha256:
            out["sha256"] = self.sha256
        return out


def parse_lora(value: Any, name: str = "loras") -> LoraRef:
    """One LoRA from a ``LoraRef``, a ``"source[:scale[:expert]]"`` string, a ``(source, scale[, expert])`` pair or
    a mapping with those keys (a sidecar's record: its ``sha256`` is kept, other keys are ignored).

    Only a trailing number or expert name is split off a string, so a path with a colon in it stays whole. The
    range of the scale is :func:`check_lora_refs`' business. ``ValueError`` names ``name`` and the source.
    """
    if isinstance(value, LoraRef):
        return value
    sha256 = None
    if isinstance(value, str):
        source, scale, expert = value.strip(), 1.0, "both"
        head, sep, tail = source.rpartition(":")
        if sep and tail.strip().lower() in LORA_EXPERTS:
            source, expert = head, tail.strip().lower()
            head, sep, tail = source.rpartition(":")
        if sep and head and _number_or_none(tail) is not None:
            source, scale = head, _number_or_none(tail)
        elif sep and head.lower().endswith(LORA_SUFFIX):
            raise ValueError(f"{name}: {head!r}: scale must be a number, got {tail!r}")
    elif isinstance(value, Mapping):
        if "source" not in value:
            raise ValueError(f"{name}: a LoRA needs a source, got {dict(value)!r}")
        source, scale = value["source"], value.get("scale", 1.0)
        expert, sha256 = value.get("expert") or "both", value.get("sha256")
    elif isinstance(value, (tuple, list)) and 1 <= len(value) <= 3:
        source, scale, expert = (list(value) + [1.0, "both"][len(value) - 1:])[:3]
    else:
        raise ValueError(f"{name}: expected 'source:scale', got {value!r}")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{name}: a LoRA source must be a file or hub id, got {source!r}")
    source = source.strip()
    number = None if isinstance(scale, bool) else _number_or_none(scale)
    if number is None:
        raise ValueError(f"{name}: {source!r}: scale must be a number, got {scale!r}")
    if not isinstance(expert, str) or expert.strip().lower() not in LORA_EXPERTS:
        raise ValueError(f"{name}: {source!r}: expert must be one of {', '.join(LORA_EXPERTS)}; got {expert!r}")
    return LoraRef(source=source, scale=number, expert=expert.strip().lower(),
                   sha256=str(sha256).lower() if sha256 else None)


def _number_or_none(value: Any) -> Optional[float]:
    """``value`` as a float (NaN and infinity included, for the range check to name), else None."""
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None


def parse_loras(value: Any, name: str = "loras") -> tuple[LoraRef, ...]:
    """The LoRAs of a request as a tuple of ``LoraRef``: from None or "" (none), one string (one LoRA per line), or
    a list of anything :func:`parse_lora` reads."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [line for line in value.splitlines() if line.strip()]
    elif isinstance(value, (LoraRef, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of 'source:scale', got {type(value).__name__}")
    return tuple(parse_lora(item, name) for item in value)


def check_lora_refs(loras: tuple[LoraRef, ...], name: str = "loras") -> None:
    """Scales in range (NaN refused), known experts, no source listed twice; ``ValueError`` names the source."""
    seen = set()
    for lora in loras:
        if not isinstance(lora, LoraRef):
            raise ValueError(f"{name}: expected 'source:scale', got {lora!r}")
        if not math.isfinite(lora.scale) or not LORA_SCALE_MIN <= lora.scale <= LORA_SCALE_MAX:
            raise ValueError(f"{name}: {lora.source!r}: scale must be in {number_text(LORA_SCALE_MIN)}.."
                             f"{number_text(LORA_SCALE_MAX)}, got {lora.scale!r}")
        if lora.expert not in LORA_EXPERTS:
            raise ValueError(f"{name}: {lora.source!r}: expert must be one of {', '.join(LORA_EXPERTS)}; "
                             f"got {lora.expert!r}")
        key = (lora.source, lora.expert)
        if key in seen:
            raise ValueError(f"{name}: {lora.source!r} is listed twice: give it once, with the sum of the scales")
        seen.add(key)
