"""What each model family's configs say about a model: one small class per family, pure data (no torch).

The one home of a family's static facts: which diffusers pipelines belong to it (and which take an image), how to
read its VAE's compressions and its transformer's trained length, size grid and positional embeddings from the
configs. The registry asks these classes when it reads a folder or a built pipeline; the engine's families
(``loopui.engine.families``) subclass them, so the sampler's family object answers the same questions. They live
here, in the models room, because the arrows point one way (engine -> models): the registry must stay importable
without the engine (and without torch).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional


class FamilyFacts:
    """A family's static facts; subclasses fill them in."""

    name: str = ""
    # diffusers pipeline class name -> whether it takes a conditioning image
    pipelines: Mapping[str, bool] = {}
    # The transformer config records the size and clip length the model was trained at (CogVideoX's sample_*);
    # where it does not (Wan), a known model keeps its model card's values.
    config_states_training_shape: bool = True
    # Guidance for a model of this family that the registry does not know.
    default_guidance_scale: float = 6.0
    # The image-to-video pipeline a text-to-video pipeline of this family becomes when its config expands timesteps
    # per token (Wan 2.2 TI2V: the image is the first latent, at timestep 0); None where the family has none.
    expanded_timesteps_image_pipeline: Optional[str] = None
    # Whether the transformer's attention goes through diffusers' attention dispatcher, so that an attention kernel
    # (flash, sage, ...) can be chosen; CogVideoX's processor in diffusers 0.42.1 calls PyTorch's SDPA itself.
    attention_kernels: bool = True
    # The torch dtype the VAE decodes in on an accelerator when it is loaded wider (float32). bf16 vs fp32 on the
    # faithful VAEs (random weights, docs/vae_decode.md), max / mean levels, PSNR: Wan 2.1 12.0 / 1.06, 45.4 dB;
    # Wan 2.2 TI2V 3.2 / 0.46, 52.7 dB; CogVideoX-2b 3.2 / 0.16, 61.0 dB; tiled alike.
    vae_decode_dtype: str = "bfloat16"

    def vae_compression(self, vae_config: Mapping[str, Any]) -> tuple[Optional[int], Optional[int]]:
        """(spatial, temporal) compression of a VAE config, None where the config does not say."""
        raise NotImplementedError

    def facts_from_config(self, transformer_config: Mapping[str, Any], spatial: Optional[int],
                          temporal: Optional[int], model_id: str) -> dict[str, Any]:
        """``ModelSpec`` fields read from a transformer config, given the VAE's compressions (None = not known).

        Raises ``ValueError`` naming ``model_id`` for a variant of the family loopui cannot drive.
        """
        raise NotImplementedError


class CogVideoXFacts(FamilyFacts):
    """CogVideoX 2b / 5b / 5b-I2V: the transformer config states its sample size and frames."""

    name = "cogvideox"
    pipelines = {"CogVideoXPipeline": False, "CogVideoXImageToVideoPipeline": True}
    config_states_training_shape = True
    default_guidance_scale = 6.0
    attention_kernels = False
    # CogVideoX's VAE: 8x spatial, 4x temporal compression (block_out_channels has 4 entries -> 2**3).
    default_spatial_compression = 8

    def vae_compression(self, vae_config: Mapping[str, Any]) -> tuple[Optional[int], Optional[int]]:
        blocks = vae_config.get("block_out_channels")
        spatial = 2 ** (len(blocks) - 1) if blocks else None
        temporal = vae_config.get("temporal_compression_ratio")
        return spatial, (int(temporal) if temporal else None)

    def facts_from_config(self, transformer_config: Mapping[str, Any], spatial: Optional[int],
                          temporal: Optional[int], model_id: str) -> dict[str, Any]:
        cfg = transformer_config
        if cfg.get("patch_size_t") is not None:
            raise ValueError(f"{model_id!r} uses temporal patching (patch_size_t={cfg.get('patch_size_t')!r}, "
                             "CogVideoX 1.5), which loopui does not support yet; use CogVideoX-5b, -2b or -5b-I2V")
        # The trained length counts in the transformer's own compression; a VAE's stated one wins for the spec.
        config_temporal = int(cfg.get("temporal_compression_ratio", 4))
        sample_frames = int(cfg.get("sample_frames", 49))
        spatial = spatial or self.default_spatial_compression
        patch = int(cfg.get("patch_size", 2))
        learned = bool(cfg.get("use_learned_positional_embeddings", False))
        return dict(
            trained_latent_frames=(sample_frames - 1) // config_temporal + 1,
            rotary=bool(cfg.get("use_rotary_positional_embeddings", False)),
            learned_positions=learned,
            fixed_size=learned,  # diffusers refuses any other size for a learned positional table
            native_height=int(cfg.get("sample_height", 60)) * spatial,
            native_width=int(cfg.get("sample_width", 90)) * spatial,
            native_num_frames=sample_frames,
            temporal_compression=temporal or config_temporal,
            spatial_compression=spatial,
            size_multiple=spatial * patch,
        )


class WanFacts(FamilyFacts):
    """Wan 2.1 / 2.2: the configs do not state the training size or length; the model cards do."""

    name = "wan"
    pipelines = {"WanPipeline": False, "WanImageToVideoPipeline": True}
    config_states_training_shape = False
    default_guidance_scale = 5.0
    expanded_timesteps_image_pipeline = "WanImageToVideoPipeline"
    # Wan 2.1/2.2 were trained on 81-frame clips (21 latents); a folder's configs do not say so.
    trained_frames = 81

    def vae_compression(self, vae_config: Mapping[str, Any]) -> tuple[Optional[int], Optional[int]]:
        downsample = vae_config.get("temperal_downsample")
        spatial = vae_config.get("scale_factor_spatial") or (2 ** len(downsample) if downsample else None)
        temporal = vae_config.get("scale_factor_temporal") or (2 ** sum(map(bool, downsample)) if downsample
                                                               else None)
        return (int(spatial) if spatial else None), (int(temporal) if temporal else None)

    def facts_from_config(self, transformer_config: Mapping[str, Any], spatial: Optional[int],
                          temporal: Optional[int], model_id: str) -> dict[str, Any]:
        cfg = transformer_config
        spatial = spatial or 8
        temporal = temporal or 4
        patch = cfg.get("patch_size") or (1, 2, 2)
        multiple = spatial * int(patch[1])
        return dict(
            trained_latent_frames=(self.trained_frames - 1) // temporal + 1,
            rotary=True,
            learned_positions=cfg.get("pos_embed_seq_len") is not None,
            native_height=480, native_width=832, native_num_frames=self.trained_frames, native_fps=16,
            temporal_compression=temporal,
            spatial_compression=spatial,
            size_multiple=max(16, multiple),
        )


FAMILY_FACTS: dict[str, FamilyFacts] = {facts.name: facts for facts in (CogVideoXFacts(), WanFacts())}


def supported_pipelines() -> list[str]:
    """Every diffusers pipeline class some family drives, family by family."""
    return [pipeline for facts in FAMILY_FACTS.values() for pipeline in facts.pipelines]


def facts_for_pipeline(pipeline_class: str) -> FamilyFacts:
    """The family that drives the diffusers pipeline class ``pipeline_class``; ``ValueError`` naming the supported
    ones otherwise."""
    for facts in FAMILY_FACTS.values():
        if pipeline_class in facts.pipelines:
            return facts
    raise ValueError(f"unsupported pipeline class {pipeline_class!r} (supported: {', '.join(supported_pipelines())})")
