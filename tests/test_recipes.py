"""Speed recipes: every recipe plans for its model, fills only what the caller left out, is refused in one line
naming ``recipe`` for another model, puts its LoRAs into both experts of Wan 2.2 A14B and runs there at its steps
without CFG; the CLI's ``--recipe`` with a LoRA file written in code standing in for the hub file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loopui.engine import generate_loop
from loopui.engine.plan import plan_loop
from loopui.engine.request import knob_info, request_from_values
from loopui.engine.schedules import distilled_sigmas
from loopui.models import REGISTRY, spec_for
from loopui.models.lora import is_hub_source, lora_status
from loopui.models.recipes import (RECIPE_KNOBS, RECIPES, fill_recipe, find_recipe, recipe_names, recipe_values,
                                   recipes_for, shifted_sigmas)
from loopui.testing.lora_files import lora_delta, write_lora

WAN13 = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
A14B = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
CAUSVID_FILE = "Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32.safetensors"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- the recipes as data ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.name}-{r.model_ids[0].split('/')[1]}")
def test_every_recipe_plans_for_its_model_as_it_says(recipe):
    for model_id in recipe.model_ids:
        spec = REGISTRY[model_id]
        assert spec.family == "wan" and recipe in recipes_for(model_id) and recipe.source and recipe.label
        values = recipe_values(model_id, recipe.name)
        image = {"image": np.zeros((480, 832, 3), np.uint8)} if spec.image_to_video else {}
        plan = plan_loop(request_from_values({"prompt": "waves", **image, **values}), spec)
        assert plan.num_inference_steps == values["num_inference_steps"] == len(values["sigmas"])
        assert plan.guidance_scale == 1.0 and plan.guidance_scale_2 in (None, 1.0)  # no CFG, both experts
        assert plan.scheduler == values["scheduler"] and list(plan.sigmas) == values["sigmas"]
        if recipe.sigma_shift is not None:  # the source's rule, as the engine computes it
            assert tuple(values["sigmas"]) == distilled_sigmas(len(values["sigmas"]), recipe.sigma_shift)
        loras = plan.request.loras
        assert loras and all(is_hub_source(lora.source) and lora.scale == 1.0 for lora in loras)
        assert sorted(lora.expert for lora in loras) == (["high", "low"] if spec.experts == 2 else ["both"])


def test_recipes_set_only_automatic_knobs_and_names_are_unique_per_model():
    for knob in RECIPE_KNOBS:  # "left out" is never ambiguous: each knob's default is automatic
        assert knob_info(knob)["default"] in (None, ())
    pairs = [(model_id, recipe.name) for recipe in RECIPES for model_id in recipe.model_ids]
    assert len(pairs) == len(set(pairs))
    assert recipe_names() == ["lightx2v-4step", "lightning-4step", "causvid-3step"]
    for steps in (1, 3, 4, 8):
        assert shifted_sigmas(steps, 5.0) == distilled_sigmas(steps, 5.0)


@pytest.mark.parametrize("model, name, needle", [
    (WAN13, "turbo", "recipe: unknown recipe 'turbo'; Wan-AI/Wan2.1-T2V-1.3B-Diffusers's recipes: causvid-3step"),
    (WAN13, "lightx2v-4step", "recipe: 'lightx2v-4step' is not a recipe for Wan-AI/Wan2.1-T2V-1.3B-Diffusers (it is "
                              "for Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
    ("THUDM/CogVideoX-5b", "causvid-3step", "THUDM/CogVideoX-5b has no recipes"),
])
def test_an_unknown_recipe_or_another_models_is_refused_naming_recipe(model, name, needle):
    with pytest.raises(ValueError) as info:
        recipe_values(model, name)
    assert str(info.value).startswith("recipe: ") and needle in str(info.value) and "\n" not in str(info.value)


def test_a_recipe_fills_only_what_was_left_out():
    model = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    hub = recipe_values(model, "lightx2v-4step")["loras"][0]
    fill = fill_recipe({"prompt": "x", "guidance_scale": 2.5, "scheduler": "", "num_inference_steps": "8",
                        "loras": ["style.safetensors:0.5"]}, model, "lightx2v-4step")
    values = fill.values
    assert values["guidance_scale"] == 2.5 and values["scheduler"] == "euler"  # given: kept; "" = left out
    assert values["num_inference_steps"] == "8" and values["sigmas"] == list(distilled_sigmas(8, 5.0))
    assert values["loras"] == ["style.safetensors:0.5", hub]  # the caller's first, the recipe's added
    assert fill.filled == ("scheduler", "sigmas", "loras") and "8 sigmas made its way" in fill.notes[0]
    # a flow shift given: no sigma list (the plan refuses the two together); a sampler without a rule: none either
    assert "sigmas" not in fill_recipe({"flow_shift": 3}, model, "lightx2v-4step").values
    mine = fill_recipe({"sigmas": "1, 0.8, 0.4"}, model, "lightx2v-4step").values  # they set the steps
    assert "num_inference_steps" not in mine and request_from_values(mine).sigmas == (1.0, 0.8, 0.4)
    causvid = fill_recipe({"num_inference_steps": 6}, WAN13, "causvid-3step")
    assert "sigmas" not in causvid.values and "left out" in causvid.notes[0]
    # the recipe's file at another scale, or a downloaded copy of it, stands in for it (nothing added twice)
    assert fill_recipe({"loras": [hub.replace(":1", ":0.6")]}, model, "lightx2v-4step").values["loras"] == \
        [hub.replace(":1", ":0.6")]
    copy = "/data/loras/lightx2v/wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors:0.8"
    fill = fill_recipe({"loras": copy}, model, "lightx2v-4step")
    assert fill.values["loras"] == copy and "stands in for" in fill.notes[0] and "loras" not in fill.filled
    request = request_from_values({"prompt": "x", **fill.values})  # what the CLI and the API then do
    assert (request.num_inference_steps, request.guidance_scale, len(request.sigmas)) == (4, 1.0, 4)


def test_a_local_copy_of_a_registry_model_has_its_recipes(tmp_path):
    """A downloaded folder whose configs match a registry model (its fingerprint) gets that model's recipes."""
    from loopui.testing.faithful import load_config

    config = load_config(WAN13)
    for name, data in (("model_index.json", config["model_index"]), ("transformer/config.json",
                                                                      config["transformer"]),
                       ("vae/config.json", config["vae"])):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(data))
    spec = spec_for(str(tmp_path))
    assert spec.copy_of == WAN13 and spec.model_id == str(tmp_path)
    assert [r.name for r in recipes_for(spec)] == ["causvid-3step"]
    assert find_recipe(spec, "causvid-3step").model_ids == (WAN13,)


# -- Wan 2.2 A14B: both experts, the recipe's steps, no CFG ----------------------------------------------------------

def test_wan22_a14b_recipe_puts_a_lora_into_each_expert_and_runs_its_steps_without_cfg(tmp_path, monkeypatch):
    """The faithful A14B (real configs, shrunk): the recipe's two hub files (written in code, served by a patched
    hub download) go into their experts; the loop makes one model call per step (no CFG pass), the high-noise
    expert at the first two steps, the low-noise one at the last two, all on the recipe's shifted sigmas."""
    import huggingface_hub

    from loopui.testing.faithful import build_faithful_pipeline

    pipe = build_faithful_pipeline(A14B)
    pipe.register_to_config(_name_or_path=A14B)
    assert pipe.config.boundary_ratio == 0.875
    recipe = find_recipe(A14B, "lightx2v-4step")
    stand_ins = {}
    for seed, lora in enumerate(recipe.values["loras"], start=1):
        hub = lora.split(":")[0]
        stand_ins["/".join(hub.split("/")[2:])] = write_lora(pipe.transformer, tmp_path / f"{seed}.safetensors",
                                                             "comfy", seed=seed)
    asked = []

    def fake_download(repo, filename, **kwargs):
        asked.append(f"{repo}/{filename}")
        return str(stand_ins[filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    calls = {"transformer": [], "transformer_2": []}
    for name in calls:
        def record(module, args, kwargs, name=name):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            calls[name].append((hidden.shape[0], float(kwargs["timestep"].flatten()[0])))

        getattr(pipe, name).register_forward_pre_hook(record, with_kwargs=True)
    values = fill_recipe({"prompt": "a koi pond", "height": 32, "width": 32, "num_frames": 9, "seam_polish": "off"},
                         A14B, "lightx2v-4step").values
    result = generate_loop(pipe, request_from_values(values), output_type="latent")

    assert sorted(asked) == sorted(lora.split(":")[0] for lora in recipe.values["loras"])
    high, low = (stand_ins[f.split(":")[0].split("/", 2)[2]] for f in recipe.values["loras"])
    loaded = dict(lora_status(pipe)["loaded"])
    assert loaded == {"transformer": "lora_" + _sha(high)[:16], "transformer_2": "lora_" + _sha(low)[:16]}
    for component, path in (("transformer", high), ("transformer_2", low)):
        module = getattr(pipe, component)
        name, change = next(iter(lora_delta(module, path).items()))
        added = module.get_submodule(name).get_delta_weight(loaded[component]).double()
        assert torch.allclose(added, change, atol=1e-6), component  # that expert's own file, at scale 1
    assert result.settings["num_inference_steps"] == 4 and result.plan.guidance_scale_2 == 1.0
    assert calls["transformer"] == [(1, 1000.0), (1, 937.5)]  # batch 1: no unconditional pass
    assert [(b, round(t, 1)) for b, t in calls["transformer_2"]] == [(1, 833.3), (1, 625.0)]


# -- the command line ------------------------------------------------------------------------------------------------

@pytest.fixture()
def faithful_cli(monkeypatch, faithful_wan_dir):
    """The CLI's model manager serves Wan 2.1 T2V 1.3B from the saved faithful folder; the hub is never asked."""
    import huggingface_hub

    import loopui.models
    from faithful_serving import FaithfulManager

    monkeypatch.setattr(loopui.models, "ModelManager",
                        lambda **kwargs: FaithfulManager({WAN13: faithful_wan_dir}, **kwargs))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("hub asked"))


def test_cli_recipe_with_a_local_stand_in_for_its_lora(faithful_cli, tmp_path, capsys):
    """``--recipe causvid-3step`` with a downloaded copy of the recipe's file (written in code, ComfyUI keys as
    Kijai's files): the recipe's steps, guidance, sampler and sigmas are used, the copy stands in for the hub file,
    and the sidecar records the recipe and the file's sha256."""
    from loopui.cli import main
    from loopui.testing.faithful import build_faithful_pipeline

    stand_in = write_lora(build_faithful_pipeline(WAN13).transformer, tmp_path / "dl" / CAUSVID_FILE, "comfy")
    out = tmp_path / "loop.gif"
    code = main(["generate", "--model", WAN13, "--prompt", "a koi pond", "--height", "32", "--width", "32",
                 "--frames", "9", "--recipe", "causvid-3step", "--lora", str(stand_in), "-q", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"loopui: note: recipe causvid-3step: {stand_in} stands in for its Kijai/WanVideo_comfy/" in err
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["recipe"] == {"name": "causvid-3step",
                                 "filled": ["num_inference_steps", "guidance_scale", "scheduler", "sigmas"]}
    assert list(sidecar)[:3] == ["loopui_version", "created", "model"] and list(sidecar)[3] == "recipe"
    settings = sidecar["settings"]
    assert (settings["num_inference_steps"], settings["guidance_scale"], settings["scheduler"]) == (3, 1.0, "lcm")
    assert settings["sigmas"] == [1.0, 0.757, 0.522]
    (lora,) = settings["loras"]
    assert (lora["file"], lora["sha256"], lora["scale"]) == (CAUSVID_FILE, _sha(stand_in), 1.0)


def test_cli_flags_given_win_over_the_recipe():
    from loopui.cli import build_request
    from loopui.cli.main import build_parser

    args = build_parser().parse_args(["generate", "--model", WAN13, "--prompt", "x", "-o", "x.mp4", "--recipe",
                                      "causvid-3step", "--steps", "6", "--guidance", "2", "--scheduler", "euler"])
    plan = build_request(args, spec_for(WAN13))
    assert (plan.num_inference_steps, plan.guidance_scale, plan.scheduler, plan.sigmas) == (6, 2.0, "euler", None)
    assert [lora.source for lora in plan.request.loras] == [f"Kijai/WanVideo_comfy/{CAUSVID_FILE}"]
    assert any("its sigmas are for 3 steps" in note for note in plan.notes)


@pytest.mark.parametrize("model, recipe, needle", [
    (WAN13, "turbo", "loopui: error: recipe: unknown recipe 'turbo'; "),
    ("demo", "lightx2v-4step", "loopui: error: recipe: 'lightx2v-4step' is not a recipe for "
                               "loopui/tiny-random-cogvideox"),
])
def test_cli_refuses_an_unknown_recipe_or_another_models_in_one_line(monkeypatch, tmp_path, capsys, model, recipe,
                                                                    needle):
    from loopui.cli import main
    from loopui.models import ModelManager

    monkeypatch.setattr(ModelManager, "run", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["generate", "--model", model, "--prompt", "x", "--recipe", recipe, "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(needle) and err.endswith("[--recipe]")


def test_cli_models_and_help_list_the_recipes(capsys):
    from loopui.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    listing = out[out.index("Speed recipes"):]
    for recipe in RECIPES:
        for model_id in recipe.model_ids:
            block = listing[listing.index(f"  {model_id}\n"):]
            assert f"    {recipe.name}: {recipe.summary()}" in block.split("\n  W")[0]
    assert main(["models", WAN13]) == 0
    out = capsys.readouterr().out
    assert "causvid-3step: 3 steps, no CFG, lcm, sigmas 1, 0.757, 0.522" in out and "lightx2v-4step" not in out
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name} (" in text for name in recipe_names())
