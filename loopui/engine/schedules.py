"""Noise schedules a plan can carry: a distilled model's own sigma list, and the fresh noise a re-noising sampler draws.

A distilled few-step Wan (lightx2v, CausVid, Wan 2.2 Lightning) is sampled at the noise levels it was distilled at,
not at a scheduler's even spacing: the plan carries them as ``sigmas`` and the scheduler is told them where the
pipeline sets its timesteps (``set_timesteps`` -- the pipeline's ``__call__`` is not touched). A re-noising sampler
(``FlowMatchLCMScheduler``) draws fresh noise at every step; the stock Wan pipeline calls ``step`` without a
generator (the global random state), so the loop hands it the call's own generator and a seed reproduces the loop.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from .families.base import patch_attribute


def distilled_sigmas(num_steps: int, shift: float = 5.0) -> tuple[float, ...]:
    """The sigmas of a step-distilled flow model: timesteps ``1000 * (1 - j / num_steps)`` shifted by ``shift``.

    lightx2v's 4-step Wan 2.1 (``denoising_step_list`` 1000, 750, 500, 250 at ``sample_shift`` 5, its
    ``WanStepDistillScheduler``) gives 1, 0.9375, 0.8333, 0.625.
    """
    from loopui.models.recipes import shifted_sigmas  # the recipes' rule, the one definition

    return shifted_sigmas(num_steps, shift)


@contextmanager
def scheduled(scheduler: Any, sigmas: Optional[Sequence[float]], generator: Optional[torch.Generator]
              ) -> Iterator[None]:
    """For one pipeline call: ``scheduler`` sets ``sigmas`` (when given) instead of its own spacing, and a ``step``
    that can draw noise draws it from ``generator`` unless the pipeline passes one itself."""
    with ExitStack() as stack:
        if sigmas is not None:
            original_set = scheduler.set_timesteps
            values = [float(v) for v in sigmas]

            def set_timesteps(num_inference_steps: Optional[int] = None, device: Any = None, **kwargs):
                if num_inference_steps is not None and num_inference_steps != len(values):
                    raise ValueError(f"sigmas has {len(values)} values for {num_inference_steps} steps")
                # An array: UniPC shifts the given sigmas arithmetically (a list raises there).
                return original_set(device=device, sigmas=np.array(values, dtype=np.float64), **kwargs)

            stack.enter_context(patch_attribute(scheduler, "set_timesteps", set_timesteps))
        original_step = scheduler.step
        signature = inspect.signature(original_step)
        if generator is not None and "generator" in signature.parameters:
            @functools.wraps(original_step)  # keeps the signature for other observers of step
            def step(*args, **kwargs):
                bound = signature.bind(*args, **kwargs)
                if bound.arguments.get("generator") is None:
                    bound.arguments["generator"] = generator
                return original_step(*bound.args, **bound.kwargs)

            stack.enter_context(patch_attribute(scheduler, "step", step))
        yield
