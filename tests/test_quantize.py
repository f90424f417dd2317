"""Quantized denoisers (torchao int8 on the CPU; fp8 only refused here, it needs an FP8 GPU) and the group offload
memory policy: every refusal in one line, a quantized loop close to the stock one with smaller weights, one load per
quantization in the manager, group offload giving the same loop as none (cycle wrapper, Stop and LoRAs included)."""

from __future__ import annotations

import threading

import pytest
import torch

from loopui.engine import LoopInterrupted, LoopRequest, generate_loop
from loopui.models import ModelManager, memory
from loopui.models.lora import lora_status, set_fuse_policy
from loopui.models.quantize import (
    QUANTIZE_MODES,
    check_pipeline_quantization,
    module_bytes,
    pipeline_quantization,
    quantize_pipeline,
    resolve_quantize,
)
from loopui.testing.faithful import build_faithful_pipeline
from loopui.testing.lora_files import write_lora

pytest.importorskip("torchao")

WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
LOOP = dict(prompt="waves rolling onto a beach", height=64, width=64, num_frames=21, num_inference_steps=3,
            seam_polish="off", seed=0, shift_skip=1)
# The tiny demo CogVideoX (what the manager loads in code).
DEMO = dict(prompt="a paper boat on waves", height=32, width=48, num_frames=9, num_inference_steps=2)


def _wan(**shrink):
    return build_faithful_pipeline(WAN, layers=2, **shrink)


def _latents(pipe, **values):
    return generate_loop(pipe, LoopRequest(**dict(LOOP, **values)), output_type="latent").latents


@pytest.fixture(scope="module")
def stock_and_int8():
    stock, quantized = _wan(), _wan()
    quantize_pipeline(quantized, "int8")
    return stock, quantized


# -- refusals ---------------------------------------------------------------------------------------------------------

def test_the_modes_are_the_requests():
    from loopui.engine.request import QUANTIZE_MODES as REQUEST_MODES

    assert QUANTIZE_MODES == REQUEST_MODES


def _refused(call, *needles):
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and all(n in text for n in needles), text
    return text


def test_resolve_quantize_refusals_name_the_knob(monkeypatch):
    import loopui.models.quantize as quantize

    monkeypatch.delenv("LOOPUI_QUANTIZE", raising=False)
    assert resolve_quantize(None, "cpu") == "none" and resolve_quantize("INT8 ", "cpu") == "int8"
    _refused(lambda: resolve_quantize("int4", "cpu"), "quantize", "'int4'", "none, fp8, int8")
    _refused(lambda: resolve_quantize("fp8", "cpu"), "quantize", "8.9", "use int8")
    monkeypatch.setenv("LOOPUI_QUANTIZE", "int8")
    assert resolve_quantize(None, "cpu") == "int8" and resolve_quantize("none", "cpu") == "none"
    monkeypatch.setenv("LOOPUI_QUANTIZE", "half")
    _refused(lambda: resolve_quantize(None, "cpu"), "LOOPUI_QUANTIZE", "'half'")
    monkeypatch.setattr(quantize, "torchao_available", lambda: False)
    _refused(lambda: resolve_quantize("int8", "cpu"), "quantize", "pip install torchao")
    _refused(lambda: quantize_pipeline(object(), "int8"), "quantize", "pip install torchao")


@pytest.mark.parametrize("capability, accepted", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_needs_compute_capability_8_9(monkeypatch, capability, accepted):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if accepted:
        assert resolve_quantize("fp8", "cuda:0") == "fp8"
    else:
        _refused(lambda: resolve_quantize("fp8", "cuda:0"), "quantize", f"{capability[0]}.{capability[1]}",
                 "use int8")
    assert resolve_quantize("int8", "cuda:0") == "int8"


def test_a_quantization_the_pipeline_lacks_is_refused_before_sampling(stock_and_int8):
    stock, quantized = stock_and_int8
    calls = []
    stock.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    _refused(lambda: _latents(stock, quantize="int8"), "quantize 'int8'", "weights are none",
             "ModelManager(quantize='int8')")
    _refused(lambda: check_pipeline_quantization(quantized, "none"), "weights are int8")
    assert calls == []
    check_pipeline_quantization(stock, None)  # the server's business
    check_pipeline_quantization(quantized, "int8")
    _refused(lambda: quantize_pipeline(quantized, "fp8"), "already int8")


# -- int8 on the CPU ------------------------------------------------------------------------------------------------

def test_int8_loop_is_close_to_the_stock_loop_with_smaller_weights(stock_and_int8):
    stock, quantized = stock_and_int8
    assert pipeline_quantization(stock) == "none" and pipeline_quantization(quantized) == "int8"
    kinds = {name: type(m.weight).__name__ for name, m in quantized.transformer.named_modules()
             if isinstance(m, torch.nn.Linear)}
    blocks = {n: k for n, k in kinds.items() if n.startswith("blocks.")}
    assert blocks and set(blocks.values()) == {"Int8Tensor"}
    # diffusers' high-precision layers stay as they were: embedders, the final projection.
    rest = {n: k for n, k in kinds.items() if not n.startswith("blocks.")}
    assert "proj_out" in rest and any(n.startswith("condition_embedder.time_embedder") for n in rest)
    assert set(rest.values()) == {"Parameter"}
    stock_blocks = module_bytes(stock.transformer.blocks)
    int8_blocks = module_bytes(quantized.transformer.blocks)
    assert int8_blocks < stock_blocks / 3  # float32 -> int8 plus per-row scales
    assert module_bytes(quantized.transformer) < module_bytes(stock.transformer)
    reference, out = _latents(stock), _latents(quantized)
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0 < error < 1e-2, error
    quantize_pipeline(quantized, "int8")  # twice: nothing changes
    torch.testing.assert_close(_latents(quantized), out, rtol=0, atol=0)


def test_loras_run_unfused_on_int8_weights(stock_and_int8, tmp_path):
    stock, quantized = stock_and_int8
    path = write_lora(stock.transformer, tmp_path / "style.safetensors", seed=3)
    set_fuse_policy(quantized, "always")
    plain = _latents(quantized)
    with_lora = _latents(quantized, loras=[(str(path), 1.0)])
    reference = _latents(stock, loras=[(str(path), 1.0)])
    status = lora_status(quantized)
    assert status["fused"] is None and status["fuse_count"] == 0 and len(status["loaded"]) == 1
    assert (with_lora - plain).abs().max() > 0.05  # the LoRA acts
    assert ((with_lora - reference).norm() / reference.norm()).item() < 1e-2
    torch.testing.assert_close(_latents(quantized), plain, rtol=0, atol=0)  # and is off again afterwards


# -- the manager ------------------------------------------------------------------------------------------------------

def test_manager_loads_once_per_quantization(monkeypatch):
    monkeypatch.delenv("LOOPUI_QUANTIZE", raising=False)
    manager = ModelManager(max_models=2)
    with pytest.raises(ValueError, match="quantize 'fp8'"):
        manager.get("demo", quantize="fp8")
    assert manager.load_count == 0
    stock = manager.get("demo")
    int8 = manager.get("demo", quantize="int8")
    assert int8 is not stock and manager.load_count == 2
    assert (stock.quantize, int8.quantize) == ("none", "int8")
    assert pipeline_quantization(int8.pipe) == "int8" and pipeline_quantization(stock.pipe) == "none"
    assert "int8 transformer" in int8.describe() and "transformer" not in stock.describe()
    monkeypatch.setenv("LOOPUI_QUANTIZE", "int8")
    assert manager.get("demo") is int8 and manager.load_count == 2
    assert manager.get("demo", quantize="none") is stock
    loop = manager.run("demo", lambda loaded: generate_loop(loaded.pipe, LoopRequest(**DEMO, quantize="int8"),
                                                            output_type="latent"))
    assert loop.latents.shape[1] == 3
    # The server's setting chose int8 (the request left quantize empty): the sidecar says what ran.
    served = manager.run("demo", lambda loaded: generate_loop(loaded.pipe, LoopRequest(**DEMO), output_type="latent"))
    assert served.plan.request.quantize is None and served.settings["quantize"] == "int8"
    assert ModelManager(quantize="int8").get("demo", quantize="none").quantize == "none"
    with pytest.raises(ValueError, match="quantize must be one of"):
        ModelManager(quantize="int3")


# -- group offload --------------------------------------------------------------------------------------------------

def test_group_offload_gives_the_same_loop_with_the_cycle_stop_and_loras(tmp_path):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    stock, grouped = _wan(), _wan()
    path = write_lora(stock.transformer, tmp_path / "style.safetensors", seed=3)
    memory.place(grouped, "group", "cpu")  # onload to the CPU: no streams there
    assert _is_group_offload_enabled(grouped.transformer) and _is_group_offload_enabled(grouped.text_encoder)
    # The UMT5 text encoder keeps its blocks a level down (encoder.block): streamed block by block, not whole.
    encoder_blocks = grouped.text_encoder.encoder.block
    leaders = [m._diffusers_hook.get_hook(memory.GROUP_OFFLOAD_HOOKS[0]).group.offload_leader
               for m in encoder_blocks]
    assert leaders == list(encoder_blocks)
    assert memory.block_lists(grouped.text_encoder) == ([encoder_blocks], ["encoder"])
    torch.testing.assert_close(_latents(grouped, shift_skip=2), _latents(stock, shift_skip=2), rtol=0, atol=0)
    torch.testing.assert_close(_latents(grouped, loras=[(str(path), 0.8)]),
                               _latents(stock, loras=[(str(path), 0.8)]), rtol=0, atol=0)
    assert lora_status(grouped)["fused"] is None  # streamed weights are never folded
    stop = threading.Event()

    def stop_after_first(stage, step, total):
        if stage == "denoise" and step >= 1:
            stop.set()

    with pytest.raises(LoopInterrupted):
        generate_loop(grouped, LoopRequest(**LOOP), output_type="latent", callback=stop_after_first,
                      cancel_event=stop)
    torch.testing.assert_close(_latents(grouped), _latents(stock), rtol=0, atol=0)  # still serves after a Stop
    # accelerate's remove_all_hooks leaves diffusers' group offload hooks; remove_offload takes them off.
    grouped.remove_all_hooks()
    assert _is_group_offload_enabled(grouped.transformer)
    memory.remove_offload(grouped)
    assert not _is_group_offload_enabled(grouped.transformer)
    torch.testing.assert_close(_latents(grouped), _latents(stock), rtol=0, atol=0)


def test_group_offload_of_an_int8_transformer_is_the_int8_loop(stock_and_int8):
    _stock, quantized = stock_and_int8
    grouped = _wan()
    quantize_pipeline(grouped, "int8")
    memory.place(grouped, "group", "cpu")
    torch.testing.assert_close(_latents(grouped), _latents(quantized), rtol=0, atol=0)
    memory.unplace(grouped)
