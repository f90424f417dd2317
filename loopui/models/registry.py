"""Which video models loopui knows, what each was trained on, and how to run it well.

A ``ModelSpec`` is pure data: no import of torch or diffusers here, so the UI and CLI can list models cheaply.
``spec_for`` resolves a hub id, the ``demo`` alias or a local diffusers folder; ``spec_for_pipeline`` reads the same
facts off an already built pipeline (the engine's view). What a family's configs say is asked of its class in
``loopui.models.family_facts``; this module holds only the registry's own knowledge (the models, their
recommendations, their fingerprints).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from loopui.models.demo import DEMO_MODEL_ID
from loopui.models.family_facts import FAMILY_FACTS, facts_for_pipeline

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "THUDM/CogVideoX-5b"
DEMO_ALIAS = "demo"


@dataclass(frozen=True)
class ModelSpec:
    """What loopui needs to know about one model: architecture facts plus recommended settings."""

    model_id: str
    pipeline_class: str  # diffusers class name, e.g. "CogVideoXPipeline"
    family: str = "cogvideox"  # a key of family_facts.FAMILY_FACTS ("cogvideox" | "wan"): which family drives it
    image_to_video: bool = False
    trained_latent_frames: int = 13  # latent cycle length the model saw in training (49 frames -> 13)
    rotary: bool = True  # 3D RoPE (the temporal base can be NTK-scaled for longer cycles)
    learned_positions: bool = False  # learned positional table for exactly the trained size and length
    native_height: int = 480
    native_width: int = 720
    native_num_frames: int = 49
    native_fps: int = 8
    temporal_compression: int = 4
    spatial_compression: int = 8
    size_multiple: int = 16  # height and width must be multiples of this (VAE compression x patch size)
    fixed_size: bool = False  # runs only at its native size (learned positional embeddings)
    scheduler: Optional[str] = None  # a scheduler name the family accepts, None = keep the pipeline's own
    guidance_scale: float = 6.0
    use_dynamic_cfg: bool = False
    flow_shift: Optional[float] = None  # flow-matching shift for the native size (None = the scheduler config's)
    flow_shift_480p: Optional[float] = None  # the shift for 480p-sized outputs where it differs (Wan 14B: 3 vs 5)
    guidance_scale_2: Optional[float] = None  # low-noise expert's guidance (Wan 2.2 A14B)
    num_inference_steps: int = 50  # the model's own sampling steps
    negative_prompt: str = ""  # sent when the request gives none (Wan's sampler does so); "" = none
    experts: int = 1  # denoisers: 2 for Wan 2.2 A14B (high-noise and low-noise transformer)
    # A model whose image is optional (Wan 2.2 TI2V-5B): the stock pipeline class of its image-to-video mode, which
    # runs over the same components when an image is given.
    image_pipeline_class: Optional[str] = None
    # The image-to-video conditioning replaces the first latent with the image at timestep 0 (``expand_timesteps``):
    # no separate image channel, so the image rides with its latent around the cycle.
    first_latent_image: bool = False
    cuda_dtype: str = "bfloat16"  # torch dtype name used on CUDA (CPU always runs float32)
    license: str = ""
    description: str = ""
    vram_gb: float = 0.0  # GiB to keep every component on one GPU at the native size (rough)
    offload_vram_gb: float = 0.0  # GiB peak with model CPU offload (one component on the GPU at a time; rough)
    local_path: Optional[str] = None  # set when the spec was read from a folder on disk
    copy_of: Optional[str] = None  # the registry model a local folder's configs match (its recommendations, recipes)
    builtin: bool = False  # built in code (the demo model), never loaded from disk or hub

    def to_dict(self) -> dict:
        """JSON-ready copy (for sidecars and the UI)."""
        return dataclasses.asdict(self)

    @property
    def trained_num_frames(self) -> int:
        """Pixel frames of the clips the model was trained on (49 for CogVideoX, 81 for Wan 2.1)."""
        return (self.trained_latent_frames - 1) * self.temporal_compression + 1


_COG_LICENSE = "CogVideoX license (research; commercial use needs registration)"
_APACHE = "Apache-2.0"
# Wan's standard negative prompt, sent by its own sampler whenever none is given: Wan-Video/Wan2.1 and
# Wan-Video/Wan2.2 wan/configs/shared_config.py ``sample_neg_prompt`` (the same string in both).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静"
    "止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多"
    "余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的"
    "肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着"
    "走"
)
# Wan-Video/Wan2.1 wan/configs/wan_i2v_14B.py: "camera shake" put in front of the shared one.
WAN21_I2V_NEGATIVE_PROMPT = "镜头晃动，" + WAN_NEGATIVE_PROMPT

REGISTRY: dict[str, ModelSpec] = {
    spec.model_id: spec
    for spec in (
        ModelSpec(
            model_id="THUDM/CogVideoX-5b", pipeline_class="CogVideoXPipeline", rotary=True, scheduler="dpm",
            use_dynamic_cfg=True, cuda_dtype="bfloat16", vram_gb=26.0, offload_vram_gb=16.0, license=_COG_LICENSE,
            description="CogVideoX 5B text-to-video, 720x480, 49 frames at 8 fps.",
        ),
        ModelSpec(
            model_id="THUDM/CogVideoX-2b", pipeline_class="CogVideoXPipeline", rotary=False, scheduler="ddim",
            use_dynamic_cfg=False, cuda_dtype="float16", vram_gb=18.0, offload_vram_gb=12.0, license=_APACHE,
            description="CogVideoX 2B text-to-video, 720x480, 49 frames; faster and lighter, no RoPE scaling.",
        ),
        ModelSpec(
            model_id="THUDM/CogVideoX-5b-I2V", pipeline_class="CogVideoXImageToVideoPipeline", image_to_video=True,
            rotary=True, learned_positions=True, fixed_size=True, scheduler="dpm", use_dynamic_cfg=True,
            cuda_dtype="bfloat16", vram_gb=26.0, offload_vram_gb=16.0, license=_COG_LICENSE,
            description="CogVideoX 5B image-to-video, 720x480 only, 49 frames: animates a reference image.",
        ),
        # Wan recommendations, each from the official sampler (cited per value; the configs in
        # loopui/testing/configs/ repeat them under "recommended" with their sources):
        # - Wan-Video/Wan2.1 generate.py _validate_args (commit 9737cba9): sample_steps 50 for t2v, 40 for i2v;
        #   --sample_guide_scale default 5.0; sample_shift 5.0, or 3.0 for i2v at 832*480.
        # - Wan-Video/Wan2.1 wan/configs/shared_config.py: sample_fps 16, sample_neg_prompt (WAN_NEGATIVE_PROMPT);
        #   wan/configs/wan_i2v_14B.py: sample_neg_prompt = "镜头晃动，" + the shared one.
        # - Wan-Video/Wan2.2 wan/configs/ (commit 42bf4cfa): wan_t2v_A14B.py, wan_i2v_A14B.py, wan_ti2v_5B.py
        #   (sample_steps, sample_shift, sample_guide_scale as (low noise, high noise), frame_num, sample_fps);
        #   shared_config.py: the same sample_neg_prompt. Both repos' samplers send it when the negative prompt is
        #   empty (wan/text2video.py, image2video.py, textimage2video.py: ``if n_prompt == "": n_prompt =
        #   self.sample_neg_prompt``); diffusers' Wan examples pass an English rendering of it.
        # - Flow shift at 480p: diffusers docs/source/en/api/pipelines/wan.md (3.0 for 480P, 5.0 for 720P) and the
        #   hub scheduler configs (3.0); the Wan2.1 README suggests shift 8-12 and guidance 6 for T2V-1.3B instead.
        ModelSpec(
            model_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", pipeline_class="WanPipeline", family="wan",
            trained_latent_frames=21, native_height=480, native_width=832, native_num_frames=81, native_fps=16,
            scheduler=None,
            guidance_scale=5.0,  # Wan2.1 generate.py --sample_guide_scale default
            flow_shift=3.0,  # diffusers wan.md (480P) = the hub scheduler_config
            num_inference_steps=50,  # Wan2.1 generate.py: t2v
            negative_prompt=WAN_NEGATIVE_PROMPT,  # Wan2.1 wan/configs/shared_config.py
            cuda_dtype="bfloat16", vram_gb=20.0, offload_vram_gb=14.0, license=_APACHE,
            description="Wan 2.1 1.3B text-to-video, 832x480, 81 frames at 16 fps; recommended under 20 GB of VRAM.",
        ),
        ModelSpec(
            model_id="Wan-AI/Wan2.1-T2V-14B-Diffusers", pipeline_class="WanPipeline", family="wan",
            trained_latent_frames=21, native_height=720, native_width=1280, native_num_frames=81, native_fps=16,
            scheduler=None,
            guidance_scale=5.0,  # Wan2.1 generate.py --sample_guide_scale default
            flow_shift=5.0, flow_shift_480p=3.0,  # Wan2.1 generate.py (5.0); diffusers wan.md (3.0 at 480P)
            num_inference_steps=50,  # Wan2.1 generate.py: t2v
            negative_prompt=WAN_NEGATIVE_PROMPT,  # Wan2.1 wan/configs/shared_config.py
            cuda_dtype="bfloat16", vram_gb=48.0, offload_vram_gb=34.0, license=_APACHE,
            description="Wan 2.1 14B text-to-video, 1280x720 (480p works too), 81 frames at 16 fps.",
        ),
        ModelSpec(
            model_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", pipeline_class="WanImageToVideoPipeline", family="wan",
            image_to_video=True, trained_latent_frames=21, native_height=480, native_width=832,
            native_num_frames=81, native_fps=16, scheduler=None,
            guidance_scale=5.0,  # Wan2.1 generate.py --sample_guide_scale default
            flow_shift=3.0,  # Wan2.1 generate.py: i2v at 832*480
            num_inference_steps=40,  # Wan2.1 generate.py: i2v
            negative_prompt=WAN21_I2V_NEGATIVE_PROMPT,  # Wan2.1 wan/configs/wan_i2v_14B.py
            cuda_dtype="bfloat16", vram_gb=52.0, offload_vram_gb=42.0, license=_APACHE,
            description="Wan 2.1 14B image-to-video, 832x480, 81 frames at 16 fps: animates a reference image.",
        ),
        ModelSpec(
            model_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers", pipeline_class="WanPipeline", family="wan",
            trained_latent_frames=31, native_height=704, native_width=1280, native_num_frames=121,
            native_fps=24,  # Wan2.2 wan/configs/wan_ti2v_5B.py sample_fps, frame_num 121
            spatial_compression=16, size_multiple=32, scheduler=None,
            guidance_scale=5.0,  # Wan2.2 wan_ti2v_5B.py sample_guide_scale
            flow_shift=5.0,  # Wan2.2 wan_ti2v_5B.py sample_shift
            num_inference_steps=50,  # Wan2.2 wan_ti2v_5B.py sample_steps
            negative_prompt=WAN_NEGATIVE_PROMPT,  # Wan2.2 wan/configs/shared_config.py
            # Its image-to-video mode: diffusers' WanImageToVideoPipeline with expand_timesteps (model_index.json
            # sets it): the image latent replaces the first latent, whose tokens are at timestep 0.
            image_pipeline_class="WanImageToVideoPipeline", first_latent_image=True,
            cuda_dtype="bfloat16", vram_gb=30.0, offload_vram_gb=16.0, license=_APACHE,
            description="Wan 2.2 5B text/image-to-video, 1280x704, 121 frames at 24 fps (16x VAE); with a "
                        "reference image it runs its own image-to-video mode.",
        ),
        ModelSpec(
            model_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers", pipeline_class="WanPipeline", family="wan",
            trained_latent_frames=21, native_height=720, native_width=1280, native_num_frames=81, native_fps=16,
            scheduler=None,
            # Wan2.2 wan_t2v_A14B.py sample_guide_scale (3.0, 4.0) = (low noise, high noise): diffusers'
            # guidance_scale drives the high-noise expert, guidance_scale_2 the low-noise one.
            guidance_scale=4.0, guidance_scale_2=3.0,
            flow_shift=12.0,  # Wan2.2 wan_t2v_A14B.py sample_shift
            num_inference_steps=40,  # Wan2.2 wan_t2v_A14B.py sample_steps
            negative_prompt=WAN_NEGATIVE_PROMPT,  # Wan2.2 wan/configs/shared_config.py
            experts=2, cuda_dtype="bfloat16", vram_gb=72.0, offload_vram_gb=34.0, license=_APACHE,
            description="Wan 2.2 A14B text-to-video (two 14B experts), 1280x720, 81 frames at 16 fps.",
        ),
        ModelSpec(
            model_id="Wan-AI/Wan2.2-I2V-A14B-Diffusers", pipeline_class="WanImageToVideoPipeline", family="wan",
            image_to_video=True, trained_latent_frames=21, native_height=720, native_width=1280,
            native_num_frames=81, native_fps=16, scheduler=None,
            guidance_scale=3.5, guidance_scale_2=3.5,  # Wan2.2 wan_i2v_A14B.py sample_guide_scale (3.5, 3.5)
            flow_shift=5.0,  # Wan2.2 wan_i2v_A14B.py sample_shift
            num_inference_steps=40,  # Wan2.2 wan_i2v_A14B.py sample_steps
            negative_prompt=WAN_NEGATIVE_PROMPT,  # Wan2.2 wan/configs/shared_config.py (no i2v prefix in 2.2)
            experts=2, cuda_dtype="bfloat16", vram_gb=72.0, offload_vram_gb=34.0, license=_APACHE,
            description="Wan 2.2 A14B image-to-video (two 14B experts), 1280x720, 81 frames at 16 fps.",
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
# recommendations (dtype, scheduler, guidance): (pipeline class, num_layers, num_attention_heads, in_channels,
# has a second expert).
_FINGERPRINTS: dict[tuple, str] = {
    ("CogVideoXPipeline", 42, 48, 16, False): "THUDM/CogVideoX-5b",
    ("CogVideoXPipeline", 30, 30, 16, False): "THUDM/CogVideoX-2b",
    ("CogVideoXImageToVideoPipeline", 42, 48, 32, False): "THUDM/CogVideoX-5b-I2V",
    ("WanPipeline", 30, 12, 16, False): "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    ("WanPipeline", 40, 40, 16, False): "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    ("WanImageToVideoPipeline", 40, 40, 36, False): "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    ("WanPipeline", 30, 24, 48, False): "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    ("WanImageToVideoPipeline", 30, 24, 48, False): "Wan-AI/Wan2.2-TI2V-5B-Diffusers",  # its image-to-video mode
    ("WanPipeline", 40, 40, 16, True): "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    ("WanImageToVideoPipeline", 40, 40, 36, True): "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
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
    index = _read_json(index_path)
    pipeline_class = str(index.get("_class_name", ""))
    facts_for_pipeline(pipeline_class)
    transformer_path = folder / "transformer" / "config.json"
    if not transformer_path.is_file() and (folder / "transformer_2" / "config.json").is_file():
        transformer_path = folder / "transformer_2" / "config.json"
    transformer_config = _read_json(transformer_path)
    vae_path = folder / "vae" / "config.json"
    vae_config = _read_json(vae_path) if vae_path.is_file() else {}
    experts = 2 if _component_present(index, "transformer_2") else 1
    return _spec_from_config(str(folder), pipeline_class, transformer_config, vae_config, experts=experts,
                             local_path=str(folder.resolve()), weight_bytes=_weight_bytes(folder),
                             expand_timesteps=bool(index.get("expand_timesteps")))


def _component_present(index: Mapping[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` lists a component (absent ones are missing or ``[null, null]``)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.rglob(pattern))


def _spec_from_config(model_id: str, pipeline_class: str, transformer_config: Mapping[str, Any],
                      vae_config: Mapping[str, Any], experts: int = 1, local_path: Optional[str] = None,
                      weight_bytes: int = 0, spatial: Optional[int] = None,
                      temporal: Optional[int] = None, expand_timesteps: bool = False) -> ModelSpec:
    """One place that turns a family's configs into a spec (used for folders and for built pipelines).

    ``expand_timesteps`` is the pipeline config's flag (Wan 2.2 TI2V): per-token timesteps, an optional image that
    replaces the first latent at timestep 0 through ``WanImageToVideoPipeline``.
    """
    cfg = transformer_config
    family = facts_for_pipeline(pipeline_class)
    vae_spatial, vae_temporal = family.vae_compression(vae_config)
    spatial, temporal = spatial or vae_spatial, temporal or vae_temporal
    arch = family.facts_from_config(cfg, spatial, temporal, model_id)
    image_to_video = family.pipelines[pipeline_class]
    first_latent_image = bool(expand_timesteps and family.expanded_timesteps_image_pipeline)
    facts: dict[str, Any] = dict(model_id=model_id, pipeline_class=pipeline_class, family=family.name,
                                 image_to_video=image_to_video, experts=experts, local_path=local_path,
                                 first_latent_image=first_latent_image,
                                 image_pipeline_class=(family.expanded_timesteps_image_pipeline
                                                       if first_latent_image and not image_to_video else None),
                                 **arch)
    fingerprint = (pipeline_class, cfg.get("num_layers"), cfg.get("num_attention_heads"), cfg.get("in_channels"),
                   experts > 1)
    known = REGISTRY.get(_FINGERPRINTS.get(fingerprint, ""))
    if known is not None:
        logger.info("%s looks like %s; using its recommended settings", model_id, known.model_id)
        # The registry's native size and trained length are the model card's; the rest is read from the config.
        keep = ("native_height", "native_width", "native_num_frames", "native_fps", "trained_latent_frames")
        facts = {k: v for k, v in facts.items() if k not in keep or family.config_states_training_shape}
        return dataclasses.replace(known, **facts, copy_of=known.model_id,
                                   description=f"Local copy of {known.model_id}. {known.description}")
    # Unknown architecture: the pipeline's own scheduler, and a VRAM guess from the weights' size
    # (weights plus activations at the native size, which for these models are a few GiB).
    weights_gib = weight_bytes / 2**30
    return ModelSpec(**facts, scheduler=None, guidance_scale=family.default_guidance_scale,
                     use_dynamic_cfg=False,
                     cuda_dtype="bfloat16" if facts["rotary"] else "float16",
                     vram_gb=round(weights_gib * 1.2 + 4.0, 1), offload_vram_gb=round(weights_gib * 0.6 + 4.0, 1),
                     description=f"{pipeline_class} from {model_id}")


def spec_for_pipeline(pipe: Any) -> ModelSpec:
    """A ``ModelSpec`` for a built diffusers pipeline, its facts read from its transformer and VAE configs.

    Registry recommendations are kept when the pipeline was loaded from a registry id (or is the demo model).
    """
    pipeline_class = type(pipe).__name__
    facts_for_pipeline(pipeline_class)
    model_id = str(getattr(pipe, "name_or_path", None) or "")  # ModelManager records the hub id here
    transformer = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    experts = 2 if getattr(pipe, "transformer_2", None) is not None else 1
    vae = getattr(pipe, "vae", None)
    spatial = getattr(pipe, "vae_scale_factor_spatial", None)
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)
    spec = _spec_from_config(model_id or pipeline_class, pipeline_class, dict(transformer.config),
                             dict(vae.config) if vae is not None else {}, experts=experts,
                             spatial=int(spatial) if spatial else None, temporal=int(temporal) if temporal else None,
                             expand_timesteps=bool(getattr(pipe, "config", {}).get("expand_timesteps")))
    registered = REGISTRY.get(model_id)
    if registered is not None:
        # The config is the truth about the architecture and the pipeline built (Wan 2.2 TI2V-5B under its hub id
        # may be its WanImageToVideoPipeline); the registry adds recommendations and the preview size.
        arch = ("rotary", "learned_positions", "fixed_size", "temporal_compression", "spatial_compression",
                "size_multiple", "experts", "pipeline_class", "image_to_video", "image_pipeline_class",
                "first_latent_image")
        if FAMILY_FACTS[registered.family].config_states_training_shape:
            arch += ("trained_latent_frames",)
        return dataclasses.replace(registered, **{k: getattr(spec, k) for k in arch})
    return spec


def list_models() -> list[ModelSpec]:
    """The registry's specs, default model first."""
    return sorted(REGISTRY.values(), key=lambda s: (s.model_id != DEFAULT_MODEL_ID, s.builtin, s.model_id))
