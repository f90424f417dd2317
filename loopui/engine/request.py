"""One typed dataclass of every knob: the UI, the CLI and the Python API all read defaults and ranges from here.

A leaf: no torch, no planning, no other room. Resolving a request against a model is ``loopui.engine.plan``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .lora_refs import LoraRef, check_lora_refs, parse_loras
from .values import number_text, real_number, whole_number

WINDOW_MODES = ("full", "window")
# CogVideoX: DDIM / DPM (v-prediction); Wan: UniPC / Euler / LCM (flow matching). A family refuses the others.
# "lcm" is the few-step sampler of distilled models: the model's clean estimate, re-noised to the next level.
SCHEDULERS = ("ddim", "dpm", "unipc", "euler", "lcm")
IMAGE_CHANNELS = ("estimate", "image", "roll")
SEAM_POLISH_LEVELS = ("off", "fast", "balanced", "strong")
STEP_CACHES = ("off", "loop")
MOTION_REGIONS = ("object", "background", "everything")
# The attention kernels a request may name ("auto": the server's setting, else the fastest installed one that fits
# the GPU) and the weight quantizations; ``loopui.models.accel`` and ``loopui.models.quantize`` map them to
# diffusers' backends and torchao's configs.
ATTENTION_BACKENDS = ("auto", "native", "flash", "flash3", "sage", "xformers")
QUANTIZE_MODES = ("none", "fp8", "int8")


def _knob(default: Any, help: str, minimum: float | None = None, maximum: float | None = None,
          choices: tuple | None = None, step: float | None = None) -> Any:
    """A dataclass field that carries its UI/CLI metadata (help text, range, choices)."""
    metadata = {"help": help, "min": minimum, "max": maximum, "choices": choices, "step": step}
    return field(default=default, metadata=metadata)


def latent_length(num_frames: int, temporal_compression: int = 4) -> int:
    """Number of latent frames L a causal video VAE makes of ``num_frames`` pixel frames (49 -> 13)."""
    return (int(num_frames) - 1) // temporal_compression + 1


def size_text(width: Optional[int], height: Optional[int]) -> str:
    """A frame size written the one way loopui writes sizes everywhere: width first, ``720x480``."""
    return f"{width}x{height}"


def nearest_frame_count(num_frames: int, temporal_compression: int = 4) -> int:
    """The frame count of the form ``k·n + 1`` (k = temporal compression) nearest ``num_frames``; ties go down.

    A causal video VAE turns exactly those counts into whole latents (49 -> 13 for k = 4); any other count would be
    cut to the one below it.
    """
    k = int(temporal_compression)
    below = (int(num_frames) - 1) // k * k + 1
    return below if num_frames - below <= below + k - num_frames else below + k


def auto_rope_scale(length: int, trained_latent_frames: int, rotary: bool, window_mode: str = "full") -> float:
    """The automatic RoPE scale: ``L / L_trained`` for a cycle longer than the model saw, in ``full`` mode on a
    model with rotary embeddings; 1 (off) otherwise."""
    if rotary and window_mode == "full" and length > trained_latent_frames:
        return length / trained_latent_frames
    return 1.0


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

    ``None`` in ``height``/``width``/``shift_skip``/``rope_scale``/``scheduler``/``num_inference_steps`` means
    "choose from the model" (native size, the coprime skip nearest L/2, automatic RoPE scale, the pipeline's own
    scheduler, the model's steps); an empty ``negative_prompt`` is the model's standard one.
    """

    prompt: str = _knob("", "What the loop shows.")
    negative_prompt: str = _knob("", "What to steer away from; empty = the model's standard negative prompt (Wan's "
                                     "own, as its sampler sends it; CogVideoX has none).")
    num_frames: int = _knob(49, "Pixel frames requested; the cycle has L = (frames - 1) // 4 + 1 latents, "
                                "and a frame-invariant loop plays 4·L frames (49 -> 52).", 5, 321, step=4)
    height: Optional[int] = _knob(None, "Output height in pixels (multiple of 16); empty = model's native.", 16, 2048,
                                  step=16)
    width: Optional[int] = _knob(None, "Output width in pixels (multiple of 16); empty = model's native.", 16, 2048,
                                 step=16)
    num_inference_steps: Optional[int] = _knob(None, "Denoising steps: more is slower and usually cleaner; empty = "
                                                     "the model's (50; 40 for Wan 2.1 I2V and Wan 2.2 A14B).", 1, 200,
                                               step=1)
    guidance_scale: Optional[float] = _knob(None, "How strongly the prompt is followed (classifier-free guidance); "
                                                  "empty = the model's recommendation (6 CogVideoX, 5 Wan 2.1 and "
                                                  "Wan 2.2 5B, 4 / 3 Wan 2.2 T2V-A14B, 3.5 I2V-A14B).",
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
    scheduler: Optional[str] = _knob(None, "Sampler: 'ddim' or 'dpm' for CogVideoX (trailing timesteps), 'unipc', "
                                           "'euler' or 'lcm' for Wan (flow matching; 'lcm' re-noises the model's "
                                           "clean estimate at every step, the sampler of 4-step distilled models); "
                                           "empty = the model's recommendation.", choices=SCHEDULERS)
    sigmas: Optional[tuple] = field(default=None, metadata={
        "help": "Flow-matching models only: the noise levels the model is called at, one per step, from 1 down "
                "(final values: no flow shift is applied to them), e.g. 1,0.9375,0.8333,0.625 for a 4-step "
                "distilled Wan (lightx2v: timesteps 1000,750,500,250 at shift 5); as many as the steps; empty = "
                "the scheduler's own spacing.", "min": 0.0, "max": 1.0, "choices": None, "step": None,
        "list": float})
    flow_shift: Optional[float] = _knob(None, "Flow-matching shift of the noise schedule (Wan only): higher spends "
                                              "more of the steps at high noise; empty = the model's recommendation "
                                              "(3 at 480p, 5 at 720p; 12 for Wan 2.2 T2V-A14B).", 0.5, 20.0,
                                        step=0.5)
    seam_polish: str = _knob("fast", "Removes the small seam a loop can leave inside the cycle (where the model last "
                                     "saw it cut): the final steps blend several rotations of the cycle. Extra "
                                     "compute at 50 steps: fast +2% (one extra model pass, the default), balanced "
                                     "+12%, strong +30%; at few steps every big low-noise step is polished (4-8 "
                                     "steps: 1.5-1.7x model calls); off = the papers' exact latent-shift trajectory.",
                             choices=SEAM_POLISH_LEVELS)
    step_cache: str = _knob("off", "Skip model calls on steps whose noise level barely changes: 'loop' reuses the "
                                   "last two computed clean estimates, each in the cycle's own frame order "
                                   "(never another rotation's), blended by where each clip saw the frame; about a "
                                   "third fewer model calls at 50 steps, none skipped at few steps. 'off' = every "
                                   "step calls the model.", choices=STEP_CACHES)
    # How the model runs (speed and memory; the loop itself is the same up to rounding, and with quantize close).
    attention: str = _knob("auto", "Attention kernel: 'auto' = the server's setting (LOOPUI_ATTENTION), else the "
                                   "fastest installed one that fits the GPU (FlashAttention 3 on Hopper, then "
                                   "SageAttention, FlashAttention 2, else PyTorch's own); 'native' = PyTorch's "
                                   "scaled_dot_product_attention, the only one on a CPU. The GPU kernels install from "
                                   "requirements-gpu.txt.", choices=ATTENTION_BACKENDS)
    compile: Optional[bool] = _knob(None, "Compile the transformer's repeated blocks with torch.compile: the first "
                                          "loop at a size compiles (a minute or more), later ones at that size run "
                                          "faster; empty = the server's setting (LOOPUI_COMPILE, else off).")
    quantize: Optional[str] = _knob(None, "Quantize the transformer's weights (torchao): 'fp8' = FP8 weights and "
                                          "activations (GPUs of compute capability 8.9 or newer: Ada, Hopper), "
                                          "'int8' = int8 weights (any GPU or the CPU; half the memory of bf16), "
                                          "'none'. Changing it reloads the model; empty = the server's setting "
                                          "(LOOPUI_QUANTIZE, else none).", choices=QUANTIZE_MODES)
    # Reference-image mode (all inert without an image).
    image: Any = field(default=None, metadata={"help": "Reference image (path, PIL image or HxWx3 array): the loop "
                                                       "starts and ends on it.", "json": False})
    mask: Any = field(default=None, metadata={"help": "Motion mask (path, PIL image or HxW array, white = may "
                                                      "move); wins over the computed saliency mask.", "json": False})
    video: Any = field(default=None, metadata={"help": "A clip to turn into a seamless loop (path to MP4/GIF/WebP/... "
                                                       "or an (F, H, W, 3) uint8 array): resampled to the loop's "
                                                       "frames, fps and size, encoded, noised to init_strength and "
                                                       "denoised so that it closes.", "json": False})
    loop_region: float = _knob(1.0, "With a clip: the fraction of the cycle around the wrap that may change (1 = all "
                                    "of it); the rest is held to the clip.", 0.05, 1.0, step=0.05)
    mask_model: str = _knob("u2netp", "Saliency model that finds the moving object (rembg model name).")
    mask_threshold: float = _knob(0.5, "Saliency cut-off: higher keeps only the most certain object pixels.",
                                  0.0, 1.0, step=0.05)
    mask_grow: int = _knob(0, "Grow (+) or shrink (-) the mask by this many pixels.", -64, 64, step=1)
    mask_feather: int = _knob(8, "Soften the mask edge over this many pixels.", 0, 64, step=1)
    motion_region: str = _knob("object", "Where motion may happen: the salient object, the background (mask "
                                         "inverted), or everywhere (no mask).", choices=MOTION_REGIONS)
    anchor_strength: float = _knob(1.0, "How firmly the reference image is held as the loop's first frame "
                                        "(0 = not at all, 1 = exactly).", 0.0, 1.0, step=0.05)
    init_strength: Optional[float] = _knob(None, "Starting noise: 1 = pure noise (most motion); lower values start "
                                                 "from the noised image or clip (closer to it, less change); empty "
                                                 "= 1 with an image, 0.7 with a clip.", 0.0, 1.0, step=0.05)
    background_freeze: float = _knob(0.0, "Hold everything outside the motion mask still (1 = a cinemagraph with a "
                                          "frozen background).", 0.0, 1.0, step=0.05)
    image_channel: str = _knob("estimate", "Image-to-video models only: what their image channel carries in each "
                                           "clip the model sees. 'estimate' = the image when the anchored frame "
                                           "is first, else the loop's current estimate of the first frame (every "
                                           "call as in training); 'image' = always the image; 'roll' = the image "
                                           "rides with its frame around the cycle. Wan 2.2 TI2V-5B has no "
                                           "image channel: its image is its first latent at timestep 0, which "
                                           "always rides with it ('image' is refused there).",
                               choices=IMAGE_CHANNELS)
    loras: tuple[LoraRef, ...] = field(default=(), metadata={
        "help": "LoRAs to apply, each 'source:scale' (scale -4..4, default 1): a local .safetensors file, a hub "
                "repo id or owner/repo/file.safetensors; diffusers/PEFT, Kohya, ComfyUI and lightx2v keys are read "
                "by diffusers. On Wan 2.2 A14B add ':high' or ':low' for one expert (default both)."})

    def __post_init__(self) -> None:
        self.loras = parse_loras(self.loras)

    def validate(self) -> "LoopRequest":
        """Raise ``ValueError`` naming the offending value; return ``self`` so calls chain."""
        for name, kind in _FIELD_KINDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if kind is str and not isinstance(value, str):
                raise ValueError(f"{name} must be text, got {type(value).__name__}")
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number, got {value!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, (str, bool)) or not isinstance(value, (int, float)):
                continue  # (sigmas, a list, is checked on its own below)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if lo is not None and value < lo:
                raise ValueError(f"{f.name} must be >= {number_text(lo)}, got {value!r}")
            if hi is not None and value > hi:
                raise ValueError(f"{f.name} must be <= {number_text(hi)}, got {value!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % 16 != 0:
                raise ValueError(f"{name} must be a multiple of 16, got {value!r}")
        if self.shift_start > self.shift_end:
            raise ValueError(f"shift_start must not exceed shift_end, got {self.shift_start!r} > {self.shift_end!r}")
        if self.sigmas is not None:
            check_sigmas(self.sigmas, self.num_inference_steps)
        check_lora_refs(self.loras)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        return self

    def to_dict(self) -> dict:
        """JSON-ready settings (used by the sidecar and the UI gallery)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "loras":
                value = [lora.to_dict() for lora in value]
            elif f.metadata.get("json") is False:
                # Images are not JSON; keep a path when the caller gave one so the sidecar can reproduce it.
                value = value if isinstance(value, str) else (None if value is None else "<in-memory>")
            out[f.name] = value
        return out


def check_sigmas(sigmas: Any, num_inference_steps: Optional[int]) -> tuple[float, ...]:
    """A sigma list as floats: one per step (any count while the steps are automatic: the list sets them), strictly
    decreasing, within (0, 1]; ``ValueError`` naming ``sigmas``."""
    if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__"):
        raise ValueError(f"sigmas must be a list of numbers, got {sigmas!r}")
    values = tuple(real_number("sigmas", v) for v in sigmas)
    if not values:
        raise ValueError("sigmas must hold at least one noise level")
    if num_inference_steps is not None and len(values) != num_inference_steps:
        raise ValueError(f"sigmas must have one value per step: {len(values)} given for num_inference_steps "
                         f"{num_inference_steps}")
    if any(not 0.0 < v <= 1.0 for v in values):
        raise ValueError(f"sigmas must lie in (0, 1], got {list(values)}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must decrease from step to step, got {list(values)}")
    return values


def parse_sigmas(value: Any) -> Optional[tuple[float, ...]]:
    """``"1, 0.94, 0.83"`` or a list of numbers as a tuple of floats (None for an empty value); ``ValueError``
    naming ``sigmas`` for text that is not a list of numbers."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        if text.lower() in ("", "auto"):
            return None
        value = [part for part in text.replace(",", " ").split()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"sigmas must be a list of numbers, got {value!r}")
    return tuple(real_number("sigmas", v) for v in value)


def _field_kinds() -> tuple[dict[str, type], frozenset[str]]:
    """(field -> str/bool/int/float, the fields that may be None) from ``LoopRequest``'s type hints."""
    hints = typing.get_type_hints(LoopRequest)
    kinds, optional = {}, set()
    for f in dataclasses.fields(LoopRequest):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if type(None) in args:
            optional.add(f.name)
            hint = next(a for a in args if a is not type(None))
        if hint in (str, bool, int, float):
            kinds[f.name] = hint
    return kinds, frozenset(optional)


_FIELD_KINDS, _OPTIONAL_FIELDS = _field_kinds()
# The knobs the whole-number rule applies to (their type is int).
WHOLE_NUMBER_FIELDS: tuple[str, ...] = tuple(name for name, kind in _FIELD_KINDS.items() if kind is int)
TEXT_FIELDS = ("prompt", "negative_prompt")


def request_from_values(values: Mapping[str, Any]) -> LoopRequest:
    """A validated ``LoopRequest`` from loosely typed values (an API call, a form, a CLI): the one place where
    values are coerced, so the page, the API and the CLI refuse and accept the same things.

    Unknown keys are refused; ``None`` (or an empty string) in a knob that has an automatic value means
    "automatic"; ``"auto"`` works for ``rope_scale``, ``shift_skip``, ``height``, ``width`` and ``scheduler``;
    whole-number knobs follow :func:`whole_number`, other numbers :func:`real_number`; booleans must be booleans.
    Raises ``ValueError`` naming the parameter.
    """
    names = {f.name for f in dataclasses.fields(LoopRequest)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}")
    data: dict[str, Any] = {}
    for name, value in values.items():
        kind = _FIELD_KINDS.get(name)
        if name == "sigmas":
            data[name] = parse_sigmas(value)
            continue
        if name in TEXT_FIELDS:
            value = "" if value is None else value
        elif name == "loras":
            value = parse_loras(value)
        elif isinstance(value, str):
            value = value.strip()
            if value.lower() in ("", "auto") and (name in _OPTIONAL_FIELDS or kind is None):
                value = None  # "automatic" for the knobs that have an automatic value; no file for image/mask
        if value is not None and kind is int:
            value = whole_number(name, value)
        elif value is not None and kind is float:
            value = real_number(name, value)
        data[name] = value
    return LoopRequest(**data).validate()


def knob_info(name: str) -> dict:
    """Default, range, choices and help text of one ``LoopRequest`` field (for UI sliders and CLI help)."""
    for f in dataclasses.fields(LoopRequest):
        if f.name == name:
            return {"default": f.default, **f.metadata}
    raise KeyError(name)
