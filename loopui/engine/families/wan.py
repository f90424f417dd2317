"""Wan 2.1 / 2.2: latents ``(B, C, T, H, W)``, flow matching, I2V condition (mask + image latents) on C.

- Rotary tables are built inside the transformer by its ``rope`` module (``WanRotaryPosEmbed``), whose theta is baked
  into non-persistent buffers at construction: NTK scaling swaps the module's buffers for tables with the temporal
  columns rebuilt, in place for one call (the module itself stays, so hooks on it -- context parallelism's split,
  offload -- keep working). A window is just a shorter clip: the module sizes its table from the hidden states.
- ``WanPipeline`` calls the transformer twice per step under CFG (conditional, then unconditional): the cycle offset
  advances per scheduler step (in the step callback), never per call. Wan 2.2 A14B has two experts, ``transformer``
  (high noise) and ``transformer_2`` (low noise); both are wrapped.
- Wan 2.2 TI2V-5B (``expand_timesteps``) passes one timestep per token: the per-token timesteps follow the clip.
  With an image it runs diffusers' ``WanImageToVideoPipeline`` over the same components: the image latent replaces
  the first latent of the cycle and its tokens are at timestep 0 -- in each rotated clip the image (and its
  timestep 0) sits wherever its latent is. There is no separate image channel.
- I2V (Wan 2.1 / 2.2 A14B): ``latent_model_input = cat([latents, mask (4 ch), condition latents (z ch)], dim=1)``;
  the image sits in the first latent of the condition, the mask marks it.
- The causal VAE (``AutoencoderKLWan``) decodes the first latent into 1 frame and every other into 4; latents are
  normalised with the VAE config's ``latents_mean`` / ``latents_std``.
- Schedulers: UniPC (the pipelines' own, flow prediction with ``flow_shift``), flow-matching Euler, or LCM (re-noising:
  distilled few-step models); any of them can run a plan's own sigma list.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from loopui.models.family_facts import WanFacts

from ..rope import DEFAULT_THETA, ntk_theta, temporal_frequencies
from .base import Family

logger = logging.getLogger(__name__)


# Where a flow-matching scheduler keeps its shift: UniPC (and diffusers' DPM solvers) ``flow_shift``,
# FlowMatchEulerDiscreteScheduler ``shift``.
SHIFT_KEYS = ("flow_shift", "shift")


def _shift_of(config: Any) -> float:
    return float(next((config[k] for k in SHIFT_KEYS if k in config), 1.0))


def scaled_wan_rope(rope: Any, rope_scale: float) -> Any:
    """A ``WanRotaryPosEmbed`` like ``rope`` whose temporal columns use the NTK-scaled base (spatial unchanged)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    scaled = WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len, theta=DEFAULT_THETA)
    theta = ntk_theta(DEFAULT_THETA, rope_scale, rope.t_dim)
    t_cos, t_sin = temporal_frequencies(rope.max_seq_len, rope.t_dim, theta, freqs_dtype=torch.float64)
    scaled.freqs_cos[:, : rope.t_dim] = t_cos
    scaled.freqs_sin[:, : rope.t_dim] = t_sin
    return scaled


class WanFamily(Family, WanFacts):
    time_dim = 2
    channel_dim = 1
    flow_matching = True
    schedulers = ("unipc", "euler", "lcm")
    context_parallel = True  # WanTransformer3DModel has a _cp_plan in diffusers 0.42
    first_latent_decodes_alone = True  # AutoencoderKLWan._decode: one latent per decoder call, the first as a chunk

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.z_dim)

    def prediction_type(self, scheduler: Any) -> str:
        return "flow_prediction"

    def build_scheduler(self, name: str, config: Any, flow_shift: Optional[float] = None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, UniPCMultistepScheduler

        shift = flow_shift if flow_shift is not None else _shift_of(config)
        if name == "unipc":
            return UniPCMultistepScheduler.from_config(config, flow_shift=float(shift), use_flow_sigmas=True,
                                                       prediction_type="flow_prediction")
        if name == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                                                   shift=float(shift))
        if name == "lcm":
            # The sampler of distilled Wan models (CausVid / Self-Forcing, lightx2v's first release): the model's clean
            # estimate, re-noised with fresh noise to the next level.
            return FlowMatchLCMScheduler(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                                         shift=float(shift))
        raise ValueError(f"scheduler must be one of {', '.join(self.schedulers)} for Wan; got {name!r}")

    def pipeline_for(self, pipe: Any, pipeline_class: str) -> Any:
        if pipeline_class != "WanImageToVideoPipeline" or type(pipe).__name__ != "WanPipeline" \
                or not pipe.config.get("expand_timesteps"):
            return super().pipeline_for(pipe, pipeline_class)
        from diffusers import WanImageToVideoPipeline

        # The stock I2V pipeline over the very same modules (no copy, no cast: ``from_pipe`` would cast every
        # component to one dtype, and Wan keeps its VAE in float32), with the T2V pipeline's config.
        view = WanImageToVideoPipeline(**pipe.components, boundary_ratio=pipe.config.get("boundary_ratio"),
                                       expand_timesteps=True)
        view.register_to_config(_name_or_path=pipe.config.get("_name_or_path", ""))
        # Model CPU offload's bookkeeping, so the call ends by offloading the shared modules as the pipeline's own
        # call would; progress-bar settings too.
        for name in ("_all_hooks", "_offload_gpu_id", "_offload_device", "_progress_bar_config"):
            if name in pipe.__dict__:
                setattr(view, name, pipe.__dict__[name])
        return view

    def reshifted_scheduler(self, scheduler: Any, flow_shift: float) -> Optional[Any]:
        config = scheduler.config
        key = next((k for k in SHIFT_KEYS if k in config), None)
        if key is None:
            logger.warning("flow_shift %s not applied: %s has no shift in its config", flow_shift,
                           type(scheduler).__name__)
            return None
        if float(config[key]) == float(flow_shift):
            return None
        return type(scheduler).from_config(config, **{key: float(flow_shift)})

    def check_request(self, request: Any, spec: Any, length: int) -> list[str]:
        if request.use_dynamic_cfg:
            raise ValueError("use_dynamic_cfg applies to CogVideoX only; Wan uses a constant guidance scale: "
                             "turn dynamic CFG off")
        return []

    def call_kwargs(self, pipe: Any, request: Any, plan: Any) -> dict:
        if getattr(pipe, "transformer_2", None) is not None and plan.guidance_scale_2 is not None:
            return {"guidance_scale_2": plan.guidance_scale_2}  # the low-noise expert's guidance (Wan 2.2 A14B)
        return {}

    def clip_kwargs(self, kwargs: dict, frames: torch.Tensor, length: int) -> dict:
        timestep = kwargs.get("timestep")
        if timestep is None or timestep.ndim != 2:
            return kwargs
        # Wan 2.2 TI2V: one timestep per token, (B, T * h * w) time-major: the clip's frames, in the clip's order.
        batch = timestep.shape[0]
        per_frame = timestep.reshape(batch, length, -1).index_select(1, frames.to(timestep.device))
        return {**kwargs, "timestep": per_frame.reshape(batch, -1)}

    @contextmanager
    def rope_scaled(self, pipe: Any, rope_scale: float) -> Iterator[None]:
        if rope_scale == 1.0:
            yield
            return
        saved = []
        try:
            for denoiser in self.denoisers(pipe):
                rope = denoiser.rope
                scaled = scaled_wan_rope(rope, rope_scale)
                saved.append((rope, rope.freqs_cos, rope.freqs_sin))
                rope.freqs_cos = scaled.freqs_cos.to(rope.freqs_cos.device, rope.freqs_cos.dtype)
                rope.freqs_sin = scaled.freqs_sin.to(rope.freqs_sin.device, rope.freqs_sin.dtype)
            yield
        finally:
            for rope, cos, sin in saved:
                rope.freqs_cos, rope.freqs_sin = cos, sin

    def pull_solver_history(self, scheduler: Any, arguments: dict, conditioning: Any) -> None:
        # UniPC keeps its clean-estimate history itself (flow prediction, predict_x0): the latest entry is the
        # previous step's.
        history = getattr(scheduler, "model_outputs", None)
        if history and history[-1] is not None:
            history[-1] = conditioning.pull_history(history[-1])

    def condition_latent_channels(self, pipe: Any) -> Optional[tuple[int, int]]:
        if type(pipe).__name__ != "WanImageToVideoPipeline" or pipe.config.get("expand_timesteps"):
            return None  # TI2V-5B: the image replaces the first latent itself; no channels are concatenated
        # The condition is cat([mask, latents]) on C; the mask has one channel per frame a latent covers.
        return int(pipe.vae_scale_factor_temporal), self.latent_channels(pipe)

    def _normalisation(self, pipe: Any, device: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.latent_channels(pipe)
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, dtype)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, z, 1, 1, 1).to(device, dtype)
        return mean, std

    @torch.no_grad()
    def encode_video(self, pipe: Any, frames: Any, height: int, width: int, device: Any,
                     dtype: torch.dtype) -> torch.Tensor:
        pixels = self._pixels(pipe, frames, height, width).to(device=device, dtype=pipe.vae.dtype)  # (1, 3, F, H, W)
        latent = pipe.vae.encode(pixels).latent_dist.mode()  # (1, z, L, h, w)
        mean, std = self._normalisation(pipe, latent.device, latent.dtype)
        # As WanImageToVideoPipeline.prepare_latents normalises its condition: (z - mean) * (1 / std).
        latent = (latent - mean) * (1.0 / std)
        return latent.to(device=device, dtype=dtype)

    def decode(self, pipe: Any, latents: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        latents = latents.to(dtype or pipe.vae.dtype)
        mean, std = self._normalisation(pipe, latents.device, latents.dtype)
        # As WanPipeline.__call__ un-normalises: latents / (1 / std) + mean.
        latents = latents / (1.0 / std) + mean
        return pipe.vae.decode(latents, return_dict=False)[0]  # (B, 3, F, H, W)
