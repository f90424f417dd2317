"""The models room: registry lookups, folder specs, lazy thread-safe loading and caching, the memory policy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from loopui.models import (
    DEFAULT_MODEL_ID,
    DEMO_MODEL_ID,
    REGISTRY,
    ModelLoadError,
    ModelManager,
    choose_memory_policy,
    spec_for,
    spec_for_pipeline,
)

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _fake_folder(root: Path, pipeline_class: str = "CogVideoXPipeline", **transformer) -> Path:
    """A folder with only the JSON files ``spec_for`` reads (no weights: spec_for must not load anything)."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    (root / "transformer").mkdir()
    config = {"sample_frames": 49, "sample_height": 60, "sample_width": 90, "temporal_compression_ratio": 4,
              "use_rotary_positional_embeddings": True, "num_layers": 1, "num_attention_heads": 2,
              "in_channels": 4, **transformer}
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    return root


# -- import cost ----------------------------------------------------------------------------------------------------

def test_import_pulls_in_no_gradio_diffusers_or_torch():
    code = (
        "import json, sys\n"
        "import loopui, loopui.models\n"
        "from loopui.models import REGISTRY, DEFAULT_MODEL_ID, DEMO_MODEL_ID, ModelManager, spec_for\n"
        "spec_for('demo'); ModelManager()\n"
        "torch_after_models = 'torch' in sys.modules\n"
        "import loopui.engine.request\n"
        "print(json.dumps({'torch_after_models': torch_after_models,\n"
        "                  'heavy': sorted(m for m in ('gradio', 'diffusers') if m in sys.modules)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"torch_after_models": False, "heavy": []}


# -- registry -------------------------------------------------------------------------------------------------------

def test_registry_holds_the_cogvideox_family_and_the_demo():
    assert DEFAULT_MODEL_ID == "THUDM/CogVideoX-5b" and DEFAULT_MODEL_ID in REGISTRY
    five, two, i2v = REGISTRY["THUDM/CogVideoX-5b"], REGISTRY["THUDM/CogVideoX-2b"], REGISTRY["THUDM/CogVideoX-5b-I2V"]
    assert (five.rotary, two.rotary, i2v.rotary) == (True, False, True)
    assert (five.image_to_video, two.image_to_video, i2v.image_to_video) == (False, False, True)
    assert i2v.pipeline_class == "CogVideoXImageToVideoPipeline"
    assert {s.trained_latent_frames for s in (five, two, i2v)} == {13}
    assert (five.scheduler, two.scheduler) == ("dpm", "ddim")
    assert (five.cuda_dtype, two.cuda_dtype) == ("bfloat16", "float16")
    assert (five.native_height, five.native_width, five.native_num_frames) == (480, 720, 49)
    demo = spec_for("demo")
    assert demo is REGISTRY[DEMO_MODEL_ID] and demo.builtin
    assert (demo.native_height, demo.native_width) == (64, 96)


def test_unknown_hub_id_is_refused_and_lists_known_models():
    with pytest.raises(ValueError) as info:
        spec_for("someone/VideoModel-XL")
    message = str(info.value)
    assert "someone/VideoModel-XL" in message and DEFAULT_MODEL_ID in message and "demo" in message


# -- family facts ---------------------------------------------------------------------------------------------------

def test_every_registry_entry_agrees_with_its_familys_facts():
    from loopui.models.family_facts import FAMILY_FACTS, facts_for_pipeline

    for spec in REGISTRY.values():
        facts = facts_for_pipeline(spec.pipeline_class)
        assert (facts.name, facts.pipelines[spec.pipeline_class]) == (spec.family, spec.image_to_video), spec.model_id
        assert FAMILY_FACTS[spec.family] is facts
    with pytest.raises(ValueError, match=r"unsupported pipeline class 'FluxPipeline' \(supported: CogVideoXPipeline, "):
        facts_for_pipeline("FluxPipeline")


def test_the_engine_families_are_the_family_facts_the_registry_reads():
    from loopui.engine.families import FAMILIES
    from loopui.models.family_facts import FAMILY_FACTS

    assert set(FAMILIES) == set(FAMILY_FACTS)
    for name, family in FAMILIES.items():
        facts = FAMILY_FACTS[name]
        assert isinstance(family, type(facts)) and family.name == name
        assert dict(family.pipelines) == dict(facts.pipelines)
        assert family.facts_from_config({}, None, None, "x") == facts.facts_from_config({}, None, None, "x")


# -- folder specs ---------------------------------------------------------------------------------------------------

def test_spec_for_a_saved_tiny_model_reads_its_configs(tiny_model_dir):
    spec = spec_for(tiny_model_dir)
    assert spec.pipeline_class == "CogVideoXPipeline" and not spec.image_to_video
    assert spec.trained_latent_frames == 13 and spec.rotary
    assert (spec.native_height, spec.native_width) == (480, 720)  # 60x90 latents * 8
    assert spec.local_path == str(Path(tiny_model_dir).resolve())


@pytest.mark.parametrize("transformer, pipeline_class, expected", [
    ({"sample_frames": 81, "use_rotary_positional_embeddings": False}, "CogVideoXPipeline", (21, False, False)),
    ({"sample_frames": 25}, "CogVideoXImageToVideoPipeline", (7, True, True)),
    ({"sample_frames": 49, "sample_height": 30, "sample_width": 40}, "CogVideoXPipeline", (13, True, False)),
])
def test_spec_for_folder_reads_length_rotary_and_i2v(tmp_path, transformer, pipeline_class, expected):
    spec = spec_for(_fake_folder(tmp_path / "m", pipeline_class, **transformer))
    assert (spec.trained_latent_frames, spec.rotary, spec.image_to_video) == expected
    assert spec.native_height == transformer.get("sample_height", 60) * 8
    assert spec.scheduler is None  # unknown architecture: keep the pipeline's own scheduler


def test_local_copy_of_a_registry_model_gets_its_recommendations(tmp_path):
    folder = _fake_folder(tmp_path / "cogvideox-2b", num_layers=30, num_attention_heads=30, in_channels=16,
                          use_rotary_positional_embeddings=False)
    spec = spec_for(folder)
    reference = REGISTRY["THUDM/CogVideoX-2b"]
    assert (spec.scheduler, spec.cuda_dtype, spec.vram_gb) == (reference.scheduler, reference.cuda_dtype,
                                                                reference.vram_gb)
    assert spec.model_id == str(folder) and spec.local_path is not None


@pytest.mark.parametrize("make, needle", [
    (lambda p: _fake_folder(p, "StableDiffusionPipeline"), "StableDiffusionPipeline"),
    (lambda p: _fake_folder(p, patch_size_t=2), "patch_size_t"),
    (lambda p: p.mkdir() or p, "model_index.json"),
    (lambda p: p.parent / "does-not-exist", "does-not-exist"),
])
def test_bad_folders_raise_value_error_naming_the_problem(tmp_path, make, needle):
    with pytest.raises(ValueError, match=needle):
        spec_for(make(tmp_path / "m"))


def test_spec_for_pipeline_reads_the_built_transformer(tiny_pipe):
    spec = spec_for_pipeline(tiny_pipe)
    assert (spec.trained_latent_frames, spec.rotary, spec.image_to_video) == (13, True, False)
    assert spec.temporal_compression == 4


# -- memory policy --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("free_gib, need_gib, has_cuda, offload_gib, expected", [
    (80, 26, True, 16, "none"),        # H100: everything resident
    (24, 26, True, 16, "model"),       # 4090: one component at a time
    (12, 26, True, 16, "sequential"),  # 12 GB card: stream layers
    (26, 26, True, 16, "model"),       # exactly the need is not enough: headroom for the CUDA context
    (20, 26, True, None, "model"),     # default offload need: a share of the full need
    (8, 26, True, None, "sequential"),
    (0, 26, False, 16, "none"),        # CPU: nothing to offload to
    (0, 0, True, None, "none"),
])
def test_choose_memory_policy(free_gib, need_gib, has_cuda, offload_gib, expected):
    offload = None if offload_gib is None else offload_gib * GIB
    assert choose_memory_policy(free_gib * GIB, need_gib * GIB, has_cuda, offload) == expected


@pytest.mark.parametrize("free_gib, offload_gib, group_gib, expected", [
    (24, 16, 6, "model"),        # model offload fits: group offload is not needed
    (12, 16, 6, "group"),        # a 12 GB card: blocks streamed, the rest resident
    (6, 16, 6, "sequential"),    # group offload's peak does not fit the headroom either
    (12, 16, None, "sequential"),  # no estimate for group offload: not chosen blindly
])
def test_choose_memory_policy_group_offload_sits_between_model_and_sequential(free_gib, offload_gib, group_gib,
                                                                               expected):
    group = None if group_gib is None else group_gib * GIB
    assert choose_memory_policy(free_gib * GIB, 26 * GIB, True, offload_gib * GIB, group) == expected


def test_the_out_of_memory_ladder_and_the_offload_setting_know_group(monkeypatch):
    from loopui.models.memory import MEMORY_POLICIES, NEXT_POLICY, POLICY_TEXT, check_policy, offload_from_env

    ladder, policy = [], "none"
    while policy is not None:
        ladder.append(policy)
        policy = NEXT_POLICY[policy]
    assert ladder == ["none", "model", "group", "sequential"] and tuple(ladder) == MEMORY_POLICIES
    assert set(POLICY_TEXT) == set(MEMORY_POLICIES)
    assert check_policy(" Group ") == "group"
    monkeypatch.setenv("LOOPUI_OFFLOAD", "group")
    assert offload_from_env() == "group"


def test_memory_needs_of_a_quantized_pipeline_and_of_group_offload():
    pytest.importorskip("torchao")
    from loopui.models.memory import memory_needs
    from loopui.models.quantize import module_bytes, quantize_pipeline
    from loopui.testing.faithful import build_faithful_pipeline

    model = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    spec = REGISTRY[model]
    stock = build_faithful_pipeline(model, layers=3)
    need, offload_need, group_need = memory_needs(spec, stock)
    assert need == int(spec.vram_gb * GIB)  # the registry's figure, nothing saved
    # Model offload: the figure's activations beside the biggest component (here the text encoder); group offload:
    # the activations, the transformer outside its blocks and two of its three blocks.
    components = [m for m in stock.components.values() if isinstance(m, torch.nn.Module)]
    activations = int(spec.offload_vram_gb * GIB) - max(module_bytes(m) for m in components)
    assert offload_need == activations + max(module_bytes(m) for m in components)
    block = module_bytes(stock.transformer.blocks[0])
    outside = module_bytes(stock.transformer) - module_bytes(stock.transformer.blocks)
    assert group_need == activations + outside + 2 * block
    # Without activations (a tiny figure) the text encoder decides: a transformers T5 keeps its blocks a level down,
    # so diffusers' block-level grouping streams it whole.
    import dataclasses

    bare = dataclasses.replace(spec, offload_vram_gb=1e-9)
    single = build_faithful_pipeline(model, layers=1)
    encoder, transformer = module_bytes(single.text_encoder), module_bytes(single.transformer)
    assert encoder > transformer and memory_needs(bare, single)[2] == encoder
    quantized = build_faithful_pipeline(model, layers=3)
    quantize_pipeline(quantized, "int8")
    saved = module_bytes(stock.transformer) - module_bytes(quantized.transformer)
    q_need, _q_offload, q_group = memory_needs(spec, quantized)
    assert saved > 0 and q_need == need - saved
    assert q_group == activations + outside + 2 * module_bytes(quantized.transformer.blocks[0]) < group_need


def test_choose_memory_policy_rejects_negative_sizes():
    with pytest.raises(ValueError, match="-1"):
        choose_memory_policy(-1, 10, True)


def test_bad_offload_setting_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="'lots'"):
        ModelManager(offload="lots")
    monkeypatch.setenv("LOOPUI_OFFLOAD", "everything")
    with pytest.raises(ValueError, match="LOOPUI_OFFLOAD"):
        ModelManager().get("demo")


# -- manager --------------------------------------------------------------------------------------------------------

def test_manager_is_lazy_then_caches_a_folder_model(tiny_model_dir):
    manager = ModelManager()
    assert manager.load_count == 0 and manager.loaded() == []
    stages = []
    first = manager.get(str(tiny_model_dir), progress=lambda stage, fraction, message: stages.append(stage))
    assert stages[0] == "loading" and stages[-1] == "ready"
    assert type(first.pipe).__name__ == "CogVideoXPipeline"
    assert (first.device, first.dtype, first.policy) == ("cpu", "float32", "none")
    assert first.load_seconds > 0 and str(tiny_model_dir) in first.describe()
    second = manager.get(Path(tiny_model_dir))
    assert second is first and manager.load_count == 1


def test_concurrent_gets_load_once():
    manager = ModelManager()
    barrier = threading.Barrier(6)
    results, errors = [], []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(manager.get("demo"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == 6 and all(r is results[0] for r in results)
    assert manager.load_count == 1


def test_release_and_switching_models(tiny_model_dir):
    manager = ModelManager()
    folder = manager.get(tiny_model_dir)
    demo = manager.get("demo")  # switching releases the folder model (max_models=1)
    assert manager.loaded() == [demo] and manager.load_count == 2
    assert manager.release("someone/unknown") == 0
    assert manager.release(DEMO_MODEL_ID) == 1 and manager.loaded() == []
    again = manager.get(tiny_model_dir)
    assert again is not folder and manager.load_count == 3
    assert manager.release() == 1 and manager.loaded() == []


def test_max_models_keeps_several(tiny_model_dir):
    manager = ModelManager(max_models=2)
    manager.get(tiny_model_dir)
    manager.get("demo")
    assert len(manager.loaded()) == 2
    manager.get(tiny_model_dir)
    assert manager.load_count == 2
    assert manager.release(str(tiny_model_dir)) == 1
    assert [m.spec.model_id for m in manager.loaded()] == [DEMO_MODEL_ID]


def test_demo_model_is_built_in_code_not_loaded(monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("the demo model must not be loaded from disk or hub")

    monkeypatch.setattr(diffusers.CogVideoXPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.CogVideoXPipeline, "download", refuse)
    loaded = ModelManager().get("demo", dtype="bf16")
    assert loaded.dtype == "bfloat16" and str(loaded.pipe.transformer.dtype) == "torch.bfloat16"
    spec = spec_for_pipeline(loaded.pipe)
    assert spec.model_id == DEMO_MODEL_ID and (spec.native_height, spec.native_width) == (64, 96)


def test_bad_dtype_and_device_are_value_errors():
    manager = ModelManager()
    with pytest.raises(ValueError, match="float99"):
        manager.get("demo", dtype="float99")
    with pytest.raises(ValueError, match="tpu9"):
        manager.get("demo", device="tpu9")
    assert manager.load_count == 0


def test_incomplete_folder_is_a_model_load_error(tiny_model_dir, tmp_path):
    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        ModelManager().get(broken)
    message = str(info.value)
    assert str(broken) in message and "\n" not in message


def test_hub_model_offline_is_a_model_load_error_with_advice(tmp_path, monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1; an empty cache means the hub would be needed, so loading must fail fast.
    manager = ModelManager(cache_dir=tmp_path, local_files_only=True)
    stages = []
    with pytest.raises(ModelLoadError) as info:
        manager.get("THUDM/CogVideoX-2b", progress=lambda stage, fraction, message: stages.append(stage))
    message = str(info.value)
    assert "THUDM/CogVideoX-2b" in message and "hf download THUDM/CogVideoX-2b" in message
    assert stages == ["downloading"] and manager.load_count == 0


def test_a_custom_loader_serves_a_hub_id_and_the_pipeline_is_named_after_it(tiny_model_dir):
    import diffusers

    from loopui.models import PipelineLoader

    class FolderLoader(PipelineLoader):
        def from_pretrained(self, spec, torch_dtype, progress, cancel=None):
            progress("loading", None, "from a folder")
            return diffusers.CogVideoXPipeline.from_pretrained(tiny_model_dir, dtype=torch_dtype)

    manager = ModelManager(loader=FolderLoader())
    stages = []
    loaded = manager.get("THUDM/CogVideoX-2b", progress=lambda stage, fraction, message: stages.append(stage))
    assert stages == ["loading", "ready"] and manager.load_count == 1
    assert loaded.pipe.name_or_path == "THUDM/CogVideoX-2b"  # not the folder: results and sidecars name the hub id
    assert spec_for_pipeline(loaded.pipe).scheduler == REGISTRY["THUDM/CogVideoX-2b"].scheduler
    with pytest.raises(ValueError, match="^loader: "):
        ModelManager(loader=FolderLoader(), local_files_only=True)


# -- Wan folders ----------------------------------------------------------------------------------------------------

def _real_config_folder(root: Path, model_id: str) -> Path:
    """A folder holding only the JSON files of ``model_id``'s real diffusers repo (model_index and component configs,
    as stored in loopui/testing/configs): what a downloaded copy looks like to spec_for, without weights."""
    from loopui.testing.faithful import load_config

    stored = load_config(model_id)
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(stored["model_index"]))
    for name in ("transformer", "transformer_2", "vae"):
        if name in stored:
            (root / name).mkdir()
            (root / name / "config.json").write_text(json.dumps(stored[name]))
    return root


@pytest.mark.parametrize("model_id", ["Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                                      "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
                                      "THUDM/CogVideoX-5b-I2V"])
def test_a_downloaded_copy_of_a_registry_model_is_recognised(tmp_path, model_id):
    spec = spec_for(_real_config_folder(tmp_path / "copy", model_id))
    known = REGISTRY[model_id]
    assert spec.local_path is not None and "Local copy of " + model_id in spec.description
    for name in ("family", "image_to_video", "trained_latent_frames", "native_fps", "native_height", "native_width",
                 "spatial_compression", "size_multiple", "experts", "flow_shift", "guidance_scale", "learned_positions",
                 "fixed_size"):
        assert getattr(spec, name) == getattr(known, name), name


def test_an_unknown_wan_folder_gets_the_familys_facts(tmp_path):
    from loopui.testing.faithful import save_faithful_pipeline

    folder = save_faithful_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", tmp_path / "tiny-wan")
    spec = spec_for(folder)
    assert (spec.family, spec.pipeline_class, spec.trained_latent_frames, spec.temporal_compression) == (
        "wan", "WanPipeline", 21, 4)
    assert spec.scheduler is None and spec.native_fps == 16  # unknown size: keep the pipeline's own scheduler
    loaded = ModelManager().get(str(folder))
    assert type(loaded.pipe).__name__ == "WanPipeline"


def test_registry_lists_the_wan_family():
    wan = [s for s in REGISTRY.values() if s.family == "wan"]
    assert {s.model_id for s in wan} >= {"Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers",
                                         "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"}
    small = REGISTRY["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]
    assert (small.native_width, small.native_height, small.native_num_frames, small.native_fps) == (832, 480, 81, 16)
    assert small.vram_gb <= 20 and small.license == "Apache-2.0"
