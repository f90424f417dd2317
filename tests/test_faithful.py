"""Config-faithful test models: the stored configs are the hub's, and the tiny builds differ from them only in size."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from loopui.testing.faithful import (
    FAITHFUL_MODELS,
    IGNORED_KEYS,
    LIBRARY_REWRITTEN_KEYS,
    METADATA_KEYS,
    MODEL_COMPONENTS,
    SHRUNK_KEYS,
    build_faithful_pipeline,
    build_true_size,
    component_class_name,
    count_true_size_weights,
    load_config,
    save_faithful_pipeline,
    shrunk_overrides,
)

_PIPES: dict = {}


def _pipe(model_id: str):
    """One build per model for the whole module: building is what the config test checks, running reuses it."""
    if model_id not in _PIPES:
        _PIPES[model_id] = build_faithful_pipeline(model_id)
    return _PIPES[model_id]


def _plain(value):
    """Tuples and lists compare equal (a config built from JSON keeps lists; constructors may keep tuples)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _built_config(module) -> dict:
    config = module.config
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def _hub_text(config: dict) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The stored facts


def test_every_model_has_a_config_with_sources_and_recommendations():
    for model_id in FAITHFUL_MODELS:
        cfg = load_config(model_id)
        assert cfg["model_id"] == model_id
        for name in ("model_index", "transformer", "vae", "scheduler", "text_encoder", "tokenizer", "recommended"):
            assert name in cfg, (model_id, name)
        covered = {s["component"] for s in cfg["sources"]}
        assert {"transformer", "vae", "scheduler", "text_encoder"} <= covered, model_id
        assert cfg["recommended"]["sources"], model_id


def test_stored_configs_reproduce_the_recorded_hub_file_hashes():
    """Where a hub file's hash was found, the stored JSON is that file byte for byte (diffusers' serialisation)."""
    checked = 0
    for model_id in FAITHFUL_MODELS:
        cfg = load_config(model_id)
        for source in cfg["sources"]:
            text = _hub_text(cfg[source["component"]]).encode()
            if "sha256" in source:
                assert hashlib.sha256(text).hexdigest() == source["sha256"], (model_id, source["hub_file"])
                checked += 1
            if "git_blob_sha1" in source:
                blob = hashlib.sha1(b"blob %d\0" % len(text) + text).hexdigest()
                assert blob == source["git_blob_sha1"], (model_id, source["hub_file"])
                checked += 1
    # Wan2.1 1.3B, Wan2.2 TI2V-5B: 5 files each; Wan2.2 T2V/I2V A14B: 6 each
    assert checked == 22


@pytest.mark.parametrize(
    "model_id, component, key, value",
    [
        ("THUDM/CogVideoX-2b", "vae", "scaling_factor", 1.15258426),
        ("THUDM/CogVideoX-5b", "vae", "scaling_factor", 0.7),
        ("THUDM/CogVideoX-2b", "scheduler", "snr_shift_scale", 3.0),
        ("THUDM/CogVideoX-5b", "scheduler", "snr_shift_scale", 1.0),
        ("THUDM/CogVideoX-2b", "transformer", "use_rotary_positional_embeddings", False),
        ("THUDM/CogVideoX-5b-I2V", "transformer", "use_learned_positional_embeddings", True),
        ("THUDM/CogVideoX-5b-I2V", "transformer", "use_rotary_positional_embeddings", True),
        ("THUDM/CogVideoX-5b-I2V", "transformer", "in_channels", 32),
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "transformer", "ffn_dim", 8960),
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "transformer", "num_attention_heads", 40),
        ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "transformer", "added_kv_proj_dim", 5120),
        ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "transformer", "image_dim", 1280),
        ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae", "z_dim", 48),
        ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae", "scale_factor_spatial", 16),
        ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "model_index", "expand_timesteps", True),
        ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "model_index", "boundary_ratio", 0.875),
        ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "model_index", "boundary_ratio", 0.9),
        ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "transformer", "image_dim", None),
    ],
)
def test_known_facts_are_stored(model_id, component, key, value):
    assert load_config(model_id)[component][key] == value


def test_cogvideox_5b_i2v_has_no_ofs_embedding():
    """Only CogVideoX 1.5 I2V has one; absent here means the constructor's default, None."""
    assert "ofs_embed_dim" not in load_config("THUDM/CogVideoX-5b-I2V")["transformer"]
    assert _pipe("THUDM/CogVideoX-5b-I2V").transformer.config.ofs_embed_dim is None


def test_full_size_architectures_match_the_hub_weight_files():
    """Stored weights x bytes per element = the hub safetensors' bytes, less only their JSON headers.

    A missing or extra tensor of more than ~50k weights, or any wrong width, would break this: it checks every
    dimension of the stored config, not just the keys listed.
    """
    checked = 0
    for model_id in FAITHFUL_MODELS:
        for component, facts in load_config(model_id).get("weights", {}).items():
            element = {"float32": 4, "bfloat16": 2}[facts["dtype"]]
            stored_bytes = count_true_size_weights(model_id, component) * element
            headers = facts["bytes"] - stored_bytes
            assert 0 < headers < 200_000, (model_id, component, headers)
            checked += 1
    assert checked == 8


def test_unknown_model_and_unknown_shrink_option_are_one_line_errors():
    with pytest.raises(ValueError, match="model_id: no faithful config for 'x/y'"):
        load_config("x/y")
    with pytest.raises(ValueError, match="shrink: unknown option"):
        shrunk_overrides("WanTransformer3DModel", {}, depth=3)


# ----------------------------------------------------------------------------------------------------------------
# The builds are the stored configs, shrunk only where SHRUNK_KEYS says


def _as_the_library_builds_it(class_name: str, stored: dict) -> dict:
    """The config transformers gives the full-size class built from the real config (meta device: no memory)."""
    import transformers
    from accelerate import init_empty_weights

    kwargs = {k: v for k, v in stored.items() if k not in METADATA_KEYS}
    config_class = transformers.UMT5Config if class_name == "UMT5EncoderModel" else transformers.T5Config
    with init_empty_weights():
        return getattr(transformers, class_name)(config_class(**kwargs)).config.to_dict()


def _assert_faithful(module, stored: dict, where: str) -> None:
    class_name = component_class_name(stored)
    assert type(module).__name__ == class_name, where
    built = _built_config(module)
    shrunk = SHRUNK_KEYS.get(class_name, ())
    overrides = shrunk_overrides(class_name, stored)
    assert set(overrides) <= set(shrunk), where
    for key, real in stored.items():
        if key in METADATA_KEYS or key in IGNORED_KEYS.get(class_name, ()):
            continue
        if key == "model_type":
            continue  # transformers config class attribute, equal by construction of the class
        expected = overrides.get(key, real)
        if key in LIBRARY_REWRITTEN_KEYS.get(class_name, ()):
            expected = _as_the_library_builds_it(class_name, stored)[key]
            assert expected != real  # still a rewrite; if transformers stops doing it, drop the entry
        assert _plain(built[key]) == _plain(expected), f"{where}.{key}: built {built[key]!r}, real {real!r}"
    assert not module.training, f"{where} is in train mode"
    assert all(not m.training for m in module.modules()), f"{where} has a submodule in train mode"


@pytest.mark.parametrize("model_id", FAITHFUL_MODELS)
def test_built_components_equal_the_real_configs_except_shrunk_keys(model_id):
    stored = load_config(model_id)
    pipe = _pipe(model_id)
    index = stored["model_index"]
    assert type(pipe).__name__ == index["_class_name"]
    for key in ("boundary_ratio", "expand_timesteps"):
        if key in index:
            assert pipe.config[key] == index[key], key
    for name in MODEL_COMPONENTS:
        module = getattr(pipe, name, None)
        if name in stored:
            _assert_faithful(module, stored[name], f"{model_id}:{name}")
            assert index[name][1] == type(module).__name__, name
        else:
            assert module is None and (name not in index or index[name] == [None, None]), name
    scheduler = stored["scheduler"]
    assert type(pipe.scheduler).__name__ == scheduler["_class_name"]
    for key, real in scheduler.items():
        if key not in METADATA_KEYS:
            assert _plain(pipe.scheduler.config[key]) == _plain(real), f"scheduler.{key}"
    if "image_processor" in stored:
        processor = pipe.image_processor.to_dict()
        for key, real in stored["image_processor"].items():
            if not key.startswith("_"):
                assert _plain(processor[key]) == _plain(real), f"image_processor.{key}"
    assert pipe.tokenizer.model_max_length == (
        stored["tokenizer"].get("model_max_length") or stored["tokenizer"]["model_max_length_used_by_pipeline"])


def test_rotary_dims_are_the_real_ones():
    """Heads shrink, the head dim does not: Wan's rope splits 128 into 44/42/42 and CogVideoX's is 64-wide."""
    wan = _pipe("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").transformer
    assert wan.config.attention_head_dim == 128
    assert (wan.rope.t_dim, wan.rope.h_dim, wan.rope.w_dim) == (44, 42, 42)
    cog = _pipe("THUDM/CogVideoX-5b").transformer
    assert cog.config.attention_head_dim == 64 and cog.config.use_rotary_positional_embeddings


# ----------------------------------------------------------------------------------------------------------------
# The stock pipelines run on them


def _run_kwargs(model_id: str) -> dict:
    kwargs = dict(prompt="a red fox", num_inference_steps=2, num_frames=9, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    if model_id == "THUDM/CogVideoX-5b-I2V":
        # diffusers accepts only the learned table's grid, 480x720; decoding 480x720 on a CPU costs ~20 s whatever
        # the VAE width (measured), so this run stops at the latents
        kwargs.update(height=480, width=720, output_type="latent", image=Image.new("RGB", (720, 480), "white"))
    elif model_id == "Wan-AI/Wan2.2-TI2V-5B-Diffusers":
        kwargs.update(height=64, width=64)  # 16x spatial VAE and patch 2: sides must be multiples of 32
    else:
        kwargs.update(height=32, width=48)
    if load_config(model_id)["model_index"]["_class_name"] == "WanImageToVideoPipeline":
        kwargs["image"] = Image.new("RGB", (kwargs["width"], kwargs["height"]), "white")
    return kwargs


@pytest.mark.parametrize("model_id", FAITHFUL_MODELS)
def test_two_step_generation_runs_with_the_stock_pipeline(model_id):
    pipe = _pipe(model_id)
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = []
    for name in calls:
        module = getattr(pipe, name, None)
        if module is not None:
            hooks.append(module.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1)))
    try:
        out = pipe(**_run_kwargs(model_id)).frames
    finally:
        for hook in hooks:
            hook.remove()
    out = np.asarray(out)
    if model_id == "THUDM/CogVideoX-5b-I2V":
        assert out.shape == (1, 3, 16, 60, 90)  # (B, T, C, H, W) latents: 9 frames -> 3
    else:
        size = (64, 64) if "TI2V" in model_id else (32, 48)
        assert out.shape == (1, 9, *size, 3)
    assert np.isfinite(out).all()
    if "A14B" in model_id:
        # boundary 0.875 / 0.9 of 1000: the first step (t=999) is the high-noise expert's, the second the other's
        assert calls["transformer"] > 0 and calls["transformer_2"] > 0, calls


def test_ti2v_5b_image_to_video_mode_runs_on_the_same_components():
    pipe = build_faithful_pipeline("Wan-AI/Wan2.2-TI2V-5B-Diffusers", pipeline_class="WanImageToVideoPipeline")
    assert type(pipe).__name__ == "WanImageToVideoPipeline" and pipe.config.expand_timesteps is True
    assert pipe.image_encoder is None
    kwargs = _run_kwargs("Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    out = pipe(image=Image.new("RGB", (64, 64), "white"), **kwargs).frames
    assert np.asarray(out).shape == (1, 9, 64, 64, 3) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="pipeline_class: 'WanTransformer3DModel' is not a diffusers pipeline"):
        build_faithful_pipeline("Wan-AI/Wan2.2-TI2V-5B-Diffusers", pipeline_class="WanTransformer3DModel")


def test_cogvideox_5b_i2v_refuses_any_size_but_480x720():
    pipe = _pipe("THUDM/CogVideoX-5b-I2V")
    with pytest.raises(ValueError, match="not possible to generate videos at a different resolution"):
        pipe(prompt="x", image=Image.new("RGB", (48, 32)), height=32, width=48, num_frames=9,
             num_inference_steps=1, output_type="latent")


# ----------------------------------------------------------------------------------------------------------------
# Round trip and true-size builds


@pytest.mark.parametrize("model_id", ["THUDM/CogVideoX-5b-I2V", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                                      "Wan-AI/Wan2.2-T2V-A14B-Diffusers"])
def test_save_load_round_trip_keeps_configs_and_weights(model_id, tmp_path):
    import diffusers

    directory = save_faithful_pipeline(model_id, tmp_path / "model")
    stored = load_config(model_id)
    loaded = getattr(diffusers, stored["model_index"]["_class_name"]).from_pretrained(directory)
    built = _pipe(model_id)
    for key in ("boundary_ratio", "expand_timesteps"):
        assert loaded.config.get(key) == built.config.get(key), key
    for name in MODEL_COMPONENTS:
        if name in stored:
            _assert_faithful(getattr(loaded, name), stored[name], f"loaded {name}")
            a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    if "image_processor" in stored:
        assert loaded.image_processor.to_dict() == built.image_processor.to_dict()
    def settings(scheduler) -> dict:
        return {k: _plain(v) for k, v in scheduler.config.items() if not k.startswith("_")}

    assert type(loaded.scheduler) is type(built.scheduler)
    assert settings(loaded.scheduler) == settings(built.scheduler)


def test_build_true_size_on_cpu_with_a_reduced_stand_in():
    """The meta-device build keeps construction-time buffers, fills weights, and honours keep-in-fp32 modules."""
    from diffusers import WanTransformer3DModel

    model_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    small = {"transformer": {"num_layers": 1, "num_attention_heads": 2, "ffn_dim": 64},
             "vae": {"base_dim": 8, "num_res_blocks": 1}}
    built = build_true_size(model_id, components=("transformer",), device="cpu", dtype=torch.bfloat16,
                            config_overrides=small)
    # the VAE runs in float32 (the recommended VAE dtype; bf16 convolutions are slow on a CPU)
    built.update(build_true_size(model_id, components=("vae",), device="cpu", dtype=torch.float32,
                                 config_overrides=small))
    transformer, vae = built["transformer"], built["vae"]
    for module in built.values():
        assert all(p.device.type == "cpu" and torch.isfinite(p.float()).all() for p in module.parameters())
        assert not module.training
    real = load_config(model_id)["transformer"]
    assert transformer.config.attention_head_dim == real["attention_head_dim"] == 128
    assert transformer.config.rope_max_seq_len == real["rope_max_seq_len"]
    # buffers computed at construction (rope tables) survive to_empty
    reference = WanTransformer3DModel.from_config({**{k: v for k, v in real.items() if not k.startswith("_")},
                                                   **small["transformer"]})
    buffers, expected = dict(transformer.named_buffers()), dict(reference.named_buffers())
    assert set(buffers) == set(expected) == {"rope.freqs_cos", "rope.freqs_sin"}
    assert all(torch.equal(buffers[k], expected[k]) for k in buffers)
    params = dict(transformer.named_parameters())
    assert params["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert params["blocks.0.scale_shift_table"].dtype == torch.float32  # _keep_in_fp32_modules
    assert torch.all(params["blocks.0.attn1.norm_q.weight"] == 1)
    assert 0.01 < params["blocks.0.attn1.to_q.weight"].float().std().item() < 0.03
    with torch.no_grad():
        latents = torch.randn(1, 16, 2, 4, 6)
        out = transformer(hidden_states=latents.bfloat16(), timestep=torch.tensor([500]),
                          encoder_hidden_states=torch.randn(1, 8, 4096, dtype=torch.bfloat16)).sample
        frames = vae.decode(latents[:, :, :1]).sample
    assert out.shape == latents.shape and torch.isfinite(out.float()).all()
    assert frames.shape == (1, 3, 1, 32, 48) and torch.isfinite(frames).all()
    with pytest.raises(ValueError, match="components: .* has no model component 'image_encoder'"):
        build_true_size(model_id, components=("image_encoder",), device="cpu")
