"""The app's logic without gradio: models, requests, session files, mask previews, history entries.

``blocks.py`` wires these to components and turns ``ValueError`` into ``gr.Error``; everything here returns plain
data, so it reads (and tests) without a browser. Heavy imports (torch, the engine, rembg) happen inside methods.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from loopui.engine.settings import (
    LoopRequest,
    ResolvedRequest,
    default_shift_skip,
    knob_info,
    latent_length,
    request_from_values,
    resolve_request,
    size_text,
)
from loopui.ui.jobs import JobRegistry, LoopJob, ProgressCallback, WaitingLine

logger = logging.getLogger(__name__)

# Settings that make a generation take seconds on a CPU (a preview, not a finished loop).
PREVIEW_SETTINGS: dict[str, int] = {"height": 64, "width": 96, "num_frames": 49, "num_inference_steps": 4}

# Resolution presets: value (width x height, as sizes are written everywhere) -> (height, width) for the two
# boxes; "native" means the model's own size (None, None).
RESOLUTION_PRESETS: dict[str, tuple[Optional[int], Optional[int]]] = {
    "native": (None, None),
    "96x64": (64, 96),
    "384x256": (256, 384),
    "480x320": (320, 480),
    "720x480": (480, 720),
}
RESOLUTION_LABELS: dict[str, str] = {
    "native": "Model's native size",
    "96x64": "Preview 96x64 (seconds on a CPU)",
    "384x256": "Small 384x256",
    "480x320": "Medium 480x320",
    "720x480": "Large 720x480",
}
CUSTOM_RESOLUTION = "custom"

# How the page names a family and a scheduler (the engine's names are the values).
FAMILY_LABELS: dict[str, str] = {"cogvideox": "CogVideoX", "wan": "Wan"}
SCHEDULER_LABELS: dict[str, str] = {"ddim": "DDIM (trailing)", "dpm": "DPM (trailing)",
                                    "unipc": "UniPC (flow matching)", "euler": "Euler (flow matching)"}
IMAGE_CHANNEL_LABELS: dict[str, str] = {
    "estimate": "estimate: the image while the anchored frame leads, else the loop's own first frame (default)",
    "image": "image: the reference image in every clip",
    "roll": "roll: the image rides with its frame around the cycle",
}

# Public mode (a shared server, e.g. a Space): what one request may ask for at most.
# Wan 2.1 1.3B's native 832x480 at 81 frames and Wan 2.2 5B's 121 frames fit; 720p and longer cycles do not.
# Uploads are capped per input by file size (a clip is larger than an image); the decoded size has the engine's own
# caps (64 megapixels per image; 8K frames per clip, of which only the frames the loop uses are decoded).
PUBLIC_LIMITS: dict[str, int] = {"num_inference_steps": 50, "num_frames": 121, "pixels": 480 * 832,
                                 "prompt_chars": 2000, "image_bytes": 20 * 10**6, "video_bytes": 50 * 10**6}
# Housekeeping of session outputs: files older than this, or beyond this total (oldest first), are deleted.
DEFAULT_MAX_OUTPUT_AGE_S = 24 * 3600.0
DEFAULT_MAX_OUTPUT_BYTES = 2 * 2**30

OUTPUT_SUFFIXES = (".mp4", ".gif", ".webp")
AUTO_SCHEDULER = "auto"  # dropdown value for "the model's own scheduler" (LoopRequest.scheduler = None)
MASK_PREVIEW_MAX_SIDE = 512  # the preview mask is computed on a downscaled copy: fast, and the engine resizes it
MAX_HISTORY = 12
SESSION_ROOT_NAME = "loopui-sessions"

# The preview tints what may move in green (it stays visible on red and orange objects); the two brushes are the
# same green ("may move") and a dark grey ("hold still"), and the green channel tells painted strokes apart.
OVERLAY_COLOR = (40, 220, 120)
PAINT_MOVE_COLOR = "rgb(40, 220, 120)"
PAINT_STILL_COLOR = "rgb(40, 40, 40)"

# The /generate parameters that are LoopRequest fields, in the order the UI and the API list them.
REQUEST_FIELDS: tuple[str, ...] = (
    "prompt", "negative_prompt", "image", "mask", "video", "shift_skip", "rope_scale", "num_frames", "num_inference_steps",
    "guidance_scale", "seed", "height", "width", "scheduler", "flow_shift", "use_dynamic_cfg",
    "frame_invariant_decoding", "shift_start", "shift_end", "window_mode", "fps", "seam_polish", "anchor_strength",
    "init_strength", "loop_region", "background_freeze", "image_channel", "motion_region", "mask_model", "mask_threshold",
    "mask_grow", "mask_feather",
)
# The knobs a gallery click restores (the reference image, the painted mask and the clip are not restored).
RESTORED_FIELDS: tuple[str, ...] = tuple(f for f in REQUEST_FIELDS if f not in ("image", "mask", "video"))


# ZeroGPU: GPU seconds per denoising step at a model's native size and trained length (classifier-free guidance
# included) on an H100/H200-class GPU. From CogVideoX's model cards (50 steps on one H100: ~90 s for 5B, ~45 s for 2B);
# not measured here. Other models: scaled from the 5B figure by their VRAM estimate.
GPU_STEP_SECONDS: dict[str, float] = {"THUDM/CogVideoX-5b": 1.8, "THUDM/CogVideoX-5b-I2V": 1.8,
                                      "THUDM/CogVideoX-2b": 0.9}
GPU_DECODE_SECONDS = 15.0  # tiled VAE decode of the trained length at the native size (rough)
GPU_OVERHEAD_SECONDS = 10.0  # prompt encoding, moving tensors, export
GPU_SAFETY = 1.3
ZERO_GPU_MIN_SECONDS, ZERO_GPU_MAX_SECONDS = 30, 300


def estimate_gpu_seconds(spec: Any, values: dict) -> int:
    """GPU seconds one generation needs with these settings (what to ask ZeroGPU for), with a safety margin.

    A visitor whose remaining quota is below the request is refused up front, so asking for a fixed 300 s turned
    free visitors away even for a 4-step preview. Per-step cost grows with the number of tokens (latent frames x
    area): half linear (MLPs), half quadratic (attention); window mode costs one trained-length pass per window;
    seam polish adds its extra passes.
    """
    from loopui.engine.polish import polish_cost

    steps = max(1, int(values.get("num_inference_steps") or 50))
    frames = int(values.get("num_frames") or spec.native_num_frames)
    height = int(values.get("height") or spec.native_height)
    width = int(values.get("width") or spec.native_width)
    length = latent_length(frames, spec.temporal_compression)
    trained = spec.trained_latent_frames
    area = (height * width) / float(spec.native_height * spec.native_width)
    per_step = GPU_STEP_SECONDS.get(spec.model_id, 1.8 * spec.vram_gb / 26.0)
    if values.get("window_mode") == "window" and length > trained:
        passes, tokens = math.ceil(length / (trained - trained // 2)), area
    else:
        passes, tokens = 1, area * length / trained
    step_seconds = per_step * passes * (tokens + tokens**2) / 2.0
    level = values.get("seam_polish") or "off"
    polish = polish_cost(level, steps) if level in ("off", "fast", "balanced", "strong") else 1.0
    decode = GPU_DECODE_SECONDS * area * length / trained
    total = GPU_SAFETY * (steps * step_seconds * polish + decode + GPU_OVERHEAD_SECONDS)
    return int(min(ZERO_GPU_MAX_SECONDS, max(ZERO_GPU_MIN_SECONDS, math.ceil(total))))


def cuda_available() -> bool:
    """Whether a CUDA device is usable (asks torch; creates no CUDA context of ours)."""
    import torch

    return bool(torch.cuda.is_available())


def shift_note(num_frames: int, shift_skip: int, temporal_compression: int = 4) -> str:
    """One line under the shift slider: the cycle length L, and a warning when gcd(k, L) > 1."""
    length = latent_length(num_frames, temporal_compression)
    best = default_shift_skip(length)
    k = int(shift_skip)
    if k == 0:
        return f"Cycle of L = {length} latents. Shift 0 = plain sampling: the loop will not close (try {best})."
    divisor = math.gcd(k, length)
    if k > 1 and divisor > 1:
        return (f"⚠ Shift {k} shares the factor {divisor} with L = {length}: some offsets are never visited, so a "
                f"seam can remain. Try {best} (coprime with {length}).")
    return f"Cycle of L = {length} latents; shift {k} visits every offset (the automatic choice is {best})."


def seam_summary(seam_ratio: Optional[float], worst_text: str = "", interior_ratio: Optional[float] = None) -> str:
    """The seam and interior ratios with their meaning in one line (markdown)."""
    if seam_ratio is None:
        return "Seam ratio: not measured (too few frames)."
    verdict = ("seamless" if seam_ratio < 1.3 else "a slight bump at the wrap" if seam_ratio < 2.0
               else "a visible cut at the wrap")
    line = (f"**Seam ratio {seam_ratio:.2f}** — the jump from the last frame back to the first is "
            f"{seam_ratio:.2f}× an ordinary frame-to-frame step (≈ 1 is seamless): {verdict}.")
    if interior_ratio is not None:
        line += (f" **Interior ratio {interior_ratio:.2f}** — the largest jump inside the loop, same scale "
                 f"(a hidden seam shows here; seam polish lowers it).")
    return f"{line} {worst_text[:1].upper()}{worst_text[1:]}." if worst_text else line


def _scores_line(scores: dict) -> str:
    """The papers' metrics as one more line under the seam ratio (empty when there are none)."""
    from loopui.media import format_scores

    line = format_scores(scores) if scores else ""
    return f"\n\nScores: {line}." if line else ""


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", text)[:32] or "anonymous"


@dataclass(frozen=True)
class KnobState:
    """How the page shows one knob for one model: its value, whether it can be changed, and a note (why it is
    locked -- the engine's own reason -- or what its automatic value is for this model)."""

    value: Any = None
    interactive: bool = True
    note: str = ""


@dataclass(frozen=True)
class ModelView:
    """What the page's knobs offer for one model: read from its spec and from what the engine's ``plan_loop``
    accepts, so the page keeps no rules of its own and offers only what the model can do."""

    model_id: str
    text: str  # the note under the model dropdown
    resolutions: list[tuple[str, str]]  # (label, preset) the model accepts, plus "Custom" unless its size is fixed
    resolution: str  # the preset the page starts with for this model
    size: KnobState  # the width/height boxes: locked (with the reason) for a fixed-size model
    size_step: int  # height and width are multiples of this
    frames: tuple[int, int, int]  # the loop-length slider's (minimum, maximum, step)
    num_frames: int  # the loop length the page starts with
    fps: int
    guidance: KnobState
    schedulers: list[tuple[str, str]]  # (label, value), the automatic choice first
    scheduler: str
    dynamic_cfg: KnobState
    flow_shift: KnobState
    image_channel: KnobState
    preview: dict[str, Any]  # "Use preview settings": resolution, height, width, num_frames, num_inference_steps


PROBE_IMAGE = np.zeros((16, 16, 3), np.uint8)  # stands in for a reference image when a probe plans an I2V loop
PROBE_ROPE_SCALE = 2.0  # a RoPE scale other than 1: whether the model accepts one at all


def help_text(name: str) -> str:
    """A knob's help text without its "empty = ..." clauses (a slider or a dropdown always holds a value; where
    the page says what "automatic" means, it says it for the model at hand)."""
    text = knob_info(name)["help"]
    # The clause ends at a full stop or a semicolon; a decimal point ("0.7") is part of it.
    return re.sub(r"[;,]?\s*empty = (?:[^.;()]|\.(?=\d)|\([^)]*\))*", "", text).replace(" ()", "").strip()


def _plain_reason(exc: BaseException) -> str:
    """An engine refusal as a note for a knob: one line, without the probe's own value ("(got 2.0)")."""
    text = " ".join(str(exc).split())
    return re.sub(r"\s*\(got [^()]*\)", "", text)


@dataclass
class MaskPreview:
    """A reference image prepared for the mask editor: preview-sized image, motion mask, overlay and a note."""

    image: Optional[np.ndarray]  # (h, w, 3) uint8, downscaled
    mask: Optional[np.ndarray]  # (h, w) float32 motion mask (1 = may move), None when there is none
    overlay: Optional[np.ndarray]  # (h, w, 3) uint8 image tinted where it may move
    note: str


@dataclass
class LoopOutcome:
    """What one finished generation gives the page."""

    index: int
    video: Path
    files: list[Path]
    strip: Path
    thumb: Path
    seam_ratio: Optional[float]
    seam_text: str
    details: str
    warnings: list[str]
    model_text: str
    settings: dict


@dataclass
class HistoryEntry:
    """One loop of the session gallery: its knobs (UI values) and files."""

    index: int
    model: str
    values: dict
    video: str
    files: list[str]
    strip: str
    thumb: str
    caption: str
    used_image: bool = False
    used_video: bool = False


@dataclass
class Studio:
    """State shared by every session of the app: the model manager, the device pool, running jobs, defaults, caches.

    ``manager`` is a ``loopui.models.ModelManager`` (built lazily when None). ``demo`` switches the defaults to the
    tiny random model and preview settings. ``has_gpu`` None = ask torch. ``devices`` picks the GPUs: one job runs
    on each at a time, each device with its own cached model and memory policy. ``public`` (a shared server):
    registry models only (no folders), requests capped by ``PUBLIC_LIMITS``. ``line`` is the waiting line in front of
    the GPUs (as many places running at once as there are devices); session outputs older than
    ``max_output_age_s`` or beyond ``max_output_bytes`` in total are deleted.
    """

    manager: Any = None
    model_id: Optional[str] = None
    demo: bool = False
    has_gpu: Optional[bool] = None
    output_root: Optional[Path] = None
    devices: Optional[Any] = None  # "cuda:0,cuda:1" or a list; None = every visible GPU (else the CPU)
    zero_gpu: bool = False  # a Hugging Face ZeroGPU Space: one "cuda" device, model loaded at start-up
    public: bool = False
    max_output_age_s: float = DEFAULT_MAX_OUTPUT_AGE_S
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    jobs: JobRegistry = field(default_factory=JobRegistry)
    line: Optional[WaitingLine] = None  # built in __post_init__ with one running place per device
    pool: Any = field(default=None, repr=False)
    _saliency_cache: "OrderedDict[tuple, Any]" = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _counter: int = 0
    _views: dict = field(default_factory=dict, repr=False)  # (model, public, preview) -> ModelView

    def __post_init__(self) -> None:
        from loopui.models import DEFAULT_MODEL_ID, DEMO_MODEL_ID, resolve_model_id

        if self.manager is None:
            from loopui.models import ModelManager

            self.manager = ModelManager(max_models=1)
        if self.model_id is None:
            self.model_id = DEMO_MODEL_ID if self.demo else DEFAULT_MODEL_ID
        self.model_id = resolve_model_id(str(self.model_id))
        spec = self.spec(self.model_id)  # a bad --model fails at start, with the registry's message
        if self.public and spec.local_path is not None:
            raise ValueError(f"public mode serves registry models only, not the folder {self.model_id!r}: pass a "
                             "model id (see `python -m loopui models`) or run without --public")
        if self.max_output_age_s <= 0 or self.max_output_bytes <= 0:
            raise ValueError(f"output limits must be positive, got age {self.max_output_age_s!r} s and size "
                             f"{self.max_output_bytes!r} bytes")
        if self.has_gpu is None:
            self.has_gpu = cuda_available()
        if self.pool is None:
            from loopui.models import DevicePool, parse_devices

            if self.zero_gpu:
                names = ["cuda"]  # ZeroGPU attaches one GPU per call; CUDA is emulated outside the call
            elif self.devices is None and not self.has_gpu:
                names = ["cpu"]
            else:
                names = parse_devices(self.devices)
            self.pool = DevicePool(names)
        if self.line is None:
            self.line = WaitingLine(slots=self.pool.size)
        if self.output_root is None:
            self.output_root = Path(tempfile.gettempdir()) / SESSION_ROOT_NAME
        self.output_root = Path(self.output_root)

    # -- models ---------------------------------------------------------------------------------------------------

    @staticmethod
    def spec(model_id: str):
        """The registry's ``ModelSpec`` for an id, the ``demo`` alias or a local folder (``ValueError`` if unknown)."""
        from loopui.models import spec_for

        return spec_for(model_id)

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the model dropdown: every registry model with its family and VRAM, plus the
        start-up model if it is a folder."""
        from loopui.models import list_models

        choices = [(self.model_label(s), s.model_id) for s in list_models()]
        if self.model_id not in [value for _, value in choices]:
            choices.insert(0, (f"{self.model_id} (local)", self.model_id))
        return choices

    @staticmethod
    def model_label(spec: Any) -> str:
        """A short dropdown label: the id, its family and what it needs on one GPU."""
        if spec.builtin:
            return f"{spec.model_id} (demo: random weights)"
        family = FAMILY_LABELS.get(spec.family, spec.family)
        name = spec.model_id.removesuffix("-Diffusers")  # the Wan repos' suffix says nothing to a person choosing
        return f"{name} · {family}{' i2v' if spec.image_to_video else ''} · {spec.vram_gb:g} GB"

    def check_model(self, model_id: Any) -> Any:
        """The spec of a model a request names; only the dropdown's models are served (never a path from a client)."""
        from loopui.models import resolve_model_id

        allowed = [value for _, value in self.model_choices()]
        name = resolve_model_id(model_id.strip()) if isinstance(model_id, str) and model_id.strip() else None
        if name is None:
            name = self.model_id
        if name not in allowed:
            raise ValueError(f"model {model_id!r} is not served here; choose one of: {', '.join(allowed)}")
        return self.spec(name)

    def model_text(self, model_id: str) -> str:
        """The note under the model dropdown: description, trained cycle, RoPE, licence, VRAM with and without
        offload, and what the model needs (a reference image, its one size)."""
        spec = self.spec(model_id)
        rope = "rotary (RoPE scaling available)" if spec.rotary else "no rotary embeddings (RoPE scaling off)"
        description = spec.description.rstrip(".") + "." if spec.description else spec.model_id + "."
        parts = [f"{description} Trained on {spec.native_num_frames} frames = {spec.trained_latent_frames} latents; "
                 f"{rope}."]
        if spec.image_to_video:
            parts.append("Needs a reference image (or a clip: its first frame is used).")
        if spec.fixed_size:
            parts.append(f"Runs only at {size_text(spec.native_width, spec.native_height)} (learned positional "
                         f"embeddings).")
        if not spec.builtin:
            parts.append(f"Licence: {spec.license or 'see the model card'}. VRAM: about {spec.vram_gb:g} GB on "
                         f"one GPU, {spec.offload_vram_gb:g} GB with CPU offload.")
        return " ".join(parts)

    def auto_rope_scale(self, model_id: str, num_frames: int, window_mode: str = "full") -> float:
        """The engine's automatic RoPE scale for this model and cycle (1.0 = off)."""
        from loopui.engine.plan import resolve_rope_scale

        spec = self.spec(model_id)
        request = LoopRequest(num_frames=int(num_frames), window_mode=window_mode)
        length = latent_length(int(num_frames), spec.temporal_compression)
        return round(float(resolve_rope_scale(request, spec, length)), 2)

    # -- what the knobs offer for a model -------------------------------------------------------------------------

    @staticmethod
    def _plan(spec: Any, **values: Any) -> Any:
        """The engine's plan of a probe loop on ``spec`` (its native size and frames unless ``values`` say
        otherwise); raises the engine's ``ValueError``. Plans only: nothing is loaded."""
        from loopui.engine.plan import plan_loop

        data = {"prompt": "probe", "num_frames": spec.native_num_frames, **values}
        if spec.image_to_video and data.get("image") is None:
            data["image"] = PROBE_IMAGE
        return plan_loop(LoopRequest(**data), spec)

    def _refusal(self, spec: Any, **values: Any) -> Optional[str]:
        """The engine's one-line reason for refusing ``values`` on ``spec``, None when it accepts them. The page
        disables and filters by this instead of keeping rules of its own."""
        try:
            self._plan(spec, **values)
        except ValueError as exc:
            return _plain_reason(exc)
        return None

    def _public_size_ok(self, height: int, width: int) -> bool:
        return not self.public or height * width <= PUBLIC_LIMITS["pixels"]

    def size_accepted(self, model_id: str, height: int, width: int) -> bool:
        """Whether ``model_id`` can make a loop of this size here (the engine's rule and the public cap)."""
        return self._refusal(self.spec(model_id), height=height, width=width) is None and \
            self._public_size_ok(height, width)

    def model_view(self, model_id: str) -> ModelView:
        """What every model-dependent knob offers and starts at for ``model_id`` (cached per model)."""
        key = (model_id, self.public, self.preview_defaults)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._build_view(model_id)
        return view

    def _build_view(self, model_id: str) -> ModelView:
        spec = self.spec(model_id)
        native = (spec.native_height, spec.native_width)
        native_text = size_text(spec.native_width, spec.native_height)

        # Sizes: the presets the engine accepts for this model (and a public server allows), smallest first.
        sizes: dict[str, tuple[int, int]] = {}
        preview_key = size_text(PREVIEW_SETTINGS["width"], PREVIEW_SETTINGS["height"])
        for key, (h, w) in RESOLUTION_PRESETS.items():
            h, w = (h or native[0], w or native[1])
            if key not in ("native", preview_key) and (h, w) == native:
                continue  # the native entry already offers it (the preview stays: another model keeps it)
            if self._refusal(spec, height=h, width=w) is None and self._public_size_ok(h, w):
                sizes[key] = (h, w)
        labels = {**RESOLUTION_LABELS, "native": f"{RESOLUTION_LABELS['native']} ({native_text})"}
        resolutions = [(labels[key], key) for key in sizes]
        if not spec.fixed_size:
            resolutions.append(("Custom", CUSTOM_RESOLUTION))
        # Smallest first; at equal size a named preset before "native", which means another size on another model.
        by_area = sorted(sizes, key=lambda k: (sizes[k][0] * sizes[k][1], k == "native"))
        smallest = by_area[0] if by_area else "native"
        if self.preview_defaults:
            resolution = smallest
        else:
            resolution = "native" if "native" in sizes else (by_area[-1] if by_area else "native")
        size_reason = self._refusal(spec, height=spec.native_height + spec.size_multiple) if spec.fixed_size else None
        size = KnobState(interactive=size_reason is None,
                         note=(f"Locked: {size_reason}." if size_reason else
                               f"Pixels, a multiple of {spec.size_multiple} for this model; empty = its native "
                               f"{native_text}."))

        # Loop length: every count of the form k·n + 1 the engine accepts in some mode (the page forces the mode).
        k = int(spec.temporal_compression)
        highest = int(knob_info("num_frames")["max"])
        if self.public:
            highest = min(highest, PUBLIC_LIMITS["num_frames"])
        accepted = [f for f in range(k + 1, highest + 1, k)
                    if self._refusal(spec, num_frames=f) is None
                    or self._refusal(spec, num_frames=f, window_mode="window") is None]
        frames = (accepted[0], accepted[-1], k) if accepted else (spec.native_num_frames,) * 2 + (k,)

        def clamp(count: int) -> int:
            return min(max(count, frames[0]), frames[1])

        preview_frames = clamp(PREVIEW_SETTINGS["num_frames"])
        num_frames = preview_frames if self.preview_defaults else clamp(spec.native_num_frames)

        # Guidance, scheduler, dynamic CFG and flow shift: the engine's automatic values and refusals.
        plan = self._plan(spec)
        guidance_note = help_text("guidance_scale")
        if plan.guidance_scale_2 is not None and plan.guidance_scale_2 != plan.guidance_scale:
            guidance_note += (f" Two experts: left at {plan.guidance_scale:g}, the high-noise expert uses "
                              f"{plan.guidance_scale:g} and the low-noise expert {plan.guidance_scale_2:g} (the "
                              f"model's recommendation); any other value applies to both.")
        elif plan.guidance_scale_2 is not None:
            guidance_note += " Two experts: the value applies to both (high-noise and low-noise)."
        own = SCHEDULER_LABELS.get(spec.scheduler or "", "the model's own scheduler")
        schedulers = [(f"Automatic: {own}", AUTO_SCHEDULER)] + [
            (SCHEDULER_LABELS.get(name, name), name) for name in knob_info("scheduler")["choices"]
            if self._refusal(spec, scheduler=name) is None]
        dynamic_reason = self._refusal(spec, use_dynamic_cfg=True)
        dynamic_cfg = (KnobState(False, False, f"Off: {dynamic_reason}.") if dynamic_reason else
                       KnobState(bool(plan.use_dynamic_cfg), True, help_text("use_dynamic_cfg")))
        flow_reason = self._refusal(spec, flow_shift=float(knob_info("flow_shift")["min"]))
        if flow_reason:
            flow_shift = KnobState(None, False, f"Off: {flow_reason}.")
        else:
            autos = {native_text: plan.flow_shift}
            for h, w in ((480, 832), (720, 1280)):  # the sizes the flow shift is tuned for
                if (h, w) != native and self._refusal(spec, height=h, width=w) is None:
                    autos[size_text(w, h)] = self._plan(spec, height=h, width=w).flow_shift
            if len(set(autos.values())) > 1:
                auto = ", ".join(f"{v:g} at {size}" for size, v in sorted(autos.items(), key=lambda i: i[1]))
            else:
                auto = "the scheduler's own" if plan.flow_shift is None else f"{plan.flow_shift:g}"
            flow_shift = KnobState(None, True, f"{help_text('flow_shift')} Empty = automatic: {auto}.")
        if spec.image_to_video:
            # The help's first sentence; the choices' labels explain the three policies.
            image_channel = KnobState(knob_info("image_channel")["default"], True,
                                      help_text("image_channel").split(". ")[0] + ".")
        else:
            image_channel = KnobState(knob_info("image_channel")["default"], False,
                                      "Off: only image-to-video models have an image channel; with this model a "
                                      "reference image anchors the loop's latents instead.")

        h, w = RESOLUTION_PRESETS[smallest]
        preview = {"resolution": smallest, "height": h, "width": w, "num_frames": preview_frames,
                   "num_inference_steps": PREVIEW_SETTINGS["num_inference_steps"]}
        return ModelView(
            model_id=model_id, text=self.model_text(model_id), resolutions=resolutions, resolution=resolution,
            size=size, size_step=int(spec.size_multiple), frames=frames, num_frames=num_frames, fps=plan.fps,
            guidance=KnobState(plan.guidance_scale, True, guidance_note), schedulers=schedulers,
            scheduler=spec.scheduler or AUTO_SCHEDULER, dynamic_cfg=dynamic_cfg, flow_shift=flow_shift,
            image_channel=image_channel, preview=preview)

    def window_state(self, model_id: str, num_frames: int, window_mode: str) -> KnobState:
        """The long-loop mode for this loop length: forced (with the engine's reason) where the engine refuses the
        other mode, free otherwise."""
        spec = self.spec(model_id)
        other = "window" if window_mode == "full" else "full"
        reason = self._refusal(spec, num_frames=int(num_frames), window_mode=window_mode)
        if reason and self._refusal(spec, num_frames=int(num_frames), window_mode=other) is None:
            return KnobState(other, False, f"Forced to '{other}' at this length: {reason}.")
        return KnobState(window_mode, True, help_text("window_mode"))

    def rope_state(self, model_id: str, num_frames: int, window_mode: str) -> KnobState:
        """The RoPE scale slider: locked at 1 (with the engine's reason) where no other scale is accepted, else the
        automatic scale for this cycle."""
        spec = self.spec(model_id)
        reason = self._refusal(spec, num_frames=int(num_frames), window_mode=window_mode,
                               rope_scale=PROBE_ROPE_SCALE)
        if reason:
            return KnobState(1.0, False, f"Locked at 1: {reason}.")
        auto = self.auto_rope_scale(model_id, num_frames, window_mode)
        note = (f" Automatic for this length: {auto:.2f}." if auto != 1.0
                else " Automatic for this length: 1 (the cycle fits the trained length).")
        return KnobState(auto, True, help_text("rope_scale") + note)

    def warm_up(self) -> threading.Thread:
        """In a background thread: tidy old outputs, open the default mask model when its weights are on disk (so
        the first mask preview is quick) and, on the demo model, build it (real models load on the first Generate)."""

        def run() -> None:
            from loopui import saliency

            self.sweep_outputs()
            try:
                if saliency.weights_available(saliency.DEFAULT_MASK_MODEL):
                    saliency.compute_saliency(np.zeros((32, 32, 3), np.uint8), saliency.DEFAULT_MASK_MODEL)
            except (saliency.SaliencyUnavailable, ValueError, OSError) as exc:
                logger.info("mask model warm-up skipped: %s", exc)
            if self.demo:
                from loopui.models import ModelLoadError

                try:
                    self.manager.get(self.model_id)
                except (ModelLoadError, ValueError) as exc:  # the first Generate reports it properly
                    logger.warning("demo model warm-up failed: %s", exc)

        thread = threading.Thread(target=run, name="loopui-warm-up", daemon=True)
        thread.start()
        return thread

    # -- defaults -------------------------------------------------------------------------------------------------

    @property
    def preview_defaults(self) -> bool:
        """Start with preview settings: the demo model, or no GPU."""
        return bool(self.demo or not self.has_gpu)

    def default(self, name: str, model_id: Optional[str] = None) -> Any:
        """The initial value of one knob for ``model_id`` (default: the start-up model): LoopRequest's default,
        the model's recommendation, or the preview settings where they apply."""
        model_id = model_id or self.model_id
        view = self.model_view(model_id)
        if name == "num_frames":
            return view.num_frames
        if self.preview_defaults and name in PREVIEW_SETTINGS:
            return view.preview[name]
        if name == "shift_skip":
            return default_shift_skip(latent_length(view.num_frames, self.spec(model_id).temporal_compression))
        if name == "rope_scale":
            return self.rope_state(model_id, view.num_frames, self.default("window_mode", model_id)).value
        if name == "window_mode":
            return self.window_state(model_id, view.num_frames, knob_info("window_mode")["default"]).value
        followed = {"scheduler": view.scheduler, "guidance_scale": view.guidance.value, "fps": view.fps,
                    "use_dynamic_cfg": view.dynamic_cfg.value, "flow_shift": view.flow_shift.value,
                    "image_channel": view.image_channel.value}
        if name in followed:
            return followed[name]
        if name == "init_strength":
            return 1.0  # the page starts without a clip: pure noise (a clip's own default is the engine's)
        return knob_info(name)["default"]

    def default_resolution(self, model_id: Optional[str] = None) -> str:
        """The resolution preset shown at start."""
        return self.model_view(model_id or self.model_id).resolution

    def banner(self, model_id: Optional[str] = None) -> str:
        """Markdown shown at the top of the page (demo model, no GPU), empty when there is nothing to say."""
        lines = []
        if self.demo:
            lines.append("**Demo model.** This page runs a tiny random-weight CogVideoX built in code: it produces "
                         "abstract noise and exists to try the interface (sliders, progress, Stop, exports, "
                         "API) in seconds without a GPU or a download.")
        if not self.has_gpu:
            model_id = model_id or self.model_id
            preview, spec = self.model_view(model_id).preview, self.spec(model_id)
            size = size_text(preview["width"] or spec.native_width, preview["height"] or spec.native_height)
            lines.append(f"**No GPU found.** Generation runs on the CPU, which is very slow for real models: the "
                         f"page starts with preview settings ({size}, {preview['num_frames']} frames, "
                         f"{preview['num_inference_steps']} steps). Press *Use preview settings* to get "
                         f"them back.")
        return "\n\n".join(lines)

    # -- requests -------------------------------------------------------------------------------------------------

    def build_request(self, values: dict, model_id: Any = None) -> ResolvedRequest:
        """A validated request with every automatic value filled in (``loopui.engine.settings.resolve_request``,
        the same function the CLI uses), from page or API values; ``ValueError`` naming the parameter otherwise.

        Checked here, before anything is queued or loaded: the model is one this server offers, the numbers and
        choices are in range, uploads are readable images, a clip is a video the engine can fit to the loop (read
        and resampled as the engine will), and in public mode the request and its uploads are within their caps.
        """
        spec = self.check_model(model_id)
        data = {name: values[name] for name in REQUEST_FIELDS if name in values}
        if data.get("scheduler") == AUTO_SCHEDULER:
            data["scheduler"] = None
        resolved = resolve_request(request_from_values(data), spec)
        request = resolved.request
        if self.public:
            self._check_public_limits(request)
        for name in ("image", "mask", "video"):
            value = getattr(request, name)
            if value is not None and not isinstance(value, np.ndarray):
                cap = PUBLIC_LIMITS["video_bytes" if name == "video" else "image_bytes"] if self.public else None
                _check_file_size(name, value, cap)
                if name == "video":
                    _check_clip(request, spec)
                else:
                    _check_upload(name, value)
        if spec.image_to_video and request.image is None and request.video is None:
            raise ValueError(f"image: {spec.model_id} animates a reference image; add one first")
        from loopui.engine.plan import plan_loop

        # Said before the run (the status line's notes): a step far beyond the model's own, a clip that is not used.
        warned = tuple(w for w in plan_loop(request, spec).warnings if w.startswith(("cost:", "video:")))
        return dataclasses.replace(resolved, notes=resolved.notes + warned) if warned else resolved

    def page_values(self, values: dict, model_id: str) -> dict:
        """The page's values as a request: while a slider still shows the model's automatic value the page asks for
        "automatic", so it computes exactly what the API and the CLI compute. The RoPE slider shows the automatic
        scale rounded to its step; the guidance slider the model's recommendation, which on a two-expert model
        stands for two values (high-noise and low-noise expert)."""
        values = dict(values)
        try:
            if float(values["guidance_scale"]) == float(self.model_view(model_id).guidance.value):
                values["guidance_scale"] = None
        except (KeyError, TypeError, ValueError):
            pass
        try:
            auto = self.auto_rope_scale(model_id, int(values["num_frames"]), values["window_mode"])
            shown = float(values["rope_scale"])
        except (KeyError, TypeError, ValueError):
            return values
        if abs(shown - auto) < 1e-9:
            values["rope_scale"] = None
        return values

    @staticmethod
    def mask_settings(values: dict, image: Any) -> LoopRequest:
        """The mask knobs of a ``/mask`` call, checked like a generation's (``ValueError`` naming the parameter), and
        the image checked to be readable."""
        from loopui.saliency import mask_model_info

        request = request_from_values(values)
        try:
            mask_model_info(request.mask_model)
        except ValueError as exc:
            raise ValueError(f"mask_model: {exc}") from None
        _check_upload("image", image)
        return request

    @staticmethod
    def _check_public_limits(request: LoopRequest) -> None:
        limits = PUBLIC_LIMITS
        for name in ("num_inference_steps", "num_frames"):
            if getattr(request, name) > limits[name]:
                raise ValueError(f"{name} must be <= {limits[name]} on this public server, got "
                                 f"{getattr(request, name)}")
        if request.height * request.width > limits["pixels"]:
            raise ValueError(f"height x width must be at most {limits['pixels']} pixels on this public server "
                             f"(832x480), got {size_text(request.width, request.height)}")
        if len(request.prompt) + len(request.negative_prompt) > limits["prompt_chars"]:
            raise ValueError(f"prompt must be at most {limits['prompt_chars']} characters on this public server, "
                             f"got {len(request.prompt) + len(request.negative_prompt)}")

    # -- files ----------------------------------------------------------------------------------------------------

    def session_dir(self, session: str) -> Path:
        """This session's output folder under the temp dir (Gradio may serve files from there)."""
        path = Path(self.output_root) / _safe_name(session)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def drop_session(self, session: str) -> None:
        """Delete a session's files (when its browser tab goes away) and stop its job."""
        self.jobs.stop(session)
        path = Path(self.output_root) / _safe_name(session)
        shutil.rmtree(path, ignore_errors=True)

    def sweep_outputs(self, now: Optional[float] = None) -> int:
        """Housekeeping: delete session files older than ``max_output_age_s``, then the oldest ones until all
        together fit in ``max_output_bytes``; empty session folders go too. Returns how many files were deleted."""
        return sweep_folder(Path(self.output_root), self.max_output_age_s, self.max_output_bytes, now=now)

    def _next_index(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    # -- generation -----------------------------------------------------------------------------------------------

    def start(self, session: str, model_id: str, request: LoopRequest) -> LoopJob:
        """Start a generation in a worker thread: wait in line, then for a free device; load (cached) and render there,
        export, seam strip. The device is held from the load to the last file, so no other job loads a model over it.

        Raises ``LineFull`` (a ``ValueError``) at once when the line is full.
        """
        ticket = self.line.join()
        index = self._next_index()
        stem = self.session_dir(session) / f"loop-{index:03d}-seed{request.seed}"
        outputs = [stem.with_suffix(s) for s in OUTPUT_SUFFIXES]

        def run(report: ProgressCallback, cancel: threading.Event) -> LoopOutcome:
            from loopui.engine import LoopInterrupted, render_loop
            from loopui.models import LoadCancelled

            notes: list[str] = []

            def on_load(stage: str, fraction: Optional[float], message: str) -> None:
                if stage == "memory":
                    notes.append(message)
                report("load", int(round(100 * (fraction or 0.0))), 100, message)

            def on_wait() -> None:
                report("load", 0, 100, f"Waiting for a free GPU ({self.pool.size} in use by other visitors)…")

            def work(loaded: Any) -> LoopOutcome:
                if cancel.is_set():
                    raise LoopInterrupted("stopped before sampling started")
                render = render_loop(loaded.pipe, request, outputs=outputs, model_id=loaded.spec.model_id,
                                     callback=report, cancel_event=cancel)
                return self._outcome(index, render, stem, loaded, notes)

            try:
                self.line.wait(ticket, cancel, lambda ahead, waiting: report("queue", ahead, waiting))
                self.sweep_outputs()  # before this loop's files exist, so they are never the ones deleted
                report("load", 0, 100, f"Loading {model_id}")
                with self.pool.acquire(prefer=lambda device: self.manager.holds(model_id, device), cancel=cancel,
                                       on_wait=on_wait) as device:
                    return self.manager.run(model_id, work, device=device, progress=on_load, cancel=cancel,
                                            offload="none" if self.zero_gpu else None)
            except LoadCancelled as exc:
                raise LoopInterrupted(str(exc)) from None
            finally:
                self.line.done(ticket)

        try:
            return self.jobs.start(session, run)
        except BaseException:
            self.line.done(ticket)
            raise

    def preload(self) -> Any:
        """Load the start-up model now (ZeroGPU's pattern: weights go to the GPU at start-up, outside any GPU call,
        so a visitor's GPU time is spent generating, not loading 20 GB)."""
        device = self.pool.devices[0]
        logger.info("loading %s on %s at start-up", self.model_id, device)
        return self.manager.get(self.model_id, device=device, offload="none" if self.zero_gpu else None)

    def gpu_seconds(self, model_id: str, values: dict) -> int:
        """GPU seconds to ask ZeroGPU for one generation with these settings (see :func:`estimate_gpu_seconds`)."""
        try:
            spec = self.spec(model_id or self.model_id)
        except ValueError:
            spec = self.spec(self.model_id)
        try:
            return estimate_gpu_seconds(spec, values)
        except (TypeError, ValueError, OverflowError):
            # Malformed values fail validation inside the call with a proper message; this must not crash first.
            return ZERO_GPU_MAX_SECONDS

    @staticmethod
    def _outcome(index: int, render: Any, stem: Path, loaded: Any, notes: Optional[list] = None) -> LoopOutcome:
        from PIL import Image

        from loopui.media import seam_strip

        result = render.result
        strip = stem.with_name(stem.name + "-seam.png")
        # Top: the wrap (last 3 frames, then the first 3); below: around the largest jump inside the loop.
        rows = [seam_strip(result.frames, n=3)]
        if result.worst_step is not None:
            rows.append(seam_strip(result.frames, n=3, around=result.worst_step))
        gap = np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8)
        Image.fromarray(np.concatenate([rows[0], gap, *rows[1:]]) if len(rows) > 1 else rows[0]).save(strip)
        thumb = stem.with_name(stem.name + "-thumb.png")
        Image.fromarray(result.frames[0]).save(thumb)
        s = result.settings
        timings = result.timings
        details = (f"{len(result.frames)} frames · {size_text(s.get('width'), s.get('height'))} · L = "
                   f"{s.get('num_latent_frames')} latents · shift {s.get('shift_skip')} · RoPE scale "
                   f"{float(s.get('rope_scale', 1.0)):.2f} · {timings.get('total', 0.0):.1f} s (denoise "
                   f"{timings.get('denoise', 0.0):.1f} s, decode {timings.get('decode', 0.0):.1f} s)")
        files = [Path(f) for f in render.files] + [Path(render.sidecar)]
        return LoopOutcome(index=index, video=Path(render.files[0]), files=files, strip=strip, thumb=thumb,
                           seam_ratio=result.seam_ratio,
                           seam_text=seam_summary(result.seam_ratio, result.describe_worst_step(),
                                                    result.interior_ratio) + _scores_line(result.scores),
                           details=details, warnings=list(notes or []) + list(result.warnings),
                           model_text=loaded.describe(),
                           settings=dict(s))

    def history_entry(self, outcome: LoopOutcome, values: dict, model_id: str) -> HistoryEntry:
        """A gallery entry: the UI values that made the loop (to restore them) and its files."""
        kept = {name: values.get(name) for name in RESTORED_FIELDS}
        prompt = str(values.get("prompt") or "")
        short = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        seam = "" if outcome.seam_ratio is None else f" · seam {outcome.seam_ratio:.2f}"
        shift = outcome.settings.get("shift_skip")
        caption = f"#{outcome.index} “{short}” · seed {values.get('seed')} · shift {shift}{seam}"
        return HistoryEntry(index=outcome.index, model=model_id, values=kept, video=str(outcome.video),
                            files=[str(f) for f in outcome.files], strip=str(outcome.strip),
                            thumb=str(outcome.thumb), caption=caption,
                            used_image=values.get("image") is not None,
                            used_video=values.get("video") is not None)

    @staticmethod
    def error_text(exc: BaseException) -> str:
        """A one-line message for the page from an exception raised by a generation."""
        from loopui.media import ImageInputError
        from loopui.models import ModelLoadError
        from loopui.saliency import SaliencyUnavailable

        from loopui.engine.guards import NonFiniteOutput
        from loopui.models import OutOfGPUMemory

        text = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, SaliencyUnavailable) or isinstance(exc.__cause__, SaliencyUnavailable):
            logger.warning("no automatic mask: %s", text)  # the operator's details (path, URL) stay in the log
            return (f"mask_model: {_NO_MASK_MODEL.format(model='the mask model')}; "
                    f"paint the region that may move, or set motion_region to everything")
        if isinstance(exc, ModelLoadError):
            return _load_error_text(exc, text)
        if isinstance(exc, (ValueError, SaliencyUnavailable, ImageInputError)):
            return text
        if isinstance(exc, (OutOfGPUMemory, NonFiniteOutput)):
            return text[:1].upper() + text[1:]
        return f"generation failed ({type(exc).__name__}): {text}"

    # -- masks ----------------------------------------------------------------------------------------------------

    def _raw_saliency(self, image: np.ndarray, key: tuple, mask_model: str) -> Any:
        """The model's soft object mask for a preview image (cached: slider moves only re-run post-processing)."""
        with self._lock:
            if key in self._saliency_cache:
                self._saliency_cache.move_to_end(key)
                return self._saliency_cache[key]
        from loopui.saliency import compute_saliency

        raw = compute_saliency(image, mask_model)
        with self._lock:
            self._saliency_cache[key] = raw
            while len(self._saliency_cache) > 16:
                self._saliency_cache.popitem(last=False)
        return raw

    def mask_preview(self, image_path: Optional[str], mask_model: str, threshold: float, grow: int,
                     feather: int, motion_region: str) -> MaskPreview:
        """The motion mask the engine would use for this image and these settings, at preview size.

        Missing saliency weights are not an error here: the note says why and the user can still paint.
        """
        if not image_path:
            return MaskPreview(None, None, None, "")
        from loopui import saliency

        image = preview_image(image_path)
        if motion_region == "everything":
            return MaskPreview(image, None, image, "Motion region *everything*: the whole frame may move; no mask "
                                                   "is used (painting has no effect).")
        start = time.perf_counter()
        try:
            path = Path(image_path)
            key = (str(path), path.stat().st_mtime_ns if path.exists() else 0, mask_model)
            raw = self._raw_saliency(image, key, mask_model)
        except saliency.SaliencyUnavailable as exc:
            logger.warning("no automatic mask: %s", exc)  # the operator's details (path, URL) stay in the log
            return MaskPreview(image, None, image, f"No automatic mask: {_NO_MASK_MODEL.format(model=mask_model)}. "
                                                   "You can still paint the region that may move (green brush) on "
                                                   "the image.")
        mask = saliency.postprocess_mask(raw, float(threshold), int(grow), float(feather),
                                         invert=motion_region == "background")
        overlay = saliency.overlay_mask(image, mask, color=OVERLAY_COLOR)
        region = "background" if motion_region == "background" else "object"
        note = (f"Green = may move ({region} from {mask_model}, {100 * saliency.mask_coverage(mask):.0f}% of the "
                f"frame, {time.perf_counter() - start:.2f} s). Paint green to add motion, grey to hold still.")
        return MaskPreview(image, mask, overlay, note)

    def painted_user_mask(self, image_path: Optional[str], layers: Optional[list], mask_model: str,
                          motion_region: str) -> Optional[np.ndarray]:
        """The mask to send with a request when the user painted, else None (the engine computes the same mask).

        Paint means "may move" (green) or "hold still" (grey) in the preview's terms. The engine post-processes a
        user mask exactly like the model's (threshold, invert for the background, grow, feather), so the
        strokes are written into the model's raw *object* mask: a green stroke is object when the object moves
        and background when the background moves.
        """
        if not image_path or motion_region == "everything":
            return None
        move, painted = paint_from_layers(layers)
        if painted is None or not painted.any():
            return None
        image = preview_image(image_path)
        height, width = image.shape[:2]
        move = _resize_bool(move, width, height)
        painted = _resize_bool(painted, width, height)
        from loopui import saliency

        try:
            path = Path(image_path)
            key = (str(path), path.stat().st_mtime_ns if path.exists() else 0, mask_model)
            base = np.asarray(self._raw_saliency(image, key, mask_model), dtype=np.float32)
        except saliency.SaliencyUnavailable:
            base = np.zeros((height, width), dtype=np.float32)
        is_object = move if motion_region != "background" else ~move
        out = base.copy()
        out[painted] = is_object[painted].astype(np.float32)
        return np.round(out * 255).astype(np.uint8)


_NO_MASK_MODEL = "{model} is not available on this server (its weights could not be loaded)"


def _upload_name(path: Any) -> str:
    """An upload's own file name (never the server's temp path)."""
    return Path(os.fspath(path)).name if isinstance(path, (str, os.PathLike)) else "upload"


def _check_file_size(name: str, path: Any, max_bytes: Optional[int]) -> None:
    """Refuse an upload over ``max_bytes`` (public mode), naming the parameter."""
    if max_bytes is None or not isinstance(path, (str, os.PathLike)):
        return
    try:
        size = os.path.getsize(path)
    except OSError:
        return  # a missing file is answered by the readers, in their words
    if size > max_bytes:
        raise ValueError(f"{name}: {_upload_name(path)!r} is {size / 10**6:.3g} MB; this public server takes "
                         f"{'clips' if name == 'video' else 'images'} up to {max_bytes / 10**6:.3g} MB")


def _check_clip(request: LoopRequest, spec: Any) -> None:
    """Refuse a clip the engine could not use -- not a video, truncated, too short, too large once decoded, an
    unusable frame rate -- by reading and fitting it as the engine will (``loopui.engine.load_clip``), with one line
    naming ``video`` and the file's own name."""
    from loopui.engine import load_clip
    from loopui.media import ImageInputError, VideoInputError

    path = request.video
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"video: {_upload_name(path)!r} is empty")
    try:
        load_clip(request, spec)
    except (VideoInputError, ImageInputError) as exc:
        name = _upload_name(path)
        text = " ".join(str(exc).split()).removeprefix("video: ")
        if isinstance(path, (str, os.PathLike)):
            text = text.replace(f"video file {os.fspath(path)!r}", repr(name)).replace(os.fspath(path), name)
        if "not a video file" in text:  # text, a picture or a cut-off MP4
            text = f"{name!r} is not a video file (or it is truncated)"
        elif "truncated" in text:
            text = f"{name!r} is truncated (an incomplete upload?)"
        raise ValueError(f"video: {text}") from None


def _check_upload(name: str, path: Any) -> None:
    """Refuse an upload that is not a readable image, with one line naming the parameter and the file's own name
    (never the server's temp path)."""
    from loopui.media import ImageInputError, open_image, read_mask

    try:
        (open_image if name == "image" else read_mask)(path)
    except ImageInputError as exc:
        text = " ".join(str(exc).split())
        if isinstance(path, (str, os.PathLike)):
            full = os.fspath(path)
            text = text.replace(full, Path(full).name)
        if "cannot identify image file" in text:
            text = f"{Path(os.fspath(path)).name!r} is not an image file (or it is empty)"
        elif "truncated" in text:
            text = f"{Path(os.fspath(path)).name!r} is truncated (an incomplete upload?)"
        raise ValueError(f"{name}: {text}") from None


def _load_error_text(exc: BaseException, text: str) -> str:
    """A model that could not be fetched or loaded, in whole sentences: the loader's own one-liner can be cut to a
    length limit mid-word, so its reason is rebuilt from the first sentence of the underlying error."""
    cause = exc.__cause__
    head, _, rest = text.partition(": ")
    advice = rest.partition(" -- ")[2]
    if cause is None or not rest:
        return text
    reason = " ".join(str(cause).split()) or type(cause).__name__
    reason = re.split(r"(?<=[a-z0-9)])\. |\s\(", reason, maxsplit=1)[0].rstrip(". ")
    return f"{head}: {reason}." + (f" To fix: {advice}" if advice else "")


def sweep_folder(root: Path, max_age_s: float, max_bytes: int, now: Optional[float] = None) -> int:
    """Delete files under ``root`` older than ``max_age_s``, then the oldest until the rest fit in ``max_bytes``;
    remove folders left empty. Returns the number of files deleted. Files that vanish meanwhile are skipped."""
    now = time.time() if now is None else now
    if not root.is_dir():
        return 0
    files = []
    for path in root.rglob("*"):
        try:
            if path.is_file():
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        except OSError:
            continue
    files.sort()
    removed = 0
    total = sum(size for _, size, _ in files)
    for mtime, size, path in files:
        if now - mtime <= max_age_s and total <= max_bytes:
            break
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("could not delete old output %s: %s", path, exc)
            continue
        removed += 1
        total -= size
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only succeeds when empty; the exporter re-creates a session's folder when it writes
        except OSError:
            pass
    if removed:
        logger.info("housekeeping: deleted %d old output files under %s", removed, root)
    return removed


def preview_image(image_path: str, max_side: int = MASK_PREVIEW_MAX_SIDE) -> np.ndarray:
    """The reference image upright, RGB, downscaled to ``max_side`` (``ValueError`` if unreadable)."""
    from PIL import Image

    from loopui.saliency import load_rgb_image

    image = load_rgb_image(image_path)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(image)


def paint_from_layers(layers: Optional[list]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(may-move HxW bool, painted HxW bool) from ImageEditor layers (HxWx4 RGBA), or (None, None)."""
    if not layers:
        return None, None
    move = painted = None
    for layer in layers:
        if layer is None:
            continue
        arr = np.asarray(layer)
        if arr.ndim != 3 or arr.shape[2] != 4:
            continue
        here = arr[..., 3] > 0
        # The green channel tells the two brushes apart (move = bright green, still = dark grey).
        green = arr[..., 1] > 127
        if move is None:
            move, painted = np.zeros(here.shape, bool), np.zeros(here.shape, bool)
        if here.shape != painted.shape:
            continue
        move = np.where(here, green, move)
        painted |= here
    return move, painted


def _resize_bool(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(img) > 127
