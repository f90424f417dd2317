"""One process of the two-process context-parallel check (started by tests/test_parallel.py through torchrun).

Runs on the CPU with the gloo backend. diffusers 0.42.1 computes the device as ``rank % torch.accelerator
.device_count()`` and fails on a CPU-only machine (ZeroDivisionError), so this process says it has one
accelerator; that is the only shim, everything else is diffusers' real context parallelism (Ulysses all-to-all over
gloo). A tiny Wan pipeline, the same on both processes, is sampled three ways, each with the loop wrapper installed
exactly as the engine installs it (the roll outside the transformer, time axis 2 in Wan's layout):
before parallelism (the reference), with parallelism, and with parallelism plus a scaled temporal RoPE set on every
process (in place, and by rebuilding the rotary module). Results go to ``$OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_wan import build_tiny_wan  # noqa: E402

from loopui.engine.families.base import patch_attribute as _patched  # noqa: E402
from loopui.engine.parallel import enable_context_parallel, init_process_group, torchrun_context  # noqa: E402
from loopui.engine.rope import ntk_theta  # noqa: E402
from loopui.engine.shift import CycleDenoiser, ShiftSchedule, StepState  # noqa: E402

STEPS, FRAMES, SIZE = 3, 9, 32  # 3 latent frames of 4x4: 12 tokens, 6 per process


def sample(pipe, record: list | None = None) -> torch.Tensor:
    """The stock Wan pipeline with the loop wrapper on its transformer (what generate_loop does for Wan)."""
    state = StepState()
    schedule = ShiftSchedule(length=3, skip=1, num_steps=STEPS)
    denoiser = CycleDenoiser(pipe.transformer.forward, schedule, state, time_dim=2)  # Wan: (B, C, T, H, W)

    def on_step_end(_pipe, i, _t, _kwargs):
        state.step = i + 1
        return {}

    handle = None
    if record is not None:
        handle = pipe.transformer.blocks[0].attn1.register_forward_pre_hook(
            lambda _m, args, kwargs: record.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
            with_kwargs=True)
    try:
        with torch.no_grad(), _patched(pipe.transformer, "forward", denoiser):
            out = pipe(prompt="a koi pond", negative_prompt="", height=SIZE, width=SIZE, num_frames=FRAMES,
                       num_inference_steps=STEPS, guidance_scale=4.0, max_sequence_length=16,
                       generator=torch.Generator().manual_seed(3), output_type="latent",
                       callback_on_step_end=on_step_end).frames
    finally:
        if handle is not None:
            handle.remove()
    assert state.step == STEPS and denoiser.model_calls == 2 * STEPS  # CFG: cond + uncond per step
    return out.float()


def scaled_tables(rope, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's rotary buffers with the temporal base NTK-scaled by ``scale`` (spatial channels unchanged)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    cos, sin = [], []
    for dim, theta in ((rope.t_dim, ntk_theta(10000.0, scale, rope.t_dim)), (rope.h_dim, 10000.0),
                       (rope.w_dim, 10000.0)):
        c, s = get_1d_rotary_pos_embed(dim, rope.max_seq_len, theta, use_real=True, repeat_interleave_real=True,
                                       freqs_dtype=torch.float64)
        cos.append(c)
        sin.append(s)
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def main() -> None:
    out_dir = Path(os.environ["CP_OUT"])
    context = torchrun_context()
    torch.accelerator.device_count = lambda: 1  # the CPU shim (see the module docstring)
    device = init_process_group(context, backend="gloo")
    report: dict = {"rank": context.rank, "world_size": context.world_size, "device": device}
    try:
        torch.manual_seed(0)
        pipe = build_tiny_wan()
        rope = pipe.transformer.rope
        stock_tables = (rope.freqs_cos.clone(), rope.freqs_sin.clone())
        reference = sample(pipe)
        rope.freqs_cos, rope.freqs_sin = scaled_tables(rope, 2.0)
        reference_scaled = sample(pipe)
        rope.freqs_cos, rope.freqs_sin = stock_tables

        enable_context_parallel(pipe, context.world_size)
        tokens: list[int] = []
        parallel = sample(pipe, record=tokens)
        report["tokens_per_process"] = sorted(set(tokens))
        report["max_diff"] = float((parallel - reference).abs().max())
        report["differs_from_unscaled"] = float((reference_scaled - reference).abs().max())

        # RoPE scaling on every process through the engine's own path (the Wan family swaps the tables in place, so
        # the rotary module keeps its context-parallel split hook).
        from loopui.engine.families import family_for

        with family_for(pipe).rope_scaled(pipe, 2.0):
            report["max_diff_scaled_in_place"] = float((sample(pipe) - reference_scaled).abs().max())
        report["tables_restored"] = bool(rope.freqs_cos is stock_tables[0] or torch.equal(rope.freqs_cos,
                                                                                           stock_tables[0]))

        # Rebuilding the rotary module instead drops that hook: each process then gets the whole table.
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        hooked = pipe.transformer.rope
        pipe.transformer.rope = WanRotaryPosEmbed(hooked.attention_head_dim, hooked.patch_size,
                                                  hooked.max_seq_len, theta=10000.0)
        try:
            rebuilt = sample(pipe)
            report["rebuilt_rope"] = f"ran, max diff {float((rebuilt - reference).abs().max()):.3g}"
        except Exception as exc:  # noqa: BLE001 - the outcome is what this check reports
            report["rebuilt_rope"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        pipe.transformer.rope = hooked
        report["ok"] = True
    except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
        report["ok"] = False
        report["error"] = traceback.format_exc()
    (out_dir / f"rank{context.rank}.json").write_text(json.dumps(report))
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
