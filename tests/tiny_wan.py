"""Tiny random-weight Wan pipelines for the engine's Wan tests (layout and wiring; faithful configs live in
``loopui.testing.faithful``)."""

from __future__ import annotations


def build_tiny_wan(image_to_video: bool = False, experts: int = 1, expand_timesteps: bool = False,
                   attention_head_dim: int = 12, seed: int = 0):
    """A ``WanPipeline`` / ``WanImageToVideoPipeline`` small enough for a CPU test (UniPC flow scheduler)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, \
        WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from loopui.models.demo import build_tiny_tokenizer

    def transformer():
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=attention_head_dim,
            in_channels=16 + (20 if image_to_video else 0), out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32,
            num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
            image_dim=16 if image_to_video and experts == 1 else None,
            added_kv_proj_dim=2 * attention_head_dim if image_to_video and experts == 1 else None)

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=16, d_ff=32, d_kv=8, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    parts = dict(tokenizer=build_tiny_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                 transformer=transformer())
    if experts == 2:
        parts.update(transformer_2=transformer(), boundary_ratio=0.875)
    if image_to_video:
        if experts == 1:
            torch.manual_seed(seed)
            parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, projection_dim=16))
            parts["image_processor"] = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
        pipe = WanImageToVideoPipeline(**parts)
    else:
        pipe = WanPipeline(**parts, expand_timesteps=expand_timesteps)
    for name in ("transformer", "transformer_2", "vae", "text_encoder", "image_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()  # fresh modules are in train mode
    pipe.set_progress_bar_config(disable=True)
    return pipe
