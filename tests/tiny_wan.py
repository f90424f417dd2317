"""A tiny random-weight Wan 2.1 text-to-video pipeline built in code (no download), for the parallelism tests."""

from __future__ import annotations


def build_tiny_wan(seed: int = 0):
    """``WanPipeline`` with a 2-head, 2-layer transformer, a tiny Wan VAE and a tiny UMT5 (character tokenizer)."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from loopui.models.demo import build_tiny_tokenizer

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=32, d_ff=32, d_kv=8, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))
    for module in (transformer, vae, text_encoder):
        module.eval()
    pipe = WanPipeline(tokenizer=build_tiny_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe
