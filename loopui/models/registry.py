"""Which video models loopui knows, what each was trained on, and how to run it well.

A ``ModelSpec`` is pure data: no import of torch or diffusers here, so the UI and CLI can list models cheaply.
``spec_for`` resolves a hub id, the ``demo`` alias or a local diffusers folder; ``spec_for_pipeline`` reads the same
facts off an already built pipeline (the engine's view).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from loopui.models.demo import DEMO_MODEL_ID

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "THUDM/CogVideoX-5b"
DEMO_ALIAS = "demo"

# diffusers pipeline class name -> does it take a conditioning image.
SUPPORTED_PIPELINES: dict[str, bool] = {
    "CogVideoXPipeline": False,
    "CogVideoXImageToVideoPipeline": True,
}

# CogVideoX's VAE: 8x spatial, 4x temporal compression (block_out_channels has 4 entries -> 2**3).
_DEFAULT_SPATIAL_COMPRESSION = 8


@dataclass(frozen=True)
class ModelSpec:
    """What loopui needs to know about one model: architecture facts plus recommended settings."""

    model_id: str
    pipeline_class: str  # diffusers class name, e.g. "CogVideoXPipeline"
    family: str = "cogvideox"
    image_to_video: bool = False
    trained_latent_frames: int = 13  # latent cycle length the model saw in training (49 frames -> 13)
    rotary: bool = True  # 3D RoPE (the temporal base can be NTK-scaled for longer cycles)
    native_height: int = 480
    native_width: int = 720
    native_num_frames: int = 49
    temporal_compression: int = 4
    scheduler: Optional[str] = None  # "ddim" | "dpm" | None = keep the pipeline's own
    guidance_scale: float = 6.0
    use_dynamic_cfg: bool = False
    cuda_dtype: str = "bfloat16"  # torch dtype name used on CUDA (CPU always runs float32)
    description: str = ""
    vram_gb: float = 0.0  # GiB to keep every component on one GPU at the native size (rough)
    offload_vram_gb: float = 0.0  # GiB peak with model CPU offload (one component on the GPU at a time; rough)
    local_path: Optional[str] = None  # set when the spec was read from a folder on disk
    builtin: bool = False  # built in code (the demo model), never loaded from disk or hub

    def to_dict(self) -> dict:
        """JSON-ready copy (for sidecars and the UI)."""
        return dataclasses.asdict(self)


REGISTRY: dict[str, ModelSpec] = {
    spec.model_id: spec
    for spec in (
        ModelSpec(
            model_id="THUDM/CogVideoX-5b", pipeline_class="CogVideoXPipeline", rotary=True, scheduler="dpm",
            use_dynamic_cfg=True, cuda_dtype="bfloat16", vram_gb=26.0, offload_vram_gb=16.0,
            description="CogVideoX 5B text-to-video, 720x480, 49 frames at 8 fps; the best quality here.",
        ),
        ModelSpec(
            model_id="THUDM/CogVideoX-2b", pipeline_class="CogVideoXPipeline", rotary=False, scheduler="ddim",
            use_dynamic_cfg=False, cuda_dtype="float16", vram_gb=18.0, offload_vram_gb=12.0,
            description="CogVideoX 2B text-to-video, 720x480, 49 frames; faster and lighter, no RoPE scaling.",
        ),
        ModelSpec(
            model_id="THUDM/CogVideoX-5b-I2V", pipeline_class="CogVideoXImageToVideoPipeline", image_to_video=True,
            rotary=True, scheduler="dpm", use_dynamic_cfg=True, cuda_dtype="bfloat16", vram_gb=26.0,
            offload_vram_gb=16.0,
            description="CogVideoX 5B image-to-video, 720x480, 49 frames: animates a reference image.",
        ),
        ModelSpec(
            model_id=DEMO_MODEL_ID, pipeline_class="CogVideoXPipeline", rotary=True, native_height=64,
            native_width=96, scheduler="ddim", use_dynamic_cfg=False, cuda_dtype="float32", vram_gb=0.1,
            offload_vram_gb=0.1, builtin=True,
            description="Tiny random-weight CogVideoX built in code (abstract noise): try the app without "
                        "a GPU or a download.",
        ),
    )
}

# Architecture fingerprints of the registry models, so a downloaded copy in a local folder gets the same
# recommendations (dtype, scheduler, guidance) as its hub id: (num_layers, num_attention_heads, in_channels).
_FINGERPRINTS: dict[tuple[int, int, int], str] = {
    (42, 48, 16): "THUDM/CogVideoX-5b",
    (30, 30, 16): "THUDM/CogVideoX-2b",
    (42, 48, 32): "THUDM/CogVideoX-5b-I2V",
}


def resolve_model_id(model: str) -> str:
    """Map aliases (``demo``) to a model id; other names come back unchanged."""
    return DEMO_MODEL_ID if model.strip().lower() == DEMO_ALIAS else model


def _is_registry_key(model: str) -> bool:
    return resolve_model_id(model) in REGISTRY


def spec_for(model_id_or_dir: str | Path) -> ModelSpec:
    """The ``ModelSpec`` of a registry id, the ``demo`` alias, or a local diffusers folder.

    A folder must hold a ``model_index.json`` naming a supported pipeline; its trained latent length, rotary flag,
    native size and image-to-video flag are read from its configs. Hub ids outside the registry are refused rather
    than guessed over the network.
    """
    name = str(model_id_or_dir)
    if not name.strip():
        raise ValueError("model must be a model id or a folder, got an empty string")
    if _is_registry_key(name):
        return REGISTRY[resolve_model_id(name)]
    path = Path(name).expanduser()
    if path.is_dir():
        return _spec_from_folder(path)
    known = ", ".join([*REGISTRY, DEMO_ALIAS])
    if path.exists():
        raise ValueError(f"model {name!r} is a file, not a diffusers model folder")
    raise ValueError(f"unknown model {name!r}: not a known model id ({known}) and not an existing folder")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _spec_from_folder(folder: Path) -> ModelSpec:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"model folder {str(folder)!r} has no model_index.json (not a diffusers pipeline folder)")
    pipeline_class = str(_read_json(index_path).get("_class_name", ""))
    _check_pipeline_class(pipeline_class)
    transformer_config = _read_json(folder / "transformer" / "config.json")
    vae_path = folder / "vae" / "config.json"
    vae_config = _read_json(vae_path) if vae_path.is_file() else {}
    spatial = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config.get("block_out_channels") else None
    return _spec_from_config(str(folder), pipeline_class, transformer_config, spatial,
                             local_path=str(folder.resolve()), weight_bytes=_weight_bytes(folder))


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.rglob(pattern))


def _check_pipeline_class(pipeline_class: str) -> None:
    if pipeline_class not in SUPPORTED_PIPELINES:
        supported = ", ".join(SUPPORTED_PIPELINES)
        raise ValueError(f"unsupported pipeline class {pipeline_class!r} (supported: {supported})")


def _spec_from_config(model_id: str, pipeline_class: str, transformer_config: Mapping[str, Any],
                      spatial_compression: Optional[int], local_path: Optional[str] = None,
                      weight_bytes: int = 0) -> ModelSpec:
    """One place that turns a CogVideoX transformer config into a spec (used for folders and built pipelines)."""
    cfg = transformer_config
    if cfg.get("patch_size_t") is not None:
        raise ValueError(f"{model_id!r} uses temporal patching (patch_size_t={cfg.get('patch_size_t')!r}, "
                         "CogVideoX 1.5), which loopui does not support yet; use CogVideoX-5b, -2b or -5b-I2V")
    temporal = int(cfg.get("temporal_compression_ratio", 4))
    sample_frames = int(cfg.get("sample_frames", 49))
    spatial = spatial_compression or _DEFAULT_SPATIAL_COMPRESSION
    facts: dict[str, Any] = dict(
        model_id=model_id,
        pipeline_class=pipeline_class,
        image_to_video=SUPPORTED_PIPELINES.get(pipeline_class, False),
        trained_latent_frames=(sample_frames - 1) // temporal + 1,
        rotary=bool(cfg.get("use_rotary_positional_embeddings", False)),
        native_height=int(cfg.get("sample_height", 60)) * spatial,
        native_width=int(cfg.get("sample_width", 90)) * spatial,
        native_num_frames=sample_frames,
        temporal_compression=temporal,
        local_path=local_path,
    )
    fingerprint = (cfg.get("num_layers"), cfg.get("num_attention_heads"), cfg.get("in_channels"))
    known = REGISTRY.get(_FINGERPRINTS.get(fingerprint, ""))  # type: ignore[arg-type]
    if known is not None:
        logger.info("%s looks like %s; using its recommended settings", model_id, known.model_id)
        return dataclasses.replace(known, **facts, description=f"Local copy of {known.model_id}. "
                                                               f"{known.description}")
    # Unknown architecture: the pipeline's own scheduler, and a VRAM guess from the weights' size
    # (weights plus activations at the native size, which for CogVideoX are a few GiB).
    weights_gib = weight_bytes / 2**30
    return ModelSpec(**facts, scheduler=None, guidance_scale=6.0, use_dynamic_cfg=False,
                     cuda_dtype="bfloat16" if facts["rotary"] else "float16",
                     vram_gb=round(weights_gib * 1.2 + 4.0, 1), offload_vram_gb=round(weights_gib * 0.6 + 4.0, 1),
                     description=f"{pipeline_class} from {model_id}")


def spec_for_pipeline(pipe: Any) -> ModelSpec:
    """A ``ModelSpec`` for a built diffusers pipeline, its facts read from ``pipe.transformer.config``.

    Registry recommendations are kept when the pipeline was loaded from a registry id (or is the demo model).
    """
    pipeline_class = type(pipe).__name__
    _check_pipeline_class(pipeline_class)
    model_id = str(getattr(pipe, "name_or_path", None) or "")  # ModelManager records the hub id here
    spatial = getattr(pipe, "vae_scale_factor_spatial", None)
    spec = _spec_from_config(model_id or pipeline_class, pipeline_class, dict(pipe.transformer.config),
                             int(spatial) if spatial else None)
    registered = REGISTRY.get(model_id)
    if registered is not None:
        # The config is the truth about the architecture; the registry adds recommendations and the preview size.
        return dataclasses.replace(registered, trained_latent_frames=spec.trained_latent_frames, rotary=spec.rotary,
                                   temporal_compression=spec.temporal_compression)
    return spec


def list_models() -> list[ModelSpec]:
    """The registry's specs, default model first."""
    return sorted(REGISTRY.values(), key=lambda s: (s.model_id != DEFAULT_MODEL_ID, s.builtin, s.model_id))
