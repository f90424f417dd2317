"""One typed dataclass of every knob: the UI, the CLI and the Python API all read defaults and ranges from here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

WINDOW_MODES = ("full", "window")
# CogVideoX: DDIM / DPM (v-prediction); Wan: UniPC / Euler (flow matching). A family refuses the others.
SCHEDULERS = ("ddim", "dpm", "unipc", "euler")
IMAGE_CHANNELS = ("estimate", "image", "roll")
SEAM_POLISH_LEVELS = ("off", "fast", "balanced", "strong")
MOTION_REGIONS = ("object", "background", "everything")


def _knob(default: Any, help: str, minimum: float | None = None, maximum: float | None = None,
          choices: tuple | None = None, step: float | None = None) -> Any:
    """A dataclass field that carries its UI/CLI metadata (help text, range, choices)."""
    metadata = {"help": help, "min": minimum, "max": maximum, "choices": choices, "step": step}
    return field(default=default, metadata=metadata)


def latent_length(num_frames: int, temporal_compression: int = 4) -> int:
    """Number of latent frames L a causal video VAE makes of ``num_frames`` pixel frames (49 -> 13)."""
    return (int(num_frames) - 1) // temporal_compression + 1


def default_shift_skip(length: int) -> int:
    """The integer nearest ``length / 2`` that is coprime with ``length`` (6 for 13); ties go to the smaller one.

    A skip that shares a factor with the cycle length never visits some offsets, which can leave a seam.
    """
    if length <= 1:
        return 0
    half = length / 2
    candidates = sorted(range(1, length), key=lambda k: (abs(k - half), k))
    for k in candidates:
        if math.gcd(k, length) == 1:
            return k
    return 1


@dataclass
class LoopRequest:
    """Every setting of one loop generation, with defaults and validation.

    ``None`` in ``height``/``width``/``shift_skip``/``rope_scale``/``scheduler`` means "choose from the model"
    (native size, the coprime skip nearest L/2, automatic RoPE scale, the pipeline's own scheduler).
    """

    prompt: str = _knob("", "What the loop shows.")
    negative_prompt: str = _knob("", "What to steer away from.")
    num_frames: int = _knob(49, "Pixel frames requested; the cycle has L = (frames - 1) // 4 + 1 latents, "
                                "and a frame-invariant loop plays 4·L frames (49 -> 52).", 5, 321, step=4)
    height: Optional[int] = _knob(None, "Output height in pixels (multiple of 16); empty = model's native.", 16, 2048,
                                  step=16)
    width: Optional[int] = _knob(None, "Output width in pixels (multiple of 16); empty = model's native.", 16, 2048,
                                 step=16)
    num_inference_steps: int = _knob(50, "Denoising steps: more is slower and usually cleaner.", 1, 200, step=1)
    guidance_scale: Optional[float] = _knob(None, "How strongly the prompt is followed (classifier-free guidance); "
                                                  "empty = the model's recommendation (6 CogVideoX, 5 Wan).",
                                            1.0, 20.0, step=0.5)
    use_dynamic_cfg: Optional[bool] = _knob(None, "Ramp guidance over the schedule (CogVideoX with the DPM "
                                                  "scheduler); empty = the model's recommendation.")
    seed: int = _knob(42, "Random seed: the same seed and settings reproduce the loop.", 0, 2**32 - 1, step=1)
    shift_skip: Optional[int] = _knob(None, "Latent shift per step (0 = plain, non-looping sampling). Best near L/2 "
                                            "and coprime with L; empty = automatic (6 for 13 latents).", 0, 240,
                                      step=1)
    shift_start: float = _knob(0.0, "Fraction of the schedule where shifting starts.", 0.0, 1.0, step=0.05)
    shift_end: float = _knob(1.0, "Fraction of the schedule where shifting ends.", 0.0, 1.0, step=0.05)
    rope_scale: Optional[float] = _knob(None, "NTK scale of the temporal rotary base for cycles longer than the "
                                              "model was trained on (1 = off; empty = automatic).", 1.0, 16.0,
                                        step=0.05)
    window_mode: str = _knob("full", "How a cycle longer than the model's context is denoised: 'full' (one pass, "
                                     "RoPE scaled) or 'window' (wrapping windows of the trained length).",
                             choices=WINDOW_MODES)
    frame_invariant_decoding: bool = _knob(True, "Decode every latent with context from the end of the cycle, "
                                                 "so the loop has no doubled or odd first frame.")
    fps: Optional[int] = _knob(None, "Playback frames per second of the exported loop; empty = the model's "
                                     "(8 CogVideoX, 16 Wan 2.1, 24 Wan 2.2 5B).", 1, 60, step=1)
    scheduler: Optional[str] = _knob(None, "Sampler: 'ddim' or 'dpm' for CogVideoX (trailing timesteps), 'unipc' or "
                                           "'euler' for Wan (flow matching); empty = the model's recommendation.",
                                     choices=SCHEDULERS)
    flow_shift: Optional[float] = _knob(None, "Flow-matching shift of the noise schedule (Wan only): higher spends "
                                              "more of the steps at high noise; empty = the model's recommendation "
                                              "(3 at 480p, 5 at 720p).", 0.5, 20.0, step=0.5)
    seam_polish: str = _knob("off", "Removes the small seam a loop can leave inside the cycle (where the model last "
                                    "saw it cut): the final steps blend several rotations of the cycle. Extra compute "
                                    "at 50 steps: fast +2% (one extra model pass, recommended), balanced +12%, "
                                    "strong +30%; off = the reference latent shift.",
                             choices=SEAM_POLISH_LEVELS)
    # Reference-image mode (all inert without an image).
    image: Any = field(default=None, metadata={"help": "Reference image (path, PIL image or HxWx3 array): the loop "
                                                       "starts and ends on it.", "json": False})
    mask: Any = field(default=None, metadata={"help": "Motion mask (path, PIL image or HxW array, white = may "
                                                      "move); wins over the computed saliency mask.", "json": False})
    mask_model: str = _knob("u2netp", "Saliency model that finds the moving object (rembg model name).")
    mask_threshold: float = _knob(0.5, "Saliency cut-off: higher keeps only the most certain object pixels.",
                                  0.0, 1.0, step=0.05)
    mask_grow: int = _knob(0, "Grow (+) or shrink (-) the mask by this many pixels.", -64, 64, step=1)
    mask_feather: int = _knob(8, "Soften the mask edge over this many pixels.", 0, 64, step=1)
    motion_region: str = _knob("object", "Where motion may happen: the salient object, the background (mask "
                                         "inverted), or everywhere (no mask).", choices=MOTION_REGIONS)
    anchor_strength: float = _knob(1.0, "How firmly the reference image is held as the loop's first frame "
                                        "(0 = not at all, 1 = exactly).", 0.0, 1.0, step=0.05)
    init_strength: float = _knob(1.0, "Starting noise: 1 = pure noise (most motion); lower values start from the "
                                      "noised image (closer to it, less motion).", 0.0, 1.0, step=0.05)
    background_freeze: float = _knob(0.0, "Hold everything outside the motion mask still (1 = a cinemagraph with a "
                                          "frozen background).", 0.0, 1.0, step=0.05)
    image_channel: str = _knob("estimate", "Image-to-video models only: what their image channel carries in each "
                                           "clip the model sees. 'estimate' = the image when the anchored frame "
                                           "is first, else the loop's current estimate of the first frame (every "
                                           "call as in training); 'image' = always the image; 'roll' = the image "
                                           "rides with its frame around the cycle.", choices=IMAGE_CHANNELS)

    def validate(self) -> "LoopRequest":
        """Raise ``ValueError`` naming the offending value; return ``self`` so calls chain."""
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be text, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be text, got {type(self.negative_prompt).__name__}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, (str, bool)) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if lo is not None and value < lo:
                raise ValueError(f"{f.name} must be >= {lo}, got {value!r}")
            if hi is not None and value > hi:
                raise ValueError(f"{f.name} must be <= {hi}, got {value!r}")
        for name in ("num_frames", "num_inference_steps", "seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.fps is not None and (not isinstance(self.fps, int) or isinstance(self.fps, bool)):
            raise ValueError(f"fps must be an integer, got {self.fps!r}")
        if self.use_dynamic_cfg is not None and not isinstance(self.use_dynamic_cfg, bool):
            raise ValueError(f"use_dynamic_cfg must be true or false, got {self.use_dynamic_cfg!r}")
        if self.shift_skip is not None and (not isinstance(self.shift_skip, int) or isinstance(self.shift_skip, bool)):
            raise ValueError(f"shift_skip must be an integer, got {self.shift_skip!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value % 16 != 0):
                raise ValueError(f"{name} must be a multiple of 16, got {value!r}")
        if self.shift_start > self.shift_end:
            raise ValueError(f"shift_start must not exceed shift_end, got {self.shift_start!r} > {self.shift_end!r}")
        for name in ("anchor_strength", "init_strength", "background_freeze"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a number in [0, 1], got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        return self

    @property
    def num_latent_frames(self) -> int:
        return latent_length(self.num_frames)

    def to_dict(self) -> dict:
        """JSON-ready settings (used by the sidecar and the UI gallery)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("json") is False:
                # Images are not JSON; keep a path when the caller gave one so the sidecar can reproduce it.
                value = value if isinstance(value, str) else (None if value is None else "<in-memory>")
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LoopRequest":
        """Build from a dict, ignoring unknown keys (so older sidecars still load)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def knob_info(name: str) -> dict:
    """Default, range, choices and help text of one ``LoopRequest`` field (for UI sliders and CLI help)."""
    for f in dataclasses.fields(LoopRequest):
        if f.name == name:
            return {"default": f.default, **f.metadata}
    raise KeyError(name)
