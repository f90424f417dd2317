"""Tiny random-weight CogVideoX pipelines built in code: the app's ``--demo`` model and the tests' fixtures.

No download ever: the tokenizer is made with the ``tokenizers`` library, the text encoder is a tiny T5 from its
config, the transformer and VAE are built from constructor arguments (seed fixed, so weights are reproducible).
The output is abstract noise; the point is to exercise the real diffusers pipeline end to end on a CPU in seconds.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_MODEL_ID = "loopui/tiny-random-cogvideox"


def build_tiny_tokenizer():
    """A character-level fast tokenizer (pad 0, eos 1, unk 2) wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Split("", "isolated")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.BPEDecoder()
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=226)


def build_tiny_cogvideox(
    image_to_video: bool = False,
    use_rotary: bool = True,
    sample_frames: int = 49,
    latent_channels: int = 4,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    num_layers: int = 1,
    prediction_type: str = "v_prediction",
    seed: int = 0,
):
    """Build a tiny ``CogVideoXPipeline`` (or ``CogVideoXImageToVideoPipeline``) with random weights.

    The transformer keeps CogVideoX-5b's sample grid (90x60 latents, ``sample_frames`` 49 -> 13 latents) so the
    rotary crop grid and the trained latent length are the real ones; only widths and depths are tiny.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    import torch  # lazy: importing loopui.models (e.g. for DEMO_MODEL_ID) must not import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=latent_channels * (2 if image_to_video else 1),
        out_channels=latent_channels,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=num_layers,
        sample_width=90,
        sample_height=60,
        sample_frames=sample_frames,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=use_rotary,
        use_learned_positional_embeddings=image_to_video and not use_rotary,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        snr_shift_scale=1.0,
    )
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=128, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    tokenizer = build_tiny_tokenizer()
    cls = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
    for module in (transformer, vae, text_encoder):
        module.eval()  # freshly built modules are in training mode: T5's dropout would make runs differ
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_cogvideox(directory: str | Path, **kwargs) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it into ``directory`` (a loadable diffusers folder)."""
    directory = Path(directory)
    pipe = build_tiny_cogvideox(**kwargs)
    pipe.save_pretrained(directory, safe_serialization=True)
    logger.info("saved tiny CogVideoX pipeline to %s", directory)
    return directory
