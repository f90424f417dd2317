"""Named samplers: the CogVideoX DDIM and DPM schedulers with trailing timesteps, built from the model's config."""

from __future__ import annotations


def build_scheduler(name: str, config):
    """``"ddim"`` -> CogVideoXDDIMScheduler, ``"dpm"`` -> CogVideoXDPMScheduler, from ``config`` with trailing spacing."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    classes = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
    if name not in classes:
        raise ValueError(f"scheduler must be one of {', '.join(classes)}; got {name!r}")
    return classes[name].from_config(config, timestep_spacing="trailing")
