"""``plan_loop``: every automatic value of a request resolved against a model's spec, every refusal made up front.

One loop is planned once: the page, the CLI and the API call :func:`resolve_request` (which fits the frame count and
calls :func:`plan_loop`), read and fit a clip into the plan with :meth:`LoopPlan.with_clip`, and hand the plan down
to ``generate_loop`` / ``render_loop``; only a bare library call without a plan is planned there. So all of them
agree on the automatic values (shift skip, RoPE scale, guidance, steps, negative prompt, fps, scheduler, image
mode) and refuse the same requests -- before a model is loaded. Planning needs only the ``ModelSpec`` (pure data),
not a loaded pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .request import (LoopRequest, auto_rope_scale, default_shift_skip, knob_info, latent_length,
                      nearest_frame_count)


# A clip's default starting noise: enough to let the ends meet, little enough to keep the clip's look and motion.
CLIP_INIT_STRENGTH = 0.7
# One denoising step costing this many times the model's own (its trained length at its native size) gets a warning
# before it starts: 5x the tokens is 25x the attention, minutes per step where the model's own takes seconds.
COST_WARNING_FACTOR = 25.0


@dataclass(frozen=True)
class LoopPlan:
    """One generation planned for one model: the request (its size, shift skip and RoPE scale filled in), the
    model's spec, every resolved value (what the sidecar records), the notes and warnings to show, and -- once
    :meth:`with_clip` has read it -- the clip exactly as the loop uses it."""

    request: LoopRequest
    spec: Any  # a loopui.models.ModelSpec
    height: int
    width: int
    num_latents: int
    shift_skip: int
    rope_scale: float
    guidance_scale: float
    guidance_scale_2: Optional[float]  # the low-noise expert's (two-expert models), None otherwise
    use_dynamic_cfg: bool
    fps: int
    scheduler: Optional[str]  # a family scheduler name, None = the pipeline's own
    flow_shift: Optional[float]  # flow-matching families only (1 with a sigma list: its values are final)
    init_strength: float  # 1 = pure noise; the clip's default is lower (it is the point of giving one)
    num_output_frames: int
    num_inference_steps: int = 50
    negative_prompt: str = ""  # what the pipeline gets ("" = none): the request's, else the model's standard one
    image_to_video: bool = False  # runs the model's image-to-video conditioning (its image pipeline, if optional)
    pipeline_class: str = ""  # the stock pipeline class that runs (TI2V-5B with an image: WanImageToVideoPipeline)
    image_channel: Optional[str] = None  # what the I2V conditioning carries per clip; None without I2V
    warnings: tuple[str, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)  # how the request was fitted (e.g. the frame count)
    sigmas: Optional[tuple[float, ...]] = None  # the noise level of every step (a distilled model's), None = spaced
    step_cache: str = "off"
    # The clip as the loop uses it -- (F, H, W, 3) uint8 at the loop's frame count, fps and size -- and how it was
    # fitted; None until with_clip() read it (or without a clip).
    clip: Any = field(default=None, repr=False, compare=False)
    clip_notes: tuple[str, ...] = field(default_factory=tuple)
    # The speed recipe that filled some values (its name and the knobs it filled, as the sidecar keeps it), or None.
    recipe: Optional[Mapping[str, Any]] = None
    # The request's LoRAs found, checked and hashed (loopui.models.lora.LoraFile); None until with_loras() ran (and
    # without LoRAs).
    lora_files: Optional[tuple] = field(default=None, repr=False, compare=False)
    # A server's own LoRAs (name -> file): when given, a request may name only those (public mode).
    allowed_loras: Optional[Mapping[str, str]] = field(default=None, repr=False, compare=False)

    def with_loras(self, local_files_only: bool = False, cache_dir: Optional[str] = None) -> "LoopPlan":
        """This plan with its LoRAs found (a hub source downloaded), checked against the model and hashed, so a
        bad file is refused before the model loads (``ValueError`` naming ``loras`` and the file); itself when
        already done or without LoRAs."""
        if self.lora_files is not None or not self.request.loras:
            return self
        from loopui.models.lora import resolve_loras

        files = resolve_loras(self.request.loras, self.spec, self.allowed_loras, local_files_only, cache_dir)
        return dataclasses.replace(self, lora_files=files)

    def with_recipe(self, fill: Any) -> "LoopPlan":
        """This plan recording the speed recipe ``fill`` (:func:`apply_recipe`'s) and its notes; itself for None."""
        if fill is None:
            return self
        return dataclasses.replace(self, notes=self.notes + tuple(fill.notes), recipe=fill.record())

    def with_clip(self) -> "LoopPlan":
        """This plan with the request's clip read and fitted (count, fps, size), so it is decoded once; itself
        without a clip or when already read. ``VideoInputError`` / ``ImageInputError`` (both ``ValueError``) for a
        clip the loop cannot use."""
        if self.request.video is None or self.clip is not None:
            return self
        import numpy as np

        from loopui.media import read_clip, resample_clip

        request = self.request
        if isinstance(request.video, (str, bytes)) or hasattr(request.video, "__fspath__"):
            path = request.video.decode() if isinstance(request.video, bytes) else request.video
            # Streamed: only the frames the loop uses are decoded, each fitted to the loop's size at once.
            clip, notes = read_clip(path, request.num_frames, self.fps, self.width, self.height)
        else:
            clip, notes = resample_clip(np.asarray(request.video), float(self.fps), request.num_frames, self.fps,
                                        self.width, self.height)
        if not clip_shapes_loop(request, self.num_latents, self.init_strength, self.num_inference_steps):
            notes = []  # how the clip was fitted does not matter: the plan's warning says it is not used
        return dataclasses.replace(self, clip=clip, clip_notes=tuple(notes))


def check_image_given(request: LoopRequest, spec: Any) -> None:
    """An image-to-video model animates a reference image (or a clip's first frame): refuse a request with neither."""
    if spec.image_to_video and request.image is None and request.video is None:
        raise ValueError(f"image: {spec.model_id or 'this model'} animates a reference image; add one first")


def resolve_shift_skip(request: LoopRequest, length: int) -> tuple[int, list[str]]:
    """The shift skip used, and warnings (a skip sharing a factor with L never visits some offsets)."""
    skip = default_shift_skip(length) if request.shift_skip is None else int(request.shift_skip)
    if skip < 0 or (length > 1 and skip >= length):
        raise ValueError(f"shift_skip must be in [0, {length - 1}] for a cycle of {length} latents, got {skip}")
    warnings = []
    if skip > 1 and math.gcd(skip, length) > 1:
        warnings.append(f"shift_skip {skip} shares the factor {math.gcd(skip, length)} with the cycle length "
                        f"{length}: some offsets are never visited and a seam may remain (try "
                        f"{default_shift_skip(length)})")
    return skip, warnings


def resolve_rope_scale(request: LoopRequest, spec: Any, length: int) -> float:
    """``rope_scale`` as used: explicit value, else ``L / L_trained`` for an over-long cycle in full mode, else 1."""
    if not spec.rotary:
        if request.rope_scale not in (None, 1, 1.0):
            raise ValueError(f"rope_scale must be 1 for this model ({spec.model_id or 'no rotary embeddings'}): it has "
                             f"no rotary position embeddings to rescale (got {request.rope_scale!r}); use the window "
                             f"mode for long loops")
        return 1.0
    if request.rope_scale is not None:
        return float(request.rope_scale)
    # (A learned positional table never gets here past its trained length in full mode: the family refuses that.)
    return auto_rope_scale(length, spec.trained_latent_frames, spec.rotary, request.window_mode)


def resolve_image_mode(request: LoopRequest, spec: Any) -> tuple[bool, str, Optional[str]]:
    """(runs image-to-video conditioning, the pipeline class that runs, the image channel policy or None).

    A model whose image is optional (Wan 2.2 TI2V-5B) runs its image-to-video pipeline when an image is given.
    Where the image replaces the first latent at timestep 0 (``first_latent_image``) there is no separate channel:
    the image rides with its latent around the cycle, the model's own conditioning rotated with the clip (``roll``).
    The default ``estimate`` therefore means ``roll`` there; ``image`` (the image at position 0 of every clip) cannot
    be had without dropping the leading latent's prediction, and is refused.
    """
    image_to_video = spec.image_to_video or (request.image is not None and spec.image_pipeline_class is not None)
    pipeline_class = spec.image_pipeline_class if image_to_video and not spec.image_to_video else spec.pipeline_class
    if not image_to_video:
        return False, pipeline_class, None
    if not spec.first_latent_image:
        return True, pipeline_class, request.image_channel
    if request.image_channel == "image":
        raise ValueError(f"image_channel must be estimate or roll for {spec.model_id or 'this model'}: its image is "
                         f"the first latent itself (timestep 0) and rides with it around the cycle; got 'image'")
    return True, pipeline_class, "roll"

def step_cost_factor(spec: Any, length: int, height: int, width: int, window_mode: str) -> float:
    """One denoising step's cost relative to the model's own (its trained latents at its native size): attention
    grows with the square of the tokens a transformer call sees; the window mode sees the trained length per call,
    in about twice L / L_trained overlapping windows."""
    trained = int(spec.trained_latent_frames)
    pixels = (height * width) / float(spec.native_height * spec.native_width)
    if window_mode == "window" and length > trained:
        return (pixels ** 2) * 2.0 * length / trained
    return (pixels * length / trained) ** 2


def _cost_warning(spec: Any, length: int, height: int, width: int, window_mode: str) -> list[str]:
    factor = step_cost_factor(spec, length, height, width, window_mode)
    if factor < COST_WARNING_FACTOR:
        return []
    native = (int(spec.trained_latent_frames) - 1) * int(spec.temporal_compression) + 1
    return [f"cost: one step of this loop ({length} latents at {width}x{height}) costs about {factor:,.0f}x one "
            f"step at {spec.model_id or 'the model'}'s own {native} frames at {spec.native_width}x"
            f"{spec.native_height} (attention grows with the square of the tokens): expect each step to take about "
            f"that many times as long, with far more memory; fewer frames or a smaller size cost far less"]


def clip_shapes_loop(request: LoopRequest, length: int, init_strength: float, steps: int) -> bool:
    """Whether a request's clip can change its loop: some denoising steps are skipped (the loop starts from the
    noised clip) or some latents are held to it (``loop_region`` below 1). False without a clip."""
    from .conditioning import wrap_hold

    if request.video is None:
        return False
    skipped = math.floor((1.0 - init_strength) * steps + 1e-9)
    return skipped >= 1 or bool(wrap_hold(length, float(request.loop_region)).any())


def _clip_warning(request: LoopRequest, spec: Any, length: int, init_strength: float, steps: int) -> list[str]:
    """A clip that cannot shape the loop: no step is skipped (init strength) and nothing is held (loop region)."""
    if request.video is None or clip_shapes_loop(request, length, init_strength, steps):
        return []
    if init_strength < 1:
        least = math.ceil(1.0 / (1.0 - init_strength) - 1e-9)
        reason = f"init_strength {init_strength:g} at {steps} step{'s' if steps != 1 else ''} skips no denoising step"
        fix = f"use at least {least} steps, a lower init_strength or a loop_region below 1"
    else:
        reason = "init_strength 1 starts from pure noise"
        fix = "use an init_strength below 1 or a loop_region below 1"
    first = (" (only its first frame is used, as the image)" if spec.image_to_video and request.image is None
             else "")
    return [f"video: {reason} and loop_region {float(request.loop_region):g} holds nothing to it, so the clip does "
            f"not shape this loop{first}; {fix}"]


def check_loras(request: LoopRequest, spec: Any, allowed_loras: Optional[Mapping[str, str]] = None) -> None:
    """The LoRA checks that need no download and no weights (``loopui.models.lora.check_lora_ref``): a listed
    server LoRA when ``allowed_loras`` is given (public mode), a local file that exists and ends in
    ``.safetensors``, an expert choice only on a two-expert model. ``ValueError`` naming ``loras`` and the file."""
    from loopui.models.lora import check_lora_ref

    for lora in request.loras:
        check_lora_ref(lora, spec, allowed_loras)


def plan_loop(request: LoopRequest, spec: Any, allowed_loras: Optional[Mapping[str, str]] = None) -> LoopPlan:
    """Resolve ``request`` against ``spec`` (a ``loopui.models.ModelSpec``); ``ValueError`` names what is wrong.

    ``allowed_loras`` (name -> file) limits the request's LoRAs to a server's own (public mode)."""
    from .decode import decoded_frame_count
    from .families import FAMILIES

    request.validate()
    family = FAMILIES[spec.family]
    name = spec.model_id or "this model"
    height = request.height or spec.native_height
    width = request.width or spec.native_width
    for label, value in (("height", height), ("width", width)):
        if value % spec.size_multiple:
            raise ValueError(f"{label} must be a multiple of {spec.size_multiple} for {name}, got {value}")
    check_image_given(request, spec)
    length = latent_length(request.num_frames, spec.temporal_compression)
    skip, warnings = resolve_shift_skip(request, length)
    warnings += family.check_request(request, spec, length)
    if request.attention not in ("auto", "native") and not family.attention_kernels:
        raise ValueError(f"attention {request.attention!r} does not apply to {name}: its attention in diffusers runs "
                         f"PyTorch's own kernel only; use auto or native")
    rope_scale = resolve_rope_scale(request, spec, length)
    scheduler = request.scheduler or spec.scheduler
    if scheduler is not None and scheduler not in family.schedulers:
        raise ValueError(f"scheduler must be one of {', '.join(family.schedulers)} for {name} ({family.name}); "
                         f"got {scheduler!r}")
    flow_shift = None
    sigmas = None
    if request.sigmas is not None:
        if not family.flow_matching:
            raise ValueError(f"sigmas apply to flow-matching models (Wan) only; {name} uses "
                             f"{'/'.join(family.schedulers)} timesteps: leave sigmas empty")
        if request.flow_shift is not None:
            raise ValueError("flow_shift does not apply with sigmas: the sigmas are the final noise levels (shift "
                             "them yourself, or leave flow_shift empty)")
        sigmas = tuple(float(v) for v in request.sigmas)
        flow_shift = 1.0
    elif family.flow_matching:
        flow_shift = request.flow_shift
        if flow_shift is None:
            small = height * width <= 480 * 832  # the shift is tuned per resolution (Wan: 3 at 480p, 5 at 720p)
            flow_shift = spec.flow_shift_480p if small and spec.flow_shift_480p is not None else spec.flow_shift
    guidance = float(spec.guidance_scale if request.guidance_scale is None else request.guidance_scale)
    guidance_2 = None
    if spec.experts > 1:
        guidance_2 = float(request.guidance_scale if request.guidance_scale is not None
                           else spec.guidance_scale_2 if spec.guidance_scale_2 is not None else guidance)
    dynamic = spec.use_dynamic_cfg if request.use_dynamic_cfg is None else bool(request.use_dynamic_cfg)
    image_to_video, pipeline_class, image_channel = resolve_image_mode(request, spec)
    # Steps left empty: a sigma list's length, else the model's own.
    steps = int(request.num_inference_steps or (len(sigmas) if sigmas else spec.num_inference_steps))
    check_loras(request, spec, allowed_loras)
    init_strength = float(request.init_strength if request.init_strength is not None
                          else CLIP_INIT_STRENGTH if request.video is not None else 1.0)
    warnings += _clip_warning(request, spec, length, init_strength, steps)
    warnings += _cost_warning(spec, length, height, width, request.window_mode)
    return LoopPlan(
        request=dataclasses.replace(request, shift_skip=skip, rope_scale=rope_scale, height=height, width=width,
                                    num_inference_steps=steps),
        spec=spec, height=height, width=width, num_latents=length, shift_skip=skip, rope_scale=rope_scale,
        guidance_scale=guidance, guidance_scale_2=guidance_2,
        use_dynamic_cfg=dynamic and family.name == "cogvideox",
        fps=int(request.fps or spec.native_fps), scheduler=scheduler, flow_shift=flow_shift,
        init_strength=init_strength,
        num_output_frames=decoded_frame_count(length, spec.temporal_compression, request.frame_invariant_decoding),
        num_inference_steps=steps, negative_prompt=request.negative_prompt or spec.negative_prompt,
        image_to_video=image_to_video, pipeline_class=pipeline_class, image_channel=image_channel,
        warnings=tuple(warnings), sigmas=sigmas, step_cache=request.step_cache, allowed_loras=allowed_loras,
    )


def apply_recipe(values: Mapping[str, Any], spec: Any, recipe: Any = None) -> tuple[dict, Any]:
    """``(values, fill)``: loose request ``values`` with the speed recipe named ``recipe`` (None or "" = none) filled
    in where they were left out -- what the caller gave wins (``loopui.models.recipes.fill_recipe``) -- and what it
    filled (None without a recipe); hand ``fill`` to :meth:`LoopPlan.with_recipe` once planned. ``ValueError``
    naming ``recipe`` for an unknown name or one that is not for this model."""
    name = "" if recipe is None else str(recipe).strip()
    if not name or name.lower() == "none":
        return dict(values), None
    from loopui.models.recipes import fill_recipe

    fill = fill_recipe(values, spec, name)
    return dict(fill.values), fill


def resolve_request(request: LoopRequest, spec: Any, allowed_loras: Optional[Mapping[str, str]] = None) -> LoopPlan:
    """Plan ``request`` for the model ``spec`` as the page, the API and the CLI do -- the one function the three
    call, so all of them compute the same loop.

    On top of :func:`plan_loop`: the prompt must not be empty, the mask model must exist, and a frame count not of
    the form k·n + 1 is moved to the nearest one with a note. ``allowed_loras`` (name -> file): a server's own
    LoRAs, the only ones a request may name (public mode). Raises ``ValueError`` naming the parameter.
    """
    request.validate()
    if not request.prompt.strip():
        raise ValueError("prompt is empty: describe what the loop should show")
    from loopui.saliency import mask_model_info

    try:
        mask_model_info(request.mask_model)
    except ValueError as exc:
        raise ValueError(f"mask_model: {exc}") from None
    notes = []
    compression = int(spec.temporal_compression)
    frames = nearest_frame_count(request.num_frames, compression)
    if frames > knob_info("num_frames")["max"]:
        frames -= compression
    if frames != request.num_frames:
        notes.append(f"num_frames {request.num_frames} is not of the form {compression}n+1: using {frames}")
    plan = plan_loop(dataclasses.replace(request, num_frames=frames), spec, allowed_loras)
    plan.request.validate()
    return dataclasses.replace(plan, notes=tuple(notes))
