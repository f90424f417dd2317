"""Speed recipes: the published few-step settings of public distilled LoRAs, per registry model, each value with
its source.

A recipe *fills* a request: the knobs it names (steps, guidance, scheduler, sigmas, LoRAs) take its values only
where the caller left them out, so every value stays editable. One function serves every front end:
:func:`fill_recipe` on the loose values the CLI, the API or a form collect, before ``request_from_values``; a page
that shows the knobs sets them from :func:`recipe_values` instead. Only knobs whose default is automatic are filled
(``None``, or no LoRAs), so "left out" is never ambiguous.

Pure data, like the registry: no torch or diffusers import. LoRA sources are hub files
(``owner/repo/path/file.safetensors:scale[:expert]``, as ``LoopRequest.loras`` reads them); they are fetched when a
loop is planned (``LoopPlan.with_loras``), never here. A LoRA the caller gives whose path ends with a recipe file's
path in its repo (a downloaded copy, or the same hub file at another scale) stands in for that file.

Where the values come from (each cited beside it below):
- lightx2v, its own inference code (ModelTC/LightX2V at commit f8aee98b): ``configs/distill/wan21/
  wan_t2v_distill_lora_4step_cfg.json``, ``wan_i2v_distill_lora_4step_cfg.json``, ``configs/distill/wan22/
  wan_moe_t2v_distill_lora.json``, ``wan_moe_i2v_distill_with_lora.json`` (``infer_steps`` 4, ``enable_cfg``
  false, ``sample_shift`` 5, ``denoising_step_list`` [1000, 750, 500, 250], ``lora_configs`` path and strength,
  ``boundary_step_index`` 2), sampled by ``lightx2v/models/schedulers/wan/step_distill/scheduler.py``
  ``WanStepDistillScheduler`` (sigmas ``linspace(1, 0, 1001)`` shifted by ``sample_shift`` and picked at
  ``1000 - t``; ``step_post`` is a deterministic Euler step, ``x + (sigma_next - sigma) * v``).
- Wan2.2-Lightning (ModelTC/Wan2.2-Lightning at commit 92efeb44): ``wan/configs/wan_t2v_A14B.py`` and
  ``wan_i2v_A14B.py`` (``sample_steps`` 4, ``sample_shift`` 5.0, ``sample_guide_scale`` (1.0, 1.0), LoRA files
  ``high_noise_model.safetensors`` / ``low_noise_model.safetensors`` merged into the high- / low-noise model),
  ``generate.py`` (``--sample_solver`` default ``euler``, warns for any other solver with a LoRA: "it's used in
  distillation"), ``wan/utils/fm_solvers_euler.py`` (timesteps ``linspace(1000, 0, steps + 1)`` shifted), the
  README's ``--lora_dir`` folders.
- CausVid (tianweiy/CausVid at commit ca211503): ``configs/wan_bidirectional_dmd_from_scratch.yaml``
  (``denoising_step_list`` [1000, 757, 522], no warp) and ``causvid/models/wan/bidirectional_inference.py`` (each
  step predicts the clean video and re-noises it with fresh noise to the next level); the LoRA is Kijai's
  extraction of that 1.3B bidirectional model (Kijai/WanVideo_comfy README: "CausVid LoRAs are experimental
  extractions from the CausVid finetunes").
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

# LoopRequest knobs a recipe may set: all automatic by default (None, or no LoRAs), so a value the caller gave is
# never mistaken for one left out.
RECIPE_KNOBS = ("num_inference_steps", "guidance_scale", "scheduler", "sigmas", "flow_shift", "loras")

# lightx2v's 4-step schedule: timesteps 1000, 750, 500, 250 (t = 1, 0.75, 0.5, 0.25) shifted by sample_shift 5,
# sigma = 5t / (1 + 4t) -- WanStepDistillScheduler.set_denoising_timesteps; Wan2.2-Lightning's EulerScheduler
# (linspace(1000, 0, 5) without its final 0, shift 5) gives the same four. loopui.engine.schedules.distilled_sigmas(4)
# computes them too (tests hold the two equal).
SHIFTED_4STEP_SIGMAS = (1.0, 0.9375, 2.5 / 3.0, 0.625)
DISTILL_SHIFT = 5.0  # lightx2v configs: sample_shift 5; Lightning wan_t2v_A14B.py / wan_i2v_A14B.py: sample_shift 5.0
# CausVid's bidirectional 1.3B: denoising_step_list 1000, 757, 522 used as they are (warp_denoising_step false); its
# FlowMatchScheduler has timesteps = 1000 * sigma, so the model is called at sigma = t / 1000.
CAUSVID_SIGMAS = (1.0, 0.757, 0.522)

_LIGHTX2V = "ModelTC/LightX2V (commit f8aee98b)"
_LIGHTNING = "ModelTC/Wan2.2-Lightning (commit 92efeb44)"
_CAUSVID = "tianweiy/CausVid (commit ca211503)"


@dataclass(frozen=True)
class Recipe:
    """One published few-step setting for some models: ``values`` are the ``LoopRequest`` field values it sets
    (LoRAs as ``"owner/repo/file.safetensors:scale[:expert]"``), ``source`` where they come from, ``note`` what
    could not be verified or what to know."""

    name: str
    label: str
    model_ids: tuple[str, ...]
    values: Mapping[str, Any]
    source: str
    note: str = ""
    # The recipe's sigmas are timesteps 1000 * (1 - j / steps) shifted by this (lightx2v, Lightning): for another step
    # count the caller gives, fill_recipe makes that many the same way. None: the sigmas hold for their count only.
    sigma_shift: Optional[float] = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.values) - set(RECIPE_KNOBS))
        if unknown:
            raise ValueError(f"recipe {self.name!r} sets {unknown[0]!r}, which is not a knob a recipe may fill")
        object.__setattr__(self, "values", types.MappingProxyType(dict(self.values)))

    def summary(self) -> str:
        """One line: steps, guidance, sampler and schedule, LoRAs (for ``loopui models`` and help texts)."""
        v = self.values
        guidance = v.get("guidance_scale")
        parts = [f"{v['num_inference_steps']} steps" if "num_inference_steps" in v else "",
                 "no CFG" if guidance == 1 else (f"guidance {guidance:g}" if guidance is not None else ""),
                 v.get("scheduler") or "",
                 ("sigmas " + ", ".join(f"{s:.4g}" for s in v["sigmas"])) if v.get("sigmas") else "",
                 (f"flow shift {v['flow_shift']:g}" if v.get("flow_shift") is not None else ""),
                 "LoRA " + " + ".join(v["loras"]) if v.get("loras") else ""]
        return ", ".join(p for p in parts if p)


def _lora(path: str, scale: float = 1.0, expert: str = "both") -> str:
    return f"{path}:{scale:g}" + ("" if expert == "both" else f":{expert}")


def shifted_sigmas(num_steps: int, shift: float) -> tuple[float, ...]:
    """Sigmas of timesteps ``1000 * (1 - j / num_steps)``, shifted: ``shift * t / (1 + (shift - 1) * t)`` -- the
    schedule of lightx2v's WanStepDistillScheduler and Wan2.2-Lightning's EulerScheduler (the engine's
    ``loopui.engine.schedules.distilled_sigmas`` calls this)."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    return tuple(shift * t / (1.0 + (shift - 1.0) * t) for t in (1.0 - j / num_steps for j in range(num_steps)))


def _distill_4step(loras: Iterable[str]) -> dict:
    return {
        "num_inference_steps": 4,  # configs: infer_steps 4
        "guidance_scale": 1.0,  # configs: enable_cfg false (their sample_guide_scale is then unused)
        "scheduler": "euler",  # WanStepDistillScheduler.step_post / Lightning's EulerScheduler: a plain Euler step
        "sigmas": SHIFTED_4STEP_SIGMAS,  # denoising_step_list [1000, 750, 500, 250] at sample_shift 5
        "loras": tuple(loras),  # lora_configs path, strength 1.0
    }


_A14B_NOTE = ("Two experts: each file goes into its own expert (high = diffusers' transformer, low = transformer_2), "
              "as the source loads them; one scheduler serves both, so both experts run on the same shifted sigmas "
              "(in ComfyUI each expert's sampler needs the shift, or the low-noise half distorts). With these sigmas "
              "the high-noise expert takes the first 2 steps (t = 1000, 937.5 >= the boundary), the low-noise one "
              "the last 2, as the source's boundary_step_index 2 says.")

RECIPES: tuple[Recipe, ...] = (
    Recipe(
        name="lightx2v-4step", label="lightx2v 4-step (step + CFG distilled LoRA)",
        model_ids=("Wan-AI/Wan2.1-T2V-14B-Diffusers",),
        values=_distill_4step([_lora("lightx2v/Wan2.1-Distill-Loras/"
                                     "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors")]),
        source=f"{_LIGHTX2V}: configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json; "
               "lightx2v/models/schedulers/wan/step_distill/scheduler.py",
        note="lightx2v runs it at 832x480 (target_height/width); its hub repo lists Wan2.1-T2V-14B as base model.",
        sigma_shift=DISTILL_SHIFT),
    Recipe(
        name="lightx2v-4step", label="lightx2v 4-step (step + CFG distilled LoRA)",
        model_ids=("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",),
        values=_distill_4step([_lora("lightx2v/Wan2.1-Distill-Loras/"
                                     "wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors")]),
        source=f"{_LIGHTX2V}: configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json; "
               "lightx2v/models/schedulers/wan/step_distill/scheduler.py",
        note="lightx2v runs it at 832x480, 81 frames.", sigma_shift=DISTILL_SHIFT),
    Recipe(
        name="lightx2v-4step", label="lightx2v 4-step (per-expert distilled LoRAs, 1217)",
        model_ids=("Wan-AI/Wan2.2-T2V-A14B-Diffusers",),
        values=_distill_4step([
            _lora("lightx2v/Wan2.2-Distill-Loras/wan2.2_t2v_A14b_high_noise_lora_rank64_lightx2v_4step_1217"
                  ".safetensors", expert="high"),
            _lora("lightx2v/Wan2.2-Distill-Loras/wan2.2_t2v_A14b_low_noise_lora_rank64_lightx2v_4step_1217"
                  ".safetensors", expert="low")]),
        source=f"{_LIGHTX2V}: configs/distill/wan22/wan_moe_t2v_distill_lora.json (lora_configs high_noise_model / "
               "low_noise_model, boundary_step_index 2); lightx2v/models/schedulers/wan/step_distill/scheduler.py "
               "(Wan22StepDistillScheduler)",
        note=_A14B_NOTE, sigma_shift=DISTILL_SHIFT),
    Recipe(
        name="lightx2v-4step", label="lightx2v 4-step (per-expert distilled LoRAs, 1022)",
        model_ids=("Wan-AI/Wan2.2-I2V-A14B-Diffusers",),
        values=_distill_4step([
            _lora("lightx2v/Wan2.2-Distill-Loras/wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step_1022"
                  ".safetensors", expert="high"),
            _lora("lightx2v/Wan2.2-Distill-Loras/wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022"
                  ".safetensors", expert="low")]),
        source=f"{_LIGHTX2V}: configs/distill/wan22/wan_moe_i2v_distill_with_lora.json (lora_configs, "
               "boundary_step_index 2); lightx2v/models/schedulers/wan/step_distill/scheduler.py",
        note=_A14B_NOTE + " diffusers' I2V-A14B boundary is t = 900: the same 2 + 2 split.",
        sigma_shift=DISTILL_SHIFT),
    Recipe(
        name="lightning-4step", label="Wan2.2-Lightning 4-step (Seko V1.1 LoRAs)",
        model_ids=("Wan-AI/Wan2.2-T2V-A14B-Diffusers",),
        values=_distill_4step([
            _lora("lightx2v/Wan2.2-Lightning/Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/high_noise_model"
                  ".safetensors", expert="high"),
            _lora("lightx2v/Wan2.2-Lightning/Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/low_noise_model"
                  ".safetensors", expert="low")]),
        source=f"{_LIGHTNING}: wan/configs/wan_t2v_A14B.py (sample_steps 4, sample_shift 5.0, sample_guide_scale "
               "(1.0, 1.0), boundary 0.875, high/low_noise_model.safetensors), generate.py (sample_solver euler), "
               "wan/utils/fm_solvers_euler.py, README (V1.1 folder: 'slightly better than V1')",
        note=_A14B_NOTE + " The file names inside the hub folder are the source's config names; the hub listing "
                          "itself was not read (no network here).", sigma_shift=DISTILL_SHIFT),
    Recipe(
        name="lightning-4step", label="Wan2.2-Lightning 4-step (Seko V1 LoRAs)",
        model_ids=("Wan-AI/Wan2.2-I2V-A14B-Diffusers",),
        values=_distill_4step([
            _lora("lightx2v/Wan2.2-Lightning/Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/high_noise_model"
                  ".safetensors", expert="high"),
            _lora("lightx2v/Wan2.2-Lightning/Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/low_noise_model"
                  ".safetensors", expert="low")]),
        source=f"{_LIGHTNING}: wan/configs/wan_i2v_A14B.py (sample_steps 4, sample_shift 5.0, sample_guide_scale "
               "(1.0, 1.0), boundary 0.900), generate.py (sample_solver euler), README (I2V V1 folder)",
        note=_A14B_NOTE + " The file names inside the hub folder are the source's config names; the hub listing "
                          "itself was not read (no network here).", sigma_shift=DISTILL_SHIFT),
    Recipe(
        name="causvid-3step", label="CausVid 3-step (Kijai's LoRA of the bidirectional 1.3B)",
        model_ids=("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",),
        values={
            "num_inference_steps": 3,  # CausVid configs/wan_bidirectional_dmd_from_scratch.yaml: 3 timesteps
            "guidance_scale": 1.0,  # a DMD generator: one call per step (the teacher's guidance 3.5 is trained in)
            "scheduler": "lcm",  # bidirectional_inference.py: clean estimate, re-noised with fresh noise each step
            "sigmas": CAUSVID_SIGMAS,  # denoising_step_list 1000, 757, 522 as sigma = t / 1000
            "loras": (_lora("Kijai/WanVideo_comfy/Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32.safetensors"),),
        },
        source=f"{_CAUSVID}: configs/wan_bidirectional_dmd_from_scratch.yaml, causvid/models/wan/"
               "bidirectional_inference.py, README ('Bidirectional Model 2 ... performs slightly better'); the LoRA: "
               "Kijai/WanVideo_comfy (its README names tianweiy/CausVid as the 1.3B source)",
        note="Steps, sigmas and sampler are CausVid's own for the fine-tuned model the LoRA was extracted from "
             "(bidirectional checkpoint 2, by its name); scale 1 is the extraction at full strength. No "
             "recommendation for the LoRA itself was found (ComfyUI users report lower scales with more steps): "
             "unverified for the LoRA."),
)


def _model_ids(model: Any) -> tuple[str, ...]:
    """The registry ids a model answers to: its id (a hub id, or a ``ModelSpec``'s), plus the registry model a local
    copy matches (``ModelSpec.copy_of``)."""
    if isinstance(model, str):
        from loopui.models.registry import resolve_model_id

        return (resolve_model_id(model),)
    return tuple(i for i in (getattr(model, "model_id", None), getattr(model, "copy_of", None)) if i)


def recipes_for(model_id_or_spec: Any) -> list[Recipe]:
    """The recipes of a model: a registry id, or a ``ModelSpec`` (a local copy of a registry model gets that model's);
    [] for a model without any."""
    ids = set(_model_ids(model_id_or_spec))
    return [recipe for recipe in RECIPES if ids & set(recipe.model_ids)]


def recipe_names() -> list[str]:
    """Every recipe name, once each, in registry order."""
    return list(dict.fromkeys(recipe.name for recipe in RECIPES))


def find_recipe(model_id_or_spec: Any, name: str) -> Recipe:
    """The recipe ``name`` of a model; ``ValueError`` naming ``recipe`` for an unknown name or a recipe that is not
    for that model (saying which ones it has)."""
    text = str(name).strip() if name is not None else ""
    ids = _model_ids(model_id_or_spec)
    label = ids[0] if ids else "this model"
    for recipe in recipes_for(model_id_or_spec):
        if recipe.name == text:
            return recipe
    mine = ", ".join(dict.fromkeys(r.name for r in recipes_for(model_id_or_spec)))
    has = f"{label}'s recipes: {mine}" if mine else f"{label} has no recipes"
    if text not in recipe_names():
        raise ValueError(f"recipe: unknown recipe {text!r}; {has}")
    others = ", ".join(sorted({m for r in RECIPES if r.name == text for m in r.model_ids}))
    raise ValueError(f"recipe: {text!r} is not a recipe for {label} (it is for {others}); {has}")


def recipe_values(model_id: Any, name: str) -> dict:
    """The ``LoopRequest`` values recipe ``name`` sets for ``model_id`` (a fresh dict: LoRAs and sigmas as lists);
    ``ValueError`` naming ``recipe`` for an unknown name or a recipe that is not for that model."""
    values = dict(find_recipe(model_id, name).values)
    for key in ("loras", "sigmas"):
        if key in values:
            values[key] = list(values[key])
    return values


@dataclass(frozen=True)
class RecipeFill:
    """What :func:`fill_recipe` did: the values to plan, the knobs it filled, and notes to show the user."""

    recipe: Recipe
    values: dict
    filled: tuple[str, ...]
    notes: tuple[str, ...]

    def record(self) -> dict:
        """What a sidecar keeps: the recipe's name and the knobs it set (the values themselves are in the settings)."""
        return {"name": self.recipe.name, "filled": list(self.filled)}


def _left_out(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in ("", "auto")
    return isinstance(value, (list, tuple)) and not value


def _whole_or_none(value: Any) -> Optional[int]:
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _lora_items(value: Any) -> list:
    """The caller's LoRAs as a list of items as given (strings, pairs, mappings, ``LoraRef``-like objects)."""
    if _left_out(value):
        return []
    if isinstance(value, str):
        return [line for line in value.splitlines() if line.strip()]
    if isinstance(value, (list, tuple)):  # as parse_loras reads it: a list of LoRAs
        return list(value)
    return [value]


def _lora_source(item: Any) -> str:
    """The source text of one LoRA item, without a trailing ``:scale[:expert]``."""
    source = getattr(item, "source", None)
    if source is None and isinstance(item, Mapping):
        source = item.get("source")
    if source is None and isinstance(item, (list, tuple)) and item:
        source = item[0]
    text = str(source if source is not None else item).strip()
    match = re.match(r"^(.*?\.safetensors)(:[^/\\]*)?$", text, flags=re.IGNORECASE)
    return (match.group(1) if match else text).replace("\\", "/")


def _path_in_repo(hub_source: str) -> str:
    return "/".join(hub_source.split("/")[2:])


def fill_recipe(values: Mapping[str, Any], model: Any, name: str) -> RecipeFill:
    """``values`` (loose ``LoopRequest`` values from a CLI, an API call or a form) with recipe ``name`` of ``model``
    (a registry id or a ``ModelSpec``) filled in where they were left out (missing, ``None``, ``""``, ``"auto"``, no
    LoRAs). What the caller gave wins:

    - a sigma list is one value per step: the caller's sets the steps; the recipe's is filled when the steps are left
      out or its count, made anew for other steps when the recipe has a rule for it (``sigma_shift``), and left out
      when a ``flow_shift`` was given (a note says so);
    - LoRAs add up: the caller's first, then the recipe's, except a recipe file the caller gives a copy of (a
      LoRA whose path ends with the file's path in its repo: a download of it, or the hub file at another scale).

    ``ValueError`` naming ``recipe`` for an unknown name or a recipe that is not for that model.
    """
    recipe = find_recipe(model, name)
    out = dict(values)
    filled: list[str] = []
    notes: list[str] = []
    given_steps = None if _left_out(out.get("num_inference_steps")) else _whole_or_none(out["num_inference_steps"])
    for key, value in recipe.values.items():
        if key == "loras":
            continue
        if not _left_out(out.get(key)):
            continue
        if key == "num_inference_steps" and not _left_out(out.get("sigmas")):
            continue  # the caller's sigma list sets the steps (one per value)
        if key == "sigmas":
            if not _left_out(out.get("flow_shift")):
                notes.append(f"recipe {recipe.name}: flow_shift given, so its sigmas are left out")
                continue
            if given_steps is not None and given_steps != len(value):
                if recipe.sigma_shift is None or given_steps <= 0:
                    notes.append(f"recipe {recipe.name}: its sigmas are for {len(value)} steps, so with "
                                 f"{given_steps} steps they are left out and the scheduler spaces the steps")
                    continue
                value = shifted_sigmas(given_steps, recipe.sigma_shift)
                notes.append(f"recipe {recipe.name}: {given_steps} sigmas made its way (timesteps evenly spaced, "
                             f"shift {recipe.sigma_shift:g})")
            value = list(value)
        out[key] = value
        filled.append(key)
    if recipe.values.get("loras"):
        mine = _lora_items(out.get("loras"))
        sources = [_lora_source(item) for item in mine]
        added = []
        for lora in recipe.values["loras"]:
            hub_source = _lora_source(lora)
            inside = _path_in_repo(hub_source)
            copy = next((s for s in sources if s == inside or s.endswith("/" + inside)), None)
            if copy is None:
                added.append(lora)
            elif copy != hub_source:
                notes.append(f"recipe {recipe.name}: {copy} stands in for its {hub_source}")
        if added:
            out["loras"] = mine + added
            filled.append("loras")
    return RecipeFill(recipe=recipe, values=out, filled=tuple(filled), notes=tuple(notes))
