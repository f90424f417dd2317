"""The interface between the sampler and one model family (CogVideoX, Wan, ...).

The sampler in ``loopui.engine.loop`` is the same numbered steps for every family; what differs lives behind this
class, one small module per family (the way rembg has one session class per model): which axis of the latents is
time, how the pipeline is called, where I2V conditioning sits, how rotary tables are NTK-scaled, how the VAE encodes
a reference image and decodes a cycle, and which schedulers fit. Nothing outside a family module knows a layout.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from loopui.models.family_facts import FamilyFacts

from ..noise import NoiseLevel, level_at


class Family(FamilyFacts):
    """A model family's answers to the sampler's questions; subclasses fill in the layout-specific parts.

    Its static facts (name, pipelines, what its configs say) come from the family's class in
    ``loopui.models.family_facts``, which each family subclasses too: the registry reads them there.
    """

    time_dim: int = 1  # axis of time in the latents the pipeline (and its transformer) use
    channel_dim: int = 2  # axis on which I2V conditioning is concatenated to the noisy latents
    flow_matching: bool = False  # schedulers write x = (1 - sigma) x0 + sigma noise and predict a velocity
    schedulers: tuple[str, ...] = ()  # names accepted by request.scheduler
    # Latents decoded again after the cycle's end as its context (frame-invariant decoding). On the faithful VAEs
    # (random weights) no c <= 3 is invariant within a pixel tolerance, so nothing supports fewer than 2
    # (docs/vae_decode.md).
    decode_context: int = 2
    # The VAE decodes the first latent of a stream with nothing before it, exactly as that latent alone (a causal
    # decoder fed one latent at a time); false where latents are normalised in batches (CogVideoX).
    first_latent_decodes_alone: bool = False
    context_parallel: bool = False  # the diffusers transformer ships a context-parallel plan (one loop, N GPUs)

    # -- identity ---------------------------------------------------------------------------------------------
    def matches(self, pipe: Any) -> bool:
        return type(pipe).__name__ in self.pipelines

    def pipeline_for(self, pipe: Any, pipeline_class: str) -> Any:
        """The pipeline that runs a request planned for ``pipeline_class``: ``pipe`` itself, unless the model has a
        mode served by another stock pipeline over the same components (Wan 2.2 TI2V-5B with an image)."""
        if not pipeline_class or type(pipe).__name__ == pipeline_class:
            return pipe
        raise ValueError(f"{type(pipe).__name__} cannot run as {pipeline_class}")

    # -- denoisers --------------------------------------------------------------------------------------------
    def denoisers(self, pipe: Any) -> list[torch.nn.Module]:
        """The transformer(s) whose ``forward`` the cycle wrapper replaces for one call (both Wan 2.2 experts)."""
        found = [getattr(pipe, name, None) for name in ("transformer", "transformer_2")]
        return [module for module in found if module is not None]

    def transformer_dtype(self, pipe: Any) -> torch.dtype:
        return self.denoisers(pipe)[0].dtype

    # -- latents ----------------------------------------------------------------------------------------------
    def latent_channels(self, pipe: Any) -> int:
        raise NotImplementedError

    def time_first(self, latents: torch.Tensor) -> torch.Tensor:
        """One video's latents with time as the leading axis ``(T, ...)`` (for metrics)."""
        return latents[0].movedim(self.time_dim - 1, 0)

    # -- scheduler --------------------------------------------------------------------------------------------
    def build_scheduler(self, name: str, config: Any, flow_shift: Optional[float] = None) -> Any:
        raise NotImplementedError

    def reshifted_scheduler(self, scheduler: Any, flow_shift: float) -> Optional[Any]:
        """``scheduler``'s class re-made with ``flow_shift``, or None when it already samples at that shift (or has
        no shift: families without flow matching)."""
        return None

    def prediction_type(self, scheduler: Any) -> str:
        return str(scheduler.config.get("prediction_type", "epsilon"))

    def level(self, scheduler: Any, index: int) -> NoiseLevel:
        """Noise level of step ``index`` (the number of completed steps) of ``scheduler``'s schedule."""
        return level_at(scheduler, index, flow=self.flow_matching)

    # -- the pipeline call ------------------------------------------------------------------------------------
    def check_request(self, request: Any, spec: Any, length: int) -> list[str]:
        """Raise ``ValueError`` for a knob that cannot apply to this family; return warnings."""
        return []

    def call_kwargs(self, pipe: Any, request: Any, plan: Any) -> dict:
        """Family-specific keyword arguments of the pipeline call (besides prompt, size, steps, latents...)."""
        return {}

    # -- what the transformer sees ----------------------------------------------------------------------------
    def clip_kwargs(self, kwargs: dict, frames: torch.Tensor, length: int) -> dict:
        """The transformer's keyword arguments for a clip made of cycle ``frames`` (rotated and/or windowed):
        per-frame inputs other than the hidden states (rotary rows, per-token timesteps) follow the clip."""
        return kwargs

    @contextmanager
    def rope_scaled(self, pipe: Any, rope_scale: float) -> Iterator[None]:
        """NTK-scale the temporal rotary base for the duration of a call (``rope_scale == 1``: stock tables)."""
        yield

    # -- image conditioning -----------------------------------------------------------------------------------
    def condition_latent_channels(self, pipe: Any) -> Optional[tuple[int, int]]:
        """(start, count) of the latent image inside the I2V conditioning channels (None for T2V)."""
        return None

    def encode_video(self, pipe: Any, frames: Any, height: int, width: int, device: Any,
                     dtype: torch.dtype) -> torch.Tensor:
        """Frames (a list of PIL images or HxWx3 arrays, 1 + r·(L - 1) of them) encoded by the causal VAE into L
        latents in this family's layout and scale (the distribution's mode)."""
        raise NotImplementedError

    def encode_image(self, pipe: Any, image: Any, height: int, width: int, device: Any,
                     dtype: torch.dtype) -> torch.Tensor:
        """A reference image encoded like a first frame, as a one-frame latent in this family's layout."""
        return self.encode_video(pipe, [image], height, width, device, dtype)

    @staticmethod
    def _pixels(pipe: Any, frames: Any, height: int, width: int) -> torch.Tensor:
        """``(1, 3, F, H, W)`` in [-1, 1], each frame through the pipeline's own preprocessing."""
        return torch.stack([pipe.video_processor.preprocess(frame, height=height, width=width)[0] for frame in frames],
                           dim=1)[None]

    def pull_solver_history(self, scheduler: Any, arguments: dict, conditioning: Any) -> None:
        """Pull a multistep solver's stored clean estimate as the image controls pulled the latents (so the solver's
        next update does not mix edited latents with an unedited history). ``arguments`` are the ``step`` call's."""

    # -- decoding ---------------------------------------------------------------------------------------------
    def decode(self, pipe: Any, latents: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The pipeline's own decoding of latents (cast to ``dtype``, the VAE's own by default) to a video
        ``(B, C, F, H, W)`` in [-1, 1]."""
        raise NotImplementedError


def patch_attribute(obj: Any, name: str, value: Any) -> "contextmanager":
    """Set an instance attribute for the duration of a block, then restore exactly what was there."""

    @contextmanager
    def patched() -> Iterator[None]:
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

    return patched()

