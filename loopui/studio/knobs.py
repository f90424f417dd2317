"""What the page's knobs offer and start at for each model: read from the model's spec and from what the engine's
``plan_loop`` accepts, so the page keeps no rules of its own and offers only what the model can do.

Plans only: nothing is loaded here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from loopui.engine.request import LoopRequest, default_shift_skip, knob_info, latent_length, size_text
from loopui.messages import one_line
from loopui.studio.requests import AUTO_SCHEDULER, COMPILE_CHOICES, PUBLIC_LIMITS

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
                                    "unipc": "UniPC (flow matching)", "euler": "Euler (flow matching)",
                                    "lcm": "LCM (flow matching, re-noising: distilled few-step models)"}
IMAGE_CHANNEL_LABELS: dict[str, str] = {
    "estimate": "estimate: the image while the anchored frame leads, else the loop's own first frame (default)",
    "image": "image: the reference image in every clip",
    "roll": "roll: the image rides with its frame around the cycle",
}

PROBE_IMAGE = np.zeros((16, 16, 3), np.uint8)  # stands in for a reference image when a probe plans an I2V loop
PROBE_ROPE_SCALE = 2.0  # a RoPE scale other than 1: whether the model accepts one at all
PROBE_SIGMAS = (1.0, 0.5)  # a sigma list: whether the model takes one at all
# Wan 2.2 A14B: which expert the page's LoRAs adapt; the engine's spelling after the scale ("name:1:high").
LORA_EXPERT_LABELS: dict[str, str] = {"both": "both experts", "high": "high-noise expert only",
                                      "low": "low-noise expert only"}


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
    steps: int  # the model's own number of denoising steps (what "automatic" plans)
    guidance: KnobState
    schedulers: list[tuple[str, str]]  # (label, value), the automatic choice first
    scheduler: str
    dynamic_cfg: KnobState
    flow_shift: KnobState
    image_channel: KnobState
    sigmas: KnobState  # the sigma list box: locked (with the engine's reason) where the model takes none
    lora_expert: KnobState  # which expert a LoRA adapts: two-expert models only
    attentions: list[str]  # the attention kernels the model can use ("auto" first)
    attention_note: str
    preview: dict[str, Any]  # "Use preview settings": resolution, height, width, num_frames, num_inference_steps


def model_spec(model_id: str) -> Any:
    """The registry's ``ModelSpec`` for an id, the ``demo`` alias or a local folder (``ValueError`` if unknown)."""
    from loopui.models import spec_for

    return spec_for(model_id)


def help_text(name: str) -> str:
    """A knob's help text without its "empty = ..." clauses (a slider or a dropdown always holds a value; where
    the page says what "automatic" means, it says it for the model at hand)."""
    text = knob_info(name)["help"]
    # The clause ends at a full stop or a semicolon; a decimal point ("0.7") is part of it.
    return re.sub(r"[;,]?\s*empty = (?:[^.;()]|\.(?=\d)|\([^)]*\))*", "", text).replace(" ()", "").strip()


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


def model_label(spec: Any) -> str:
    """A short dropdown label: the id, its family and what it needs on one GPU."""
    if spec.builtin:
        return f"{spec.model_id} (demo: random weights)"
    family = FAMILY_LABELS.get(spec.family, spec.family)
    name = spec.model_id.removesuffix("-Diffusers")  # the Wan repos' suffix says nothing to a person choosing
    return f"{name} · {family}{' i2v' if spec.image_to_video else ''} · {spec.vram_gb:g} GB"


def model_text(model_id: str) -> str:
    """The note under the model dropdown: description, trained cycle, RoPE, licence, VRAM with and without
    offload, and what the model needs (a reference image, its one size)."""
    model = model_spec(model_id)
    rope = "rotary (RoPE scaling available)" if model.rotary else "no rotary embeddings (RoPE scaling off)"
    description = model.description.rstrip(".") + "." if model.description else model.model_id + "."
    parts = [f"{description} Trained on {model.native_num_frames} frames = {model.trained_latent_frames} latents; "
             f"{rope}."]
    if model.image_to_video:
        parts.append("Needs a reference image (or a clip: its first frame is used).")
    if model.fixed_size:
        parts.append(f"Runs only at {size_text(model.native_width, model.native_height)} (learned positional "
                     f"embeddings).")
    if not model.builtin:
        parts.append(f"Licence: {model.license or 'see the model card'}. VRAM: about {model.vram_gb:g} GB on "
                     f"one GPU, {model.offload_vram_gb:g} GB with CPU offload.")
    return " ".join(parts)


def auto_rope_scale(model_id: str, num_frames: int, window_mode: str = "full") -> float:
    """The engine's automatic RoPE scale for this model and cycle (1.0 = off)."""
    from loopui.engine.plan import resolve_rope_scale

    model = model_spec(model_id)
    request = LoopRequest(num_frames=int(num_frames), window_mode=window_mode)
    length = latent_length(int(num_frames), model.temporal_compression)
    return round(float(resolve_rope_scale(request, model, length)), 2)


def _plan(spec: Any, **values: Any) -> Any:
    """The engine's plan of a probe loop on ``spec`` (its native size and frames unless ``values`` say
    otherwise); raises the engine's ``ValueError``. Plans only: nothing is loaded."""
    from loopui.engine.plan import plan_loop

    data = {"prompt": "probe", "num_frames": spec.native_num_frames, **values}
    if spec.image_to_video and data.get("image") is None:
        data["image"] = PROBE_IMAGE
    return plan_loop(LoopRequest(**data), spec)


def _refusal(spec: Any, **values: Any) -> Optional[str]:
    """The engine's one-line reason for refusing ``values`` on ``spec``, None when it accepts them. The page
    disables and filters by this instead of keeping rules of its own."""
    try:
        _plan(spec, **values)
    except ValueError as exc:
        return _plain_reason(exc)
    return None


def _plain_reason(exc: BaseException) -> str:
    """An engine refusal as a note for a knob: one line, without the probe's own value ("(got 2.0)")."""
    text = one_line(exc)
    return re.sub(r"\s*\(got [^()]*\)", "", text)


def window_state(model_id: str, num_frames: int, window_mode: str) -> KnobState:
    """The long-loop mode for this loop length: forced (with the engine's reason) where the engine refuses the
    other mode, free otherwise."""
    model = model_spec(model_id)
    other = "window" if window_mode == "full" else "full"
    reason = _refusal(model, num_frames=int(num_frames), window_mode=window_mode)
    if reason and _refusal(model, num_frames=int(num_frames), window_mode=other) is None:
        return KnobState(other, False, f"Forced to '{other}' at this length: {reason}.")
    return KnobState(window_mode, True, help_text("window_mode"))


def rope_state(model_id: str, num_frames: int, window_mode: str) -> KnobState:
    """The RoPE scale slider: locked at 1 (with the engine's reason) where no other scale is accepted, else the
    automatic scale for this cycle."""
    reason = _refusal(model_spec(model_id), num_frames=int(num_frames), window_mode=window_mode,
                      rope_scale=PROBE_ROPE_SCALE)
    if reason:
        return KnobState(1.0, False, f"Locked at 1: {reason}.")
    auto = auto_rope_scale(model_id, num_frames, window_mode)
    note = (f" Automatic for this length: {auto:.2f}." if auto != 1.0
            else " Automatic for this length: 1 (the cycle fits the trained length).")
    return KnobState(auto, True, help_text("rope_scale") + note)


@dataclass
class Knobs:
    """The page's knobs on this server: the start-up model, the models it serves, what each model's knobs offer
    and start at (a ``ModelView``, cached per model), the defaults and the banner.

    ``demo`` and ``has_gpu`` choose the preview defaults (a preview on the demo model or without a GPU); ``public``
    (a shared server) drops the sizes and lengths over ``PUBLIC_LIMITS``. ``loras`` (file name -> path): the server's
    own LoRAs, offered by name (in public mode the only ones a request may use).
    """

    model_id: str
    demo: bool = False
    has_gpu: bool = True
    public: bool = False
    loras: dict = field(default_factory=dict)
    # What "auto" means on this server for attention, compile and quantize (``requests.server_runtime``).
    runtime: dict = field(default_factory=lambda: {"attention": "native", "compile": False, "quantize": "none"})
    _views: dict = field(default_factory=dict, repr=False)  # (model, public, preview) -> ModelView

    @property
    def preview_defaults(self) -> bool:
        """Start with preview settings: the demo model, or no GPU."""
        return bool(self.demo or not self.has_gpu)

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the model dropdown: every registry model with its family and VRAM, plus the
        start-up model if it is a folder."""
        from loopui.models import list_models

        choices = [(model_label(s), s.model_id) for s in list_models()]
        if self.model_id not in [value for _, value in choices]:
            choices.insert(0, (f"{self.model_id} (local)", self.model_id))
        return choices

    def served_models(self) -> list[str]:
        """The model ids the dropdown offers: the only ones a request may name."""
        return [value for _, value in self.model_choices()]

    def page_values(self, values: dict, model_id: str) -> dict:
        """The page's values as a request: while a slider still shows the model's automatic value the page asks for
        "automatic", so it computes exactly what the API and the CLI compute. The RoPE slider shows the automatic
        scale rounded to its step; the guidance slider the model's recommendation, which on a two-expert model
        stands for two values (high-noise and low-noise expert); the Steps slider the model's own count, which with a
        sigma list means "as many steps as sigmas"."""
        values = dict(values)
        if isinstance(values.get("compile"), str):  # the page's dropdown: auto (the server's), on, off
            values["compile"] = COMPILE_CHOICES.get(values["compile"], values["compile"])
        try:
            if int(values["num_inference_steps"]) == self.model_view(model_id).steps:
                values["num_inference_steps"] = None
        except (KeyError, TypeError, ValueError):
            pass
        try:
            if float(values["guidance_scale"]) == float(self.model_view(model_id).guidance.value):
                values["guidance_scale"] = None
        except (KeyError, TypeError, ValueError):
            pass
        try:
            auto = auto_rope_scale(model_id, int(values["num_frames"]), values["window_mode"])
            shown = float(values["rope_scale"])
        except (KeyError, TypeError, ValueError):
            return values
        if abs(shown - auto) < 1e-9:
            values["rope_scale"] = None
        return values

    def _public_size_ok(self, height: int, width: int) -> bool:
        return not self.public or height * width <= PUBLIC_LIMITS["pixels"]

    def size_accepted(self, model_id: str, height: int, width: int) -> bool:
        """Whether ``model_id`` can make a loop of this size here (the engine's rule and the public cap)."""
        accepted = _refusal(model_spec(model_id), height=height, width=width) is None
        return accepted and self._public_size_ok(height, width)

    def model_view(self, model_id: str) -> ModelView:
        """What every model-dependent knob offers and starts at for ``model_id`` (cached per model)."""
        key = (model_id, self.public, self.preview_defaults)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._build_view(model_id)
        return view

    def _build_view(self, model_id: str) -> ModelView:
        model = model_spec(model_id)
        native = (model.native_height, model.native_width)
        native_text = size_text(model.native_width, model.native_height)

        # Sizes: the presets the engine accepts for this model (and a public server allows), smallest first.
        sizes: dict[str, tuple[int, int]] = {}
        preview_key = size_text(PREVIEW_SETTINGS["width"], PREVIEW_SETTINGS["height"])
        for key, (h, w) in RESOLUTION_PRESETS.items():
            h, w = (h or native[0], w or native[1])
            if key not in ("native", preview_key) and (h, w) == native:
                continue  # the native entry already offers it (the preview stays: another model keeps it)
            if _refusal(model, height=h, width=w) is None and self._public_size_ok(h, w):
                sizes[key] = (h, w)
        labels = {**RESOLUTION_LABELS, "native": f"{RESOLUTION_LABELS['native']} ({native_text})"}
        resolutions = [(labels[key], key) for key in sizes]
        if not model.fixed_size:
            resolutions.append(("Custom", CUSTOM_RESOLUTION))
        # Smallest first; at equal size a named preset before "native", which means another size on another model.
        by_area = sorted(sizes, key=lambda k: (sizes[k][0] * sizes[k][1], k == "native"))
        smallest = by_area[0] if by_area else "native"
        if self.preview_defaults:
            resolution = smallest
        else:
            resolution = "native" if "native" in sizes else (by_area[-1] if by_area else "native")
        size_reason = _refusal(model, height=model.native_height + model.size_multiple) if model.fixed_size else None
        size = KnobState(interactive=size_reason is None,
                         note=(f"Locked: {size_reason}." if size_reason else
                               f"Pixels, a multiple of {model.size_multiple} for this model; empty = its native "
                               f"{native_text}."))

        # Loop length: every count of the form k·n + 1 the engine accepts in some mode (the page forces the mode).
        k = int(model.temporal_compression)
        highest = int(knob_info("num_frames")["max"])
        if self.public:
            highest = min(highest, PUBLIC_LIMITS["num_frames"])
        accepted = [f for f in range(k + 1, highest + 1, k)
                    if _refusal(model, num_frames=f) is None
                    or _refusal(model, num_frames=f, window_mode="window") is None]
        frames = (accepted[0], accepted[-1], k) if accepted else (model.native_num_frames,) * 2 + (k,)

        def clamp(count: int) -> int:
            return min(max(count, frames[0]), frames[1])

        preview_frames = clamp(PREVIEW_SETTINGS["num_frames"])
        num_frames = preview_frames if self.preview_defaults else clamp(model.native_num_frames)

        # Guidance, scheduler, dynamic CFG and flow shift: the engine's automatic values and refusals.
        plan = _plan(model)
        guidance_note = help_text("guidance_scale")
        if plan.guidance_scale_2 is not None and plan.guidance_scale_2 != plan.guidance_scale:
            guidance_note += (f" Two experts: left at {plan.guidance_scale:g}, the high-noise expert uses "
                              f"{plan.guidance_scale:g} and the low-noise expert {plan.guidance_scale_2:g} (the "
                              f"model's recommendation); any other value applies to both.")
        elif plan.guidance_scale_2 is not None:
            guidance_note += " Two experts: the value applies to both (high-noise and low-noise)."
        own = SCHEDULER_LABELS.get(model.scheduler or "", "the model's own scheduler")
        schedulers = [(f"Automatic: {own}", AUTO_SCHEDULER)] + [
            (SCHEDULER_LABELS.get(name, name), name) for name in knob_info("scheduler")["choices"]
            if _refusal(model, scheduler=name) is None]
        dynamic_reason = _refusal(model, use_dynamic_cfg=True)
        dynamic_cfg = (KnobState(False, False, f"Off: {dynamic_reason}.") if dynamic_reason else
                       KnobState(bool(plan.use_dynamic_cfg), True, help_text("use_dynamic_cfg")))
        flow_reason = _refusal(model, flow_shift=float(knob_info("flow_shift")["min"]))
        if flow_reason:
            flow_shift = KnobState(None, False, f"Off: {flow_reason}.")
        else:
            autos = {native_text: plan.flow_shift}
            for h, w in ((480, 832), (720, 1280)):  # the sizes the flow shift is tuned for
                if (h, w) != native and _refusal(model, height=h, width=w) is None:
                    autos[size_text(w, h)] = _plan(model, height=h, width=w).flow_shift
            if len(set(autos.values())) > 1:
                auto = ", ".join(f"{v:g} at {size}" for size, v in sorted(autos.items(), key=lambda i: i[1]))
            else:
                auto = "the scheduler's own" if plan.flow_shift is None else f"{plan.flow_shift:g}"
            flow_shift = KnobState(None, True, f"{help_text('flow_shift')} Empty = automatic: {auto}.")
        if model.image_to_video:
            # The help's first sentence; the choices' labels explain the three policies.
            image_channel = KnobState(knob_info("image_channel")["default"], True,
                                      help_text("image_channel").split(". ")[0] + ".")
        else:
            image_channel = KnobState(knob_info("image_channel")["default"], False,
                                      "Off: only image-to-video models have an image channel; with this model a "
                                      "reference image anchors the loop's latents instead.")

        sigma_reason = _refusal(model, sigmas=PROBE_SIGMAS)
        sigmas = (KnobState(None, False, f"Off: {sigma_reason}.") if sigma_reason else
                  KnobState(None, True, help_text("sigmas") + " Empty = the scheduler's own spacing; with a list, "
                                                              "Steps at the model's value follows its length."))
        lora_expert = (KnobState("both", True, "Two experts: a LoRA made for one of them (high-noise or "
                                               "low-noise) goes there only.") if model.experts > 1 else
                       KnobState("both", False, "Off: this model has one denoiser; only Wan 2.2 A14B has two "
                                                "experts."))

        kernels = list(knob_info("attention")["choices"])
        attention_reason = _refusal(model, attention=kernels[-1])
        if attention_reason:
            attentions, attention_note = ["auto", "native"], f"PyTorch's own kernel only: {attention_reason}."
        else:
            attentions = kernels
            attention_note = f"{help_text('attention')} Here auto = {self.runtime['attention']}."

        h, w = RESOLUTION_PRESETS[smallest]
        preview = {"resolution": smallest, "height": h, "width": w, "num_frames": preview_frames,
                   "num_inference_steps": PREVIEW_SETTINGS["num_inference_steps"]}
        return ModelView(
            model_id=model_id, text=model_text(model_id), resolutions=resolutions, resolution=resolution,
            size=size, size_step=int(model.size_multiple), frames=frames, num_frames=num_frames, fps=plan.fps,
            steps=plan.num_inference_steps,
            guidance=KnobState(plan.guidance_scale, True, guidance_note), schedulers=schedulers,
            scheduler=model.scheduler or AUTO_SCHEDULER, dynamic_cfg=dynamic_cfg, flow_shift=flow_shift,
            image_channel=image_channel, sigmas=sigmas, lora_expert=lora_expert, attentions=attentions,
            attention_note=attention_note, preview=preview)

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
            return default_shift_skip(latent_length(view.num_frames, model_spec(model_id).temporal_compression))
        if name == "rope_scale":
            return rope_state(model_id, view.num_frames, self.default("window_mode", model_id)).value
        if name == "window_mode":
            return window_state(model_id, view.num_frames, knob_info("window_mode")["default"]).value
        followed = {"num_inference_steps": view.steps, "scheduler": view.scheduler,
                    "guidance_scale": view.guidance.value, "fps": view.fps,
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
            preview, model = self.model_view(model_id).preview, model_spec(model_id)
            size = size_text(preview["width"] or model.native_width, preview["height"] or model.native_height)
            lines.append(f"**No GPU found.** Generation runs on the CPU, which is very slow for real models: the "
                         f"page starts with preview settings ({size}, {preview['num_frames']} frames, "
                         f"{preview['num_inference_steps']} steps). Press *Use preview settings* to get "
                         f"them back.")
        return "\n\n".join(lines)
