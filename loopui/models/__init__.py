"""The models room: which models exist (registry, with each family's config facts in families), building one
pipeline (loader), placing it in memory (memory), caching and leasing loaded models (manager), the device pool
(devices), the speed recipes of distilled LoRAs (recipes), the tiny demo model, and a CLIP model for the loop scores
(clip).

Names are re-exported lazily (PEP 562) so ``import loopui.models`` pulls in neither torch nor diffusers; they are
imported on first use of the function that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelManager": "loopui.models.manager",
    "LoadedModel": "loopui.models.loader",
    "ModelLoadError": "loopui.models.loader",
    "LoadCancelled": "loopui.models.loader",
    "PipelineLoader": "loopui.models.loader",
    "OutOfGPUMemory": "loopui.models.memory",
    "is_out_of_memory": "loopui.models.memory",
    "DevicePool": "loopui.models.devices",
    "parse_devices": "loopui.models.devices",
    "choose_memory_policy": "loopui.models.memory",
    "MEMORY_POLICIES": "loopui.models.memory",
    "ModelSpec": "loopui.models.registry",
    "REGISTRY": "loopui.models.registry",
    "DEFAULT_MODEL_ID": "loopui.models.registry",
    "spec_for": "loopui.models.registry",
    "spec_for_pipeline": "loopui.models.registry",
    "resolve_model_id": "loopui.models.registry",
    "list_models": "loopui.models.registry",
    "DEMO_MODEL_ID": "loopui.models.demo",
    "build_tiny_cogvideox": "loopui.models.demo",
    "save_tiny_cogvideox": "loopui.models.demo",
    "Recipe": "loopui.models.recipes",
    "RECIPES": "loopui.models.recipes",
    "recipes_for": "loopui.models.recipes",
    "recipe_values": "loopui.models.recipes",
    "fill_recipe": "loopui.models.recipes",
    "ClipEmbedder": "loopui.models.clip",
    "load_clip": "loopui.models.clip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
