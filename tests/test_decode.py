"""Decoding a cycle: the family's decode dtype, frame-invariant decoding in one causal stream, the still for free."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loopui.engine import decode as decode_module
from loopui.engine.decode import decode_cycle, decode_dtype, decode_precision, decode_with_still
from loopui.engine.families import FAMILIES, family_for
from tiny_wan import build_tiny_wan


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan()


def _latents(pipe, num_latents=6, seed=0):
    family = family_for(pipe)
    z = family.latent_channels(pipe)
    shape = (1, num_latents, z, 4, 6) if family.time_dim == 1 else (1, z, num_latents, 4, 4)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _levels(video):
    return (video.float().clamp(-1, 1) + 1) * 127.5


class DecoderLoad:
    """Decoder calls and the latents they were fed (Wan: one per call; CogVideoX: a batch of 2-3)."""

    def __init__(self, vae):
        self.calls, self.latents, self.dtypes = 0, 0, set()
        self.handles = [vae.decoder.register_forward_pre_hook(self._pre),
                        vae.decoder.conv_out.register_forward_hook(self._out)]

    def _pre(self, module, args):
        self.calls += 1
        self.latents += int(args[0].shape[2])

    def _out(self, module, args, output):
        self.dtypes.add(output.dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_decode_dtype_is_the_family_fact_on_an_accelerator(wan, tiny_pipe, monkeypatch):
    for pipe in (wan, tiny_pipe):
        family = family_for(pipe)
        assert family.vae_decode_dtype == "bfloat16"
        assert decode_dtype(pipe, family) == torch.float32  # a CPU decodes in the VAE's own dtype
        monkeypatch.setattr(decode_module, "_on_accelerator", lambda p: True)
        # a pipeline loaded in float32 on purpose (--dtype float32) decodes in float32 on a GPU too
        assert decode_dtype(pipe, family) == torch.float32
        # a float32 VAE beside a bfloat16 transformer (diffusers' Wan examples) decodes in bfloat16 on a GPU
        monkeypatch.setattr(type(family), "transformer_dtype", lambda self, p: torch.bfloat16)
        assert decode_dtype(pipe, family) == torch.bfloat16
        # a 16-bit VAE the model card chose stays so (a stand-in: casting the shared fixtures' would round them)
        half = SimpleNamespace(vae=SimpleNamespace(dtype=torch.float16))
        assert decode_dtype(half, family) == torch.float16
        monkeypatch.undo()


def test_decode_runs_in_bfloat16_without_recasting_the_shared_vae(wan):
    family = family_for(wan)
    latents = _latents(wan)
    weights = {k: v.clone() for k, v in wan.vae.state_dict().items()}
    pixels = [torch.rand(32, 32, 3).numpy() for _ in range(5)]
    with torch.no_grad():
        encoded = family.encode_video(wan, pixels, 32, 32, "cpu", torch.float32)
        full = decode_cycle(wan, latents, family=family, dtype=torch.float32)
        with DecoderLoad(wan.vae) as load:
            half = decode_cycle(wan, latents, family=family, dtype=torch.bfloat16)
        again = family.encode_video(wan, pixels, 32, 32, "cpu", torch.float32)
    assert load.dtypes == {torch.bfloat16}
    state = wan.vae.state_dict()
    assert wan.vae.dtype == torch.float32 and all(torch.equal(state[k], weights[k]) for k in weights)
    assert torch.equal(encoded, again)
    diff = (_levels(half) - _levels(full)).abs()
    # bfloat16 rounding, measured in docs/vae_decode.md (faithful Wan 2.1 VAE: mean 1.06, max 12 levels)
    # bfloat16 rounding: on this tiny VAE 1.2 levels mean, 32 max (random weights; docs/vae_decode.md has the
    # faithful VAEs' numbers)
    assert 0 < diff.mean() < 2.5 and diff.max() < 64


def test_autocast_runs_on_the_device_the_pipeline_executes_on(wan, monkeypatch):
    """Under CPU offload the VAE's weights rest on the CPU (or the meta device) between calls while it decodes on
    the GPU: autocast must be entered for the execution device, not for where the weights rest."""
    entered = []
    real_autocast = torch.autocast

    def recording(device_type, dtype=None, **kwargs):
        entered.append((device_type, dtype))
        return real_autocast("cpu", dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording)
    offloaded = SimpleNamespace(vae=wan.vae, _execution_device=torch.device("cuda", 0))
    with decode_precision(offloaded, torch.bfloat16) as latent_dtype:
        pass
    assert entered == [("cuda", torch.bfloat16)]
    assert latent_dtype == torch.float32  # the latents go in as the VAE's own; autocast narrows its convolutions


def test_a_wider_decode_dtype_casts_the_vae_back_exactly(wan):
    vae = build_tiny_wan().vae.to(torch.bfloat16)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with decode_precision(SimpleNamespace(vae=vae, _execution_device=torch.device("cpu")), torch.float32):
        assert vae.dtype == torch.float32
    assert vae.dtype == torch.bfloat16
    assert all(torch.equal(vae.state_dict()[k], before[k]) for k in before)


@pytest.mark.parametrize("tiled", [False, True])
def test_the_wrap_is_one_causal_stream_and_every_latent_is_decoded_after_context(wan, tiled):
    family = family_for(wan)
    latents = _latents(wan, num_latents=6)
    context, ratio = family.decode_context, wan.vae_scale_factor_temporal
    if tiled:
        wan.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                              tile_sample_stride_width=8)
    try:
        with torch.no_grad():
            video = decode_cycle(wan, latents, family=family)
            stock = family.decode(wan, latents)  # the cycle as a plain clip: latent k -> frames 1 + 4 (k - 1) ...
            stream = family.decode(wan, torch.cat([latents, latents[:, :, :context]], dim=2))
    finally:
        wan.vae.disable_tiling()
    assert video.shape[2] == ratio * 6
    # latents context..5 are the stock clip's own frames (each had >= `context` cycle latents before it) ...
    torch.testing.assert_close(video[:, :, ratio * context:], stock[:, :, 1 + ratio * (context - 1):])
    # ... and the wrap, last latent -> first latent, is the same stream continuing (no seam of its own)
    torch.testing.assert_close(torch.cat([video[:, :, -ratio:], video[:, :, :ratio]], dim=2),
                               stream[:, :, -ratio * (context + 1):-ratio * (context - 1) or None])


def test_rotating_the_cycle_rotates_the_tiled_loop(tiny_pipe):
    tiny_pipe.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
    try:
        latents = _latents(tiny_pipe, num_latents=5)
        with torch.no_grad():
            a = decode_cycle(tiny_pipe, latents)
            b = decode_cycle(tiny_pipe, torch.roll(latents, shifts=2, dims=1))
    finally:
        tiny_pipe.vae.disable_tiling()
    assert a.shape[2] == b.shape[2] == 20
    err_rot = (torch.roll(a, shifts=8, dims=2) - b).abs().mean()
    assert err_rot < 0.5 * (a - b).abs().mean()


def test_an_anchored_wan_loop_takes_its_still_from_the_stream(wan):
    family = family_for(wan)
    latents = _latents(wan, num_latents=6)
    reference = latents[:, :, :1].clone()
    with torch.no_grad():
        with DecoderLoad(wan.vae) as old:
            # before: the cycle with its last 2 latents prepended, then the reference alone
            family.decode(wan, torch.cat([latents[:, :, -2:], latents], dim=2))
            alone = family.decode(wan, reference)
        with DecoderLoad(wan.vae) as new:
            video, still = decode_with_still(wan, latents, reference, True, family)
        with DecoderLoad(wan.vae) as other:  # a first latent that is not the reference: decoded apart
            _, other_still = decode_with_still(wan, latents, reference + 1, True, family)
    assert (old.calls, old.latents) == (9, 9)
    assert (new.calls, new.latents) == (6 + family.decode_context, 6 + family.decode_context) < (9, 9)
    assert other.latents == new.latents + 1
    torch.testing.assert_close(still, alone)
    assert still.shape[2] == 1 and video.shape[2] == 24
    assert not torch.allclose(other_still, alone)


def test_cogvideox_decodes_its_still_apart(tiny_pipe):
    family = family_for(tiny_pipe)
    assert not family.first_latent_decodes_alone and FAMILIES["wan"].first_latent_decodes_alone
    latents = _latents(tiny_pipe, num_latents=5)
    with torch.no_grad():
        video, still = decode_with_still(tiny_pipe, latents, latents[:, :1].clone(), True, family)
        alone = family.decode(tiny_pipe, latents[:, :1])
    torch.testing.assert_close(still, alone)
    assert video.shape[2] == 20
