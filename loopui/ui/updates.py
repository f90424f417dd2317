"""``gr.update`` builders: what the page's knobs become after the model, the loop length or the long-loop mode
changed (from ``loopui.studio.knobs``), and how a worker's progress event shows."""

from __future__ import annotations

from typing import Any, Optional

import gradio as gr

from loopui.engine.request import default_shift_skip, knob_info, latent_length
from loopui.studio.jobs import JobEvent, ProgressClock
from loopui.studio.knobs import (
    CUSTOM_RESOLUTION,
    RESOLUTION_PRESETS,
    Knobs,
    ModelView,
    model_spec,
    rope_state,
    window_state,
)

STAGE_LABELS = {"queue": "Queued", "load": "Loading model", "encode": "Encoding prompt",
                "compile": "Compiling (first run only)", "denoise": "Denoising", "decode": "Decoding frames",
                "export": "Writing MP4 / GIF / WebP"}

# The components that follow the model, in the order model_updates returns them.
FOLLOW_MODEL = ("model_md", "banner_md", "resolution", "height", "width", "num_frames", "shift_skip", "window_mode",
                "rope_scale", "num_inference_steps", "guidance_scale", "scheduler", "use_dynamic_cfg", "flow_shift",
                "sigmas", "image_channel", "fps", "lora_expert", "recipe", "attention")


def progress_view(event: JobEvent, clock: ProgressClock) -> tuple[tuple[tuple, dict], str]:
    """(gr.Progress arguments, status line) for one worker progress event; times come from ``clock``."""
    label = STAGE_LABELS.get(event.stage, event.stage)
    if event.stage == "queue":
        ahead = event.step
        text = (f"Queued: {ahead} loop{'s' if ahead != 1 else ''} ahead of yours (position {ahead + 1}). "
                "Stop takes it out of the line.")
        return ((None,), {"desc": text}), text
    elapsed, left = clock.times(event.stage, event.step, event.total)
    timing = f"{elapsed:.0f} s elapsed" + (f" · about {left:.0f} s left" if left is not None else "")
    if event.stage == "denoise":
        return (((event.step, event.total),), {"desc": f"{label} · {timing}", "unit": "steps"}), \
            f"{label}: {event.total} steps (progress on the player)…"
    if event.stage == "load":
        text = event.message or label
        return ((event.step / 100.0 if event.total else None,), {"desc": f"{text} · {timing}"}), text
    fraction = event.step / event.total if event.total else None
    return ((fraction,), {"desc": f"{label} · {timing}"}), label + "…"


def rope_update(model_id: str, num_frames: int, window_mode: str, value: Optional[float] = None) -> dict:
    """The RoPE slider for this model and cycle: locked at 1 where the engine accepts no other scale, else the
    automatic scale (or ``value``)."""
    state = rope_state(model_id, int(num_frames), window_mode)
    if not state.interactive:
        return gr.update(value=state.value, interactive=False, info=state.note)
    return gr.update(value=state.value if value is None else value, interactive=True, info=state.note)


def window_update(model_id: str, num_frames: int, window_mode: str) -> tuple[Any, str]:
    """(the long-loop radio's update, the mode in effect): forced where the engine refuses the other mode."""
    state = window_state(model_id, int(num_frames), window_mode)
    return gr.update(value=state.value, interactive=state.interactive, info=state.note), state.value


def shift_update(model_id: str, num_frames: int, value: Optional[int] = None) -> dict:
    """The shift slider for this cycle: 0..L-1, at ``value`` (kept below L) or the coprime skip nearest L/2."""
    length = latent_length(int(num_frames), model_spec(model_id).temporal_compression)
    k = default_shift_skip(length) if value is None else min(int(value), max(length - 1, 0))
    return gr.update(maximum=max(length - 1, 1), value=k, interactive=length > 1)


def length_updates(model_id: str, num_frames: int, window_mode: str) -> tuple[Any, Any, Any]:
    """Shift, long-loop mode and RoPE scale after the loop length (or the model) changed."""
    window, mode = window_update(model_id, num_frames, window_mode)
    return shift_update(model_id, num_frames), window, rope_update(model_id, num_frames, mode)


def preset_for(height: Optional[float], width: Optional[float]) -> str:
    """The resolution preset of a size (both empty: the model's native), else "Custom"."""
    size = (int(height) if height else None, int(width) if width else None)
    return next((key for key, hw in RESOLUTION_PRESETS.items() if hw == size), CUSTOM_RESOLUTION)


def _size_box(view: ModelView, value: Optional[int]) -> Any:
    return gr.update(value=value, step=view.size_step, interactive=view.size.interactive, info=view.size.note)


def steps_update(knobs: Knobs, view: ModelView, steps: Optional[float] = None) -> Any:
    """The Steps slider for a newly chosen model: the model's planned steps (50, or 40 for Wan 2.1 I2V and Wan 2.2
    A14B), except while it shows the preview's steps on a server that starts with preview settings (no GPU, or
    the demo model), where the preview stays."""
    try:
        previewing = knobs.preview_defaults and int(float(steps)) == int(view.preview["num_inference_steps"])
    except (TypeError, ValueError):
        previewing = False
    return gr.update() if previewing else gr.update(value=view.steps)


def model_updates(knobs: Knobs, model_id: str, preset: Optional[str] = None, height: Optional[float] = None,
                  width: Optional[float] = None, steps: Optional[float] = None) -> dict[str, Any]:
    """Every knob that follows the model, set to what ``model_id`` offers and recommends (see ``Knobs.model_view``).

    The resolution stays when the model accepts it (a preset it offers, or a custom size it plans), else it becomes
    the model's default; the loop length becomes the model's; the Steps slider (showing ``steps``) the model's own
    count (see :func:`steps_update`); a sigma list is cleared (it belongs to a model's schedule)."""
    view = knobs.model_view(model_id)
    offered = [key for _, key in view.resolutions]
    if preset == CUSTOM_RESOLUTION and not (height and width and knobs.size_accepted(model_id, int(height),
                                                                                      int(width))):
        preset = None
    if preset not in offered:
        preset, (height, width) = view.resolution, RESOLUTION_PRESETS[view.resolution]
    elif preset != CUSTOM_RESOLUTION:
        height, width = RESOLUTION_PRESETS[preset]
    frames = view.num_frames
    shift, window, rope = length_updates(model_id, frames, knob_info("window_mode")["default"])
    banner = knobs.banner(model_id)
    return dict(
        model_md=view.text, banner_md=banner, resolution=gr.update(choices=view.resolutions, value=preset),
        height=_size_box(view, height), width=_size_box(view, width),
        num_frames=gr.update(minimum=view.frames[0], maximum=view.frames[1], step=view.frames[2], value=frames),
        shift_skip=shift, window_mode=window, rope_scale=rope, num_inference_steps=steps_update(knobs, view, steps),
        guidance_scale=gr.update(value=view.guidance.value, info=view.guidance.note),
        scheduler=gr.update(choices=view.schedulers, value=view.scheduler),
        use_dynamic_cfg=gr.update(value=view.dynamic_cfg.value, interactive=view.dynamic_cfg.interactive,
                                  info=view.dynamic_cfg.note),
        flow_shift=gr.update(value=view.flow_shift.value, interactive=view.flow_shift.interactive,
                             info=view.flow_shift.note),
        sigmas=gr.update(value=view.sigmas.value, interactive=view.sigmas.interactive, info=view.sigmas.note),
        image_channel=gr.update(value=view.image_channel.value, interactive=view.image_channel.interactive,
                                info=view.image_channel.note),
        fps=gr.update(value=view.fps),
        lora_expert=gr.update(value=view.lora_expert.value, interactive=view.lora_expert.interactive,
                              info=view.lora_expert.note),
        recipe=recipe_update(model_id, knobs.public),
        attention=gr.update(choices=view.attentions, value="auto", info=view.attention_note),
    )


NO_RECIPE = ("None", "")


def recipe_update(model_id: str, public: bool = False) -> Any:
    """The speed-recipe dropdown for ``model_id``: none, then the model's recipes (locked when it has none, and on a
    public server, which takes only its own LoRAs: a recipe downloads its distilled LoRA)."""
    from loopui.models.recipes import recipes_for

    recipes = recipes_for(model_id)
    info = ("Fills the knobs left at their automatic values (steps, guidance, scheduler, sigmas) with a distilled "
            "LoRA's few-step settings and adds its LoRA (downloaded on first use); what you set yourself wins."
            if recipes else "No published few-step recipe for this model.")
    if recipes and public:
        recipes, info = [], ("Not on this public server: a recipe downloads its LoRA, and this server takes only "
                             "its own LoRAs (the LoRAs list).")
    return gr.update(choices=[NO_RECIPE] + [(r.label, r.name) for r in recipes], value="",
                     interactive=bool(recipes), info=info)
