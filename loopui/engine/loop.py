"""``generate_loop``: a stock diffusers CogVideoX pipeline, turned into a seamless-loop sampler.

Nothing of the pipeline's ``__call__`` is copied. For one call, three extension points are used:
the transformer's ``forward`` (rotate in / rotate back, windows, seam polish, init-strength oracle), the pipeline's
``_prepare_rotary_positional_embeddings`` (NTK scaling of time) and ``callback_on_step_end`` (step counter, image
pulls, progress, cooperative cancel). All three are restored afterwards, so a cached pipeline stays stock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from .conditioning import ImageConditioning, encode_reference, mask_to_latent_grid
from .decode import decode_cycle, decoded_frame_count, video_to_uint8
from .guards import cancel_checkpoint, ensure_finite, vae_memory_defaults
from .locks import holds_pipeline_lock
from .rope import scaled_rope_preparer
from .schedulers import build_scheduler
from .settings import LoopRequest, default_shift_skip
from .polish import SEAM_POLISH_PRESETS
from .shift import CycleDenoiser, ShiftSchedule, StepState

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]

class LoopInterrupted(RuntimeError):
    """Raised when a generation was stopped through its ``cancel_event``."""


@dataclass
class LoopResult:
    """What one loop generation produced."""

    frames: Optional[np.ndarray]  # (F, H, W, 3) uint8, None for output_type="latent"
    latents: torch.Tensor  # (B, T, C, h, w) float32 on CPU, final latents before decoding (CogVideoX layout)
    seam_ratio: Optional[float]
    interior_ratio: Optional[float]
    worst_step: Optional[tuple[int, int]]
    settings: dict
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    latent_seam_ratio: Optional[float] = None
    latent_interior_ratio: Optional[float] = None

    def describe_worst_step(self) -> str:
        if self.worst_step is None:
            return ""
        return f"largest jump between frames {self.worst_step[0]} and {self.worst_step[1]}"


@dataclass(frozen=True)
class PipelineInfo:
    """What the sampler needs to know about a model (read from its registry spec / transformer config)."""

    image_to_video: bool
    rotary: bool
    trained_latent_frames: int
    temporal_compression: int
    native_height: int
    native_width: int
    prediction_type: str = "v_prediction"
    model_id: str = ""

    @classmethod
    def from_spec(cls, spec, prediction_type: str = "v_prediction") -> "PipelineInfo":
        """From a ``loopui.models.ModelSpec`` (the one source of model facts)."""
        return cls(image_to_video=spec.image_to_video, rotary=spec.rotary,
                   trained_latent_frames=spec.trained_latent_frames, temporal_compression=spec.temporal_compression,
                   native_height=spec.native_height, native_width=spec.native_width,
                   prediction_type=prediction_type, model_id=spec.model_id)


def pipeline_info(pipe) -> PipelineInfo:
    """Trained latent length, rotary use, I2V-ness and native size of a built CogVideoX pipeline."""
    from loopui.models.registry import spec_for_pipeline

    spec = spec_for_pipeline(pipe)  # raises ValueError for unsupported pipelines (e.g. CogVideoX 1.5)
    return PipelineInfo.from_spec(spec, prediction_type=str(pipe.scheduler.config.get("prediction_type", "epsilon")))


def resolve_rope_scale(request: LoopRequest, info: PipelineInfo, length: int) -> float:
    """``rope_scale`` as used: explicit value, else ``L / L_trained`` for an over-long cycle in full mode, else 1."""
    if not info.rotary:
        if request.rope_scale not in (None, 1, 1.0):
            raise ValueError(f"rope_scale={request.rope_scale!r} needs a model with rotary position embeddings; "
                             "this one has none (CogVideoX-2b): use rope_scale 1 or the window mode")
        return 1.0
    if request.rope_scale is not None:
        return float(request.rope_scale)
    if request.window_mode == "full" and length > info.trained_latent_frames:
        return length / info.trained_latent_frames
    return 1.0


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


@contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set an instance attribute for the duration of a block, then restore exactly what was there."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        # Restore only what is still ours: offload hooks re-installed meanwhile (diffusers does so at the end of
        # every offloaded call) own the attribute now, and putting the old hook's forward back would be stale.
        if obj.__dict__.get(name) is value:
            if had:
                setattr(obj, name, previous)
            else:
                delattr(obj, name)


@contextmanager
def _scheduler_swapped(pipe, scheduler) -> Iterator[None]:
    if scheduler is None:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


def _prepare_image_conditioning(pipe, request: LoopRequest, info: PipelineInfo, height: int, width: int,
                                num_steps: int, device, dtype):
    """Load the reference image and motion mask; return (PIL image, ImageConditioning or None)."""
    if request.image is None:
        if info.image_to_video:
            raise ValueError("this model animates a reference image: pass an image")
        return None, None
    from loopui.media import load_reference_image

    image = load_reference_image(request.image, width, height)
    wants = request.anchor_strength > 0 or request.init_strength < 1 or request.background_freeze > 0
    if not wants:
        return image, None
    latent_h, latent_w = height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial
    motion = None
    if request.background_freeze > 0 and request.motion_region != "everything":
        mask = _motion_mask(image, request)
        motion = mask_to_latent_grid(mask, latent_h, latent_w, device=device, dtype=dtype)
    reference = encode_reference(pipe, image, height, width, device, dtype)
    gen = torch.Generator("cpu").manual_seed((request.seed + 0x5EED) % 2**63)
    noise = torch.randn(reference.shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return image, ImageConditioning(
        reference=reference, noise=noise, motion_mask=motion, anchor_strength=float(request.anchor_strength),
        init_strength=float(request.init_strength), background_freeze=float(request.background_freeze),
        num_steps=num_steps, prediction_type=info.prediction_type)


def _motion_mask(image, request: LoopRequest) -> np.ndarray:
    """The user's mask when given, else the saliency model's; inverted for motion_region='background'."""
    from loopui import saliency
    from loopui.media import load_mask_image

    invert = request.motion_region == "background"
    # A user mask gets the same cover-and-centre-crop as the reference image, so the two stay aligned.
    user_mask = None if request.mask is None else load_mask_image(request.mask, image.width, image.height)
    try:
        result = saliency.resolve_mask(
            np.asarray(image), user_mask=user_mask, model_name=request.mask_model,
            threshold=request.mask_threshold, grow=request.mask_grow, feather=request.mask_feather, invert=invert)
    except saliency.SaliencyUnavailable as exc:
        raise ValueError(f"background freeze needs a motion mask: {exc} (or pass a mask image)") from exc
    return np.asarray(result.mask, dtype=np.float32)


@holds_pipeline_lock
def generate_loop(pipe, request: LoopRequest, output_type: str = "np", callback: Optional[ProgressCallback] = None,
                  cancel_event: Optional[threading.Event] = None) -> LoopResult:
    """Generate a seamless loop with ``pipe`` (a built ``CogVideoXPipeline`` / ``CogVideoXImageToVideoPipeline``).

    ``callback(stage, step, total)`` reports "encode", "denoise" (after each step) and "decode"; setting
    ``cancel_event`` stops the denoising loop within one step (decoding between two decoder calls) and raises
    :class:`LoopInterrupted`. One call at a time per pipeline: a second call on the same pipeline (or on one sharing
    its components) waits for the first. NaN/Inf output raises ``NonFiniteOutput`` instead of a black video.
    The pipeline's own scheduler is used unless ``request.scheduler`` names one. With ``shift_skip=0`` and the
    defaults otherwise this is exactly the stock pipeline's sampling.
    """
    # 1. Check inputs
    if output_type not in ("np", "latent"):
        raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
    request.validate()
    if not request.prompt.strip():
        raise ValueError("prompt is empty: describe what the loop should show")
    info = pipeline_info(pipe)
    height = request.height or info.native_height
    width = request.width or info.native_width
    length = (request.num_frames - 1) // info.temporal_compression + 1
    skip, warnings = resolve_shift_skip(request, length)
    rope_scale = resolve_rope_scale(request, info, length)
    if request.window_mode == "window" and length > info.trained_latent_frames and not info.rotary:
        logger.info("window mode on a model without rotary embeddings: windows use its learned positions")
    for message in warnings:
        logger.warning(message)
    steps = request.num_inference_steps
    t_start = time.perf_counter()
    if callback:
        callback("encode", 0, steps)

    # 2. Scheduler, device and the pipeline's own noise (drawn exactly as prepare_latents draws it)
    scheduler = build_scheduler(request.scheduler, pipe.scheduler.config) if request.scheduler else None
    device = pipe._execution_device
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    schedule = ShiftSchedule(length=length, skip=skip, num_steps=steps, start=request.shift_start,
                             end=request.shift_end, polish=SEAM_POLISH_PRESETS[request.seam_polish])
    state = StepState()

    with _scheduler_swapped(pipe, scheduler):
        sched = pipe.scheduler
        dtype = pipe.transformer.dtype
        # 3. Reference image (encode + mask) when given
        image, conditioning = _prepare_image_conditioning(pipe, request, info, height, width, steps, device, dtype)
        latents, override = None, None
        if conditioning is not None and conditioning.init_steps > 0:
            from diffusers.utils.torch_utils import randn_tensor

            # Drawn exactly as prepare_latents would draw it (same generator, shape, device), then noised onto the
            # reference; the generator moves on just as in a plain run.

            shape = (1, length, pipe.vae.config.latent_channels, height // pipe.vae_scale_factor_spatial,
                     width // pipe.vae_scale_factor_spatial)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            sched.set_timesteps(steps, device=device)
            latents = conditioning.initial_latents(sched, noise, sched.timesteps[0])
            # prepare_latents multiplies given latents by init_noise_sigma (1 for CogVideoX schedulers).
            latents = latents / sched.init_noise_sigma
            override = lambda step, hs, t: conditioning.override_prediction(sched, step, hs, t)  # noqa: E731

        # 4. Hooks: transformer forward, rotary tables, step callback
        window = info.trained_latent_frames if request.window_mode == "window" else None
        denoiser = CycleDenoiser(pipe.transformer.forward, schedule, state, time_dim=1, window=window,
                                 override=override)

        def on_step_end(pipeline, i: int, t, kwargs: dict) -> dict:
            out = {}
            if conditioning is not None:
                out["latents"] = conditioning.after_step(sched, i, kwargs["latents"], sched.timesteps)
            state.step = i + 1  # the offset advances after each scheduler step
            if callback:
                callback("denoise", i + 1, steps)
            if cancel_event is not None and cancel_event.is_set() and i + 1 < steps:
                pipeline._interrupt = True  # the pipeline skips the remaining steps
            return out

        call_kwargs = dict(
            prompt=request.prompt, negative_prompt=request.negative_prompt or None, height=height, width=width,
            num_frames=request.num_frames, num_inference_steps=steps, guidance_scale=request.guidance_scale,
            use_dynamic_cfg=request.use_dynamic_cfg, generator=generator, latents=latents, output_type="latent",
            callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
        )
        if info.image_to_video:
            call_kwargs["image"] = image
        rope_patch = (_patched(pipe, "_prepare_rotary_positional_embeddings", scaled_rope_preparer(pipe, rope_scale))
                      if info.rotary else nullcontext())
        with torch.no_grad(), _patched(pipe.transformer, "forward", denoiser), rope_patch:
            final = pipe(**call_kwargs).frames  # (B, T, C, h, w)
    t_denoise = time.perf_counter()
    if state.step < steps:  # only an interrupt leaves steps undone
        raise LoopInterrupted(f"stopped after {state.step} of {steps} steps")
    ensure_finite(final, "final latents", dtype)

    # 5. Decode (frame-invariant by default)
    frames = None
    if output_type == "np":
        if callback:
            callback("decode", 0, 1)
        stop = lambda: LoopInterrupted("stopped while decoding")  # noqa: E731
        with torch.no_grad(), vae_memory_defaults(pipe), \
                cancel_checkpoint(getattr(pipe.vae, "decoder", pipe.vae), cancel_event, stop):
            video = decode_cycle(pipe, final.to(pipe.vae.dtype), frame_invariant=request.frame_invariant_decoding)
        ensure_finite(video, "decoded frames", pipe.vae.dtype)
        frames = video_to_uint8(pipe, video)
        if callback:
            callback("decode", 1, 1)
    t_decode = time.perf_counter()

    # 6. Metrics and settings
    from loopui.media import loop_metrics

    latents_cpu = final.detach().float().cpu()
    latent_metrics = loop_metrics(latents_cpu[0]) if length > 2 else None
    pixel_metrics = loop_metrics(frames) if frames is not None and len(frames) > 2 else None
    metrics = pixel_metrics or latent_metrics
    settings = request.to_dict()
    settings.update(
        shift_skip=skip, rope_scale=rope_scale, height=height, width=width, num_latent_frames=length,
        trained_latent_frames=info.trained_latent_frames,
        num_output_frames=decoded_frame_count(length, info.temporal_compression, request.frame_invariant_decoding),
        scheduler_class=type(pipe.scheduler if scheduler is None else scheduler).__name__,
        scheduler=request.scheduler, model=info.model_id, pipeline=type(pipe).__name__,
        model_calls=denoiser.model_calls,
    )
    return LoopResult(
        frames=frames,
        latents=latents_cpu,
        seam_ratio=None if metrics is None else float(metrics.seam_ratio),
        interior_ratio=None if metrics is None else float(metrics.interior_ratio),
        worst_step=None if metrics is None else tuple(int(v) for v in metrics.worst_interior_step),
        settings=settings,
        timings={"denoise": t_denoise - t_start, "decode": t_decode - t_denoise, "total": t_decode - t_start},
        warnings=warnings,
        latent_seam_ratio=None if latent_metrics is None else float(latent_metrics.seam_ratio),
        latent_interior_ratio=None if latent_metrics is None else float(latent_metrics.interior_ratio),
    )
