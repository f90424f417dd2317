"""``loopui models``: the registry (or the given model folders) as a table: family, task, latents, size, VRAM,
licence; then each model's speed recipes (``generate --recipe NAME``) with their values and sources."""

from __future__ import annotations

import argparse
from typing import Sequence

from loopui.cli.common import EXIT_OK, fail
from loopui.engine.request import size_text
from loopui.messages import one_line


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``models`` sub-command's arguments to ``parser``."""
    parser.add_argument("model", nargs="*", metavar="ID_OR_DIR", help="Describe these instead of the registry.")


def run_models(names: Sequence[str]) -> int:
    """Print the table of ``names`` (every registry model when empty); 0, or 2 for an unknown name."""
    from loopui.models.recipes import recipes_for
    from loopui.models.registry import DEFAULT_MODEL_ID, list_models, spec_for

    try:
        specs = [spec_for(name) for name in names] if names else list_models()
    except ValueError as exc:
        return fail(one_line(exc))
    rows = [("MODEL", "FAMILY", "TASK", "ROPE", "LATENTS", "NATIVE", "DTYPE", "VRAM / OFFLOAD", "LICENCE")]
    for spec in specs:
        name = spec.model_id + (" (default)" if spec.model_id == DEFAULT_MODEL_ID else "")
        family = spec.family + (f" ({spec.experts} experts)" if spec.experts > 1 else "")
        rows.append((name, family, "i2v" if spec.image_to_video else "t2v", "yes" if spec.rotary else "no",
                     str(spec.trained_latent_frames),
                     f"{size_text(spec.native_width, spec.native_height)}, {spec.native_num_frames} frames @ "
                     f"{spec.native_fps} fps",
                     spec.cuda_dtype,
                     f"~{spec.vram_gb:g} / {spec.offload_vram_gb:g} GiB",
                     _short_licence(spec.license)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not names:
        print("\nVRAM: GiB to hold the model on one GPU at its native size / peak with model CPU offload (rough).")
        print(f"'demo' is an alias of {spec_for('demo').model_id}. A local diffusers folder works as --model too.")
    notes = sorted({spec.license for spec in specs if spec.license and _short_licence(spec.license) != spec.license})
    for licence in notes:
        print(f"{_short_licence(licence)}: {licence}")
    with_recipes = [(spec, recipes_for(spec)) for spec in specs]
    if any(recipes for _, recipes in with_recipes):
        print("\nSpeed recipes (`generate --recipe NAME` fills the flags you leave out; flags you give win):")
        for spec, recipes in with_recipes:
            if recipes:
                print(f"  {spec.model_id}")
            for recipe in recipes:
                print(f"    {recipe.name}: {recipe.summary()}")
                print(f"      source: {recipe.source}")
    return EXIT_OK


def _short_licence(licence: str) -> str:
    """A licence as a table cell: its name without the parenthesised terms ("CogVideoX license"), "-" if unknown."""
    return licence.split(" (", 1)[0] if licence else "-"
