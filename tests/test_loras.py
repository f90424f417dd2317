"""LoRAs: loaded with diffusers' own ``load_lora_weights`` from files written in code (diffusers/PEFT, Kohya and
ComfyUI keys), exactly the stock result at shift skip 0, one request's adapters never seen by another, refused in
one line before generating, recorded with their sha256 in the sidecar."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import torch

from loopui.engine import LoopRequest, generate_loop
from loopui.engine.plan import resolve_request
from loopui.engine.lora_refs import LoraRef
from loopui.engine.request import request_from_values
from loopui.models import REGISTRY, spec_for
from loopui.models.lora import lora_status
from loopui.testing.lora_files import lora_delta, write_lora
from tiny_wan import build_tiny_wan

COG = dict(prompt="a paper boat on waves", height=32, width=48, num_inference_steps=3, seam_polish="off")
WAN = dict(prompt="waves rolling onto a beach", height=32, width=32, num_frames=21, num_inference_steps=3,
           seam_polish="off")


def _cog():
    from loopui.models.demo import build_tiny_cogvideox

    return build_tiny_cogvideox()


@pytest.fixture(scope="module")
def cog_loras(tmp_path_factory):
    """Two diffusers/PEFT LoRAs of the tiny CogVideoX (different seeds)."""
    folder = tmp_path_factory.mktemp("cog-loras")
    transformer = _cog().transformer
    return {name: write_lora(transformer, folder / f"{name}.safetensors", seed=seed)
            for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def wan_loras(tmp_path_factory):
    """The same random factors of the tiny Wan in the three formats, plus a LoRA of a wider Wan (head dim 16)."""
    folder = tmp_path_factory.mktemp("wan-loras")
    transformer = build_tiny_wan().transformer
    files = {fmt: write_lora(transformer, folder / f"{fmt}.safetensors", fmt, seed=3)
             for fmt in ("peft", "kohya", "comfy")}
    files["wide"] = write_lora(build_tiny_wan(attention_head_dim=16).transformer, folder / "wide.safetensors")
    return files


def _stock_with_lora(pipe, path, scale, **kwargs):
    """diffusers alone: load_lora_weights + set_adapters on a fresh pipeline."""
    pipe.load_lora_weights(str(path), adapter_name="stock", **kwargs)
    pipe.set_adapters(["stock"], [scale])
    return pipe


# -- the knob -------------------------------------------------------------------------------------------------------

def test_lora_values_coerce_as_the_cli_and_the_api_send_them():
    request = request_from_values({"prompt": "x", "loras": ["style.safetensors:0.8", "owner/repo",
                                                           "owner/repo/fast.safetensors:1:low",
                                                           r"C:\loras\a.safetensors:-1.5"]})
    assert request.loras == (LoraRef("style.safetensors", 0.8), LoraRef("owner/repo", 1.0),
                             LoraRef("owner/repo/fast.safetensors", 1.0, "low"),
                             LoraRef(r"C:\loras\a.safetensors", -1.5))
    # a form's text box: one per line; a sidecar's records (sha256 kept); nothing at all
    assert request_from_values({"loras": "a.safetensors:2\n\nb.safetensors"}).loras == (
        LoraRef("a.safetensors", 2.0), LoraRef("b.safetensors", 1.0))
    record = {"source": "a.safetensors", "file": "a.safetensors", "sha256": "AB12", "scale": 0.5, "expert": "both"}
    assert request_from_values({"loras": [record]}).loras == (LoraRef("a.safetensors", 0.5, sha256="ab12"),)
    assert request_from_values({"loras": None}).loras == () == request_from_values({"loras": ""}).loras
    assert LoopRequest(loras=[("a.safetensors", 2)]).to_dict()["loras"] == [
        {"source": "a.safetensors", "scale": 2.0, "expert": "both"}]


@pytest.mark.parametrize("loras, needle", [
    (["a.safetensors:4.5"], "loras: 'a.safetensors': scale must be in -4..4, got 4.5"),
    (["a.safetensors:nan"], "loras: 'a.safetensors': scale must be in -4..4, got nan"),
    (["a.safetensors:-inf"], "loras: 'a.safetensors': scale must be in -4..4, got -inf"),
    (["a.safetensors:strong"], "loras: 'a.safetensors': scale must be a number, got 'strong'"),
    (["a.safetensors:1", "a.safetensors:2"], "loras: 'a.safetensors' is listed twice"),
    ([{"source": "a.safetensors", "expert": "middle"}], "loras: 'a.safetensors': expert must be one of both, high"),
])
def test_bad_lora_values_are_refused_naming_loras(loras, needle):
    with pytest.raises(ValueError) as info:
        request_from_values({"prompt": "x", "loras": loras})
    assert str(info.value).startswith(needle) and "\n" not in str(info.value)


# -- refused before the model loads ---------------------------------------------------------------------------------

def _plan(loras, model="demo", allowed=None):
    spec = spec_for(model) if model == "demo" else REGISTRY[model]
    return resolve_request(request_from_values({"prompt": "x", "loras": loras}), spec, allowed).with_loras()


def test_refusals_before_loading_name_loras_and_the_file(tmp_path, cog_loras, wan_loras):
    pickled = tmp_path / "style.pt"
    pickled.write_bytes(b"\x80\x04")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors header")
    cases = [
        ([str(tmp_path / "gone.safetensors")], f"loras: '{tmp_path / 'gone.safetensors'}' does not exist"),
        ([str(pickled)], f"loras: '{pickled}' is not a .safetensors file"),
        ([str(broken)], f"loras: '{broken}' is not a valid safetensors file"),
        # a Wan LoRA for a CogVideoX model: refused from the file's header, nothing loaded
        ([str(wan_loras["kohya"])], f"loras: '{wan_loras['kohya']}' does not fit loopui/tiny-random-cogvideox "
                                    f"(cogvideox): its keys are those of a LoRA for a Wan model"),
        ([f"{cog_loras['a']}:1:high"], f"loras: '{cog_loras['a']}': expert 'high' needs a two-expert model"),
        ([{"source": str(cog_loras["a"]), "sha256": "0" * 64}], f"loras: '{cog_loras['a']}' has changed since it "
                                                                f"was recorded"),
    ]
    for loras, needle in cases:
        with pytest.raises(ValueError) as info:
            _plan(loras)
        assert str(info.value).startswith(needle), str(info.value)
        assert "\n" not in str(info.value)


def test_public_mode_takes_only_the_servers_loras(cog_loras):
    allowed = {"paper": str(cog_loras["a"])}
    with pytest.raises(ValueError, match=r"^loras: '.*b.safetensors' is not one of this server's LoRAs \(paper\)"):
        _plan([str(cog_loras["b"])], allowed=allowed)
    plan = _plan(["paper:0.5"], allowed=allowed)
    (lora,) = plan.lora_files
    assert lora.path == str(cog_loras["a"]) and lora.record()["source"] == "paper"
    assert lora.record()["file"] == "a.safetensors"  # the server's folder is not recorded


def test_hub_sources_are_fetched_through_huggingface_hub(monkeypatch, cog_loras):
    import huggingface_hub

    from loopui.models.lora import is_hub_source

    assert is_hub_source("owner/repo") and is_hub_source("owner/repo/sub/fast.safetensors")
    assert not is_hub_source(str(cog_loras["a"])) and not is_hub_source("style.safetensors")
    asked = []

    def fake_download(repo, filename, **kwargs):
        asked.append((repo, filename))
        return str(cog_loras["a" if repo == "owner/repo" else "b"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    plan = _plan(["owner/repo/sub/fast.safetensors:0.5", "owner/other"])
    assert asked == [("owner/repo", "sub/fast.safetensors"), ("owner/other", "pytorch_lora_weights.safetensors")]
    assert [f.source for f in plan.lora_files] == ["owner/repo/sub/fast.safetensors", "owner/other"]


# -- exactly diffusers' LoRA ----------------------------------------------------------------------------------------

def test_skip_zero_with_a_lora_is_the_stock_pipeline_with_load_lora_weights(cog_loras):
    stock = _stock_with_lora(_cog(), cog_loras["a"], 0.8)
    expected = stock(prompt=COG["prompt"], height=32, width=48, num_frames=49, num_inference_steps=3,
                     guidance_scale=6.0, generator=torch.Generator().manual_seed(7), output_type="latent").frames
    pipe = _cog()
    plain = generate_loop(pipe, LoopRequest(**COG, seed=7, shift_skip=0), output_type="latent")
    loop = generate_loop(pipe, LoopRequest(**COG, seed=7, shift_skip=0, loras=[f"{cog_loras['a']}:0.8"]),
                         output_type="latent")
    assert torch.equal(expected.float(), loop.latents)
    assert (loop.latents - plain.latents).abs().max() > 1e-3  # the LoRA does something


@pytest.mark.parametrize("fmt", ["peft", "kohya", "comfy"])
def test_wan_reads_every_format_as_diffusers_does(wan_loras, fmt):
    """Kohya/ComfyUI files store alpha (the added weight is alpha/rank * up @ down): the weights diffusers loads
    match that, and at shift skip 0 the loop is the stock pipeline with the same LoRA."""
    stock = _stock_with_lora(build_tiny_wan(), wan_loras[fmt], -1.5)
    expected = stock(prompt=WAN["prompt"], height=32, width=32, num_frames=21, num_inference_steps=3,
                     guidance_scale=5.0, generator=torch.Generator().manual_seed(5), output_type="latent").frames
    pipe = build_tiny_wan()
    delta = lora_delta(pipe.transformer, wan_loras[fmt])
    loop = generate_loop(pipe, LoopRequest(**WAN, seed=5, shift_skip=0, loras=[f"{wan_loras[fmt]}:-1.5"]),
                         output_type="latent")
    assert torch.equal(expected.float(), loop.latents)
    (adapter,) = pipe.transformer.peft_config
    assert len(delta) == 10
    for name, change in delta.items():  # PEFT's own weight change, at the request's scale
        added = pipe.transformer.get_submodule(name).get_delta_weight(adapter).double()
        assert torch.allclose(added, -1.5 * change, atol=1e-6), name


def test_a_faithful_wan_takes_a_kohya_lora_in_a_loop(tmp_path):
    """Wan 2.1 T2V 1.3B's real config (shrunk): a Kohya file loads; the looping sampler with it equals the same
    sampler on a pipeline given the LoRA by diffusers' calls alone."""
    from loopui.testing.faithful import build_faithful_pipeline

    model = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    manual = build_faithful_pipeline(model)
    path = write_lora(manual.transformer, tmp_path / "k.safetensors", "kohya", seed=4)
    request = dict(prompt="a koi pond", height=32, width=32, num_frames=9, num_inference_steps=2)
    manual = _stock_with_lora(manual, path, 0.6)
    expected = generate_loop(manual, LoopRequest(**request), output_type="latent")
    loop = generate_loop(build_faithful_pipeline(model), LoopRequest(**request, loras=[f"{path}:0.6"]),
                         output_type="latent")
    assert loop.settings["shift_skip"] > 0 and torch.equal(expected.latents, loop.latents)


def test_wan_22_a14b_takes_a_lora_per_expert(tmp_path):
    """high = diffusers' ``transformer`` (high-noise expert), low = ``transformer_2`` (load_into_transformer_2),
    both = both; each equals the pipeline given the same LoRA by diffusers' calls alone."""
    from loopui.testing.faithful import build_faithful_pipeline

    model = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"

    def build():
        pipe = build_faithful_pipeline(model)
        pipe.register_to_config(_name_or_path=model)  # the registry's recommendations (guidance 4 / 3, shift 12)
        return pipe

    pipe = build()
    path = write_lora(pipe.transformer, tmp_path / "a14b.safetensors", seed=5)
    request = dict(prompt="a koi pond", height=32, width=32, num_frames=9, num_inference_steps=4)
    results = {}
    for expert in ("high", "low", "both"):
        results[expert] = generate_loop(pipe, LoopRequest(**request, loras=[f"{path}:0.7:{expert}"]),
                                        output_type="latent").latents
        manual = build()
        for component, kwargs in (("transformer", {}), ("transformer_2", {"load_into_transformer_2": True})):
            if expert in ("both", {"transformer": "high", "transformer_2": "low"}[component]):
                manual.load_lora_weights(str(path), adapter_name="m", **kwargs)
                getattr(manual, component).set_adapters(["m"], [0.7])
        expected = generate_loop(manual, LoopRequest(**request), output_type="latent").latents
        assert torch.equal(expected, results[expert]), expert
    assert not torch.equal(results["high"], results["low"]) and not torch.equal(results["high"], results["both"])
    assert sorted(lora_status(pipe)["loaded"]) == sorted([("transformer", "lora_" + _sha(path)[:16]),
                                                          ("transformer_2", "lora_" + _sha(path)[:16])])


# -- a pipeline shared by requests ----------------------------------------------------------------------------------

def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_requests_on_one_pipeline_never_see_each_others_adapters(cog_loras):
    """The same pipeline serves: A, none, B, A, A (now folded in), none, B -- each equals a fresh pipeline's run
    (the folded run up to float rounding); after unfolding, the plain model is bit-exact again."""
    a, b = f"{cog_loras['a']}:0.8", f"{cog_loras['b']}:-1"
    fresh = {name: generate_loop(_cog(), LoopRequest(**COG, loras=loras), output_type="latent").latents
             for name, loras in (("A", [a]), ("none", []), ("B", [b]))}
    assert not torch.equal(fresh["A"], fresh["B"]) and not torch.equal(fresh["A"], fresh["none"])
    pipe = _cog()
    fused = []
    for name in ("A", "none", "B", "A", "A", "none", "B"):
        loras = {"A": [a], "B": [b], "none": []}[name]
        latents = generate_loop(pipe, LoopRequest(**COG, loras=loras), output_type="latent").latents
        fused.append(lora_status(pipe)["fused"] is not None)
        if fused[-1]:
            torch.testing.assert_close(latents, fresh[name], rtol=0, atol=1e-4)
        else:
            assert torch.equal(latents, fresh[name]), name
    assert fused == [False, False, False, False, True, False, False]  # a set is folded in on its second request
    assert len(lora_status(pipe)["loaded"]) == 2  # each file loaded once


def test_single_set_fusing_keeps_no_copy_and_unfolds_by_subtraction(cog_loras, caplog):
    from loopui.models.lora import _state, set_fuse_policy

    pipe = _cog()
    set_fuse_policy(pipe, "single")  # the CLI's: one set per process
    plain = generate_loop(_cog(), LoopRequest(**COG), output_type="latent").latents
    generate_loop(pipe, LoopRequest(**COG, loras=[str(cog_loras["a"])]), output_type="latent")
    assert lora_status(pipe)["fused"] is not None and not _state(pipe).stash  # folded at once, no copy
    with caplog.at_level("WARNING", logger="loopui.models.lora"):
        after = generate_loop(pipe, LoopRequest(**COG), output_type="latent").latents
    assert "come back up to rounding" in caplog.text
    torch.testing.assert_close(after, plain, rtol=0, atol=1e-4)


def test_concurrent_requests_with_different_loras_take_turns(cog_loras):
    pipe = _cog()
    requests = {name: LoopRequest(**COG, seed=3, loras=loras)
                for name, loras in (("A", [f"{cog_loras['a']}:1"]), ("B", [f"{cog_loras['b']}:2"]), ("none", []))}
    expected = {name: generate_loop(_cog(), request, output_type="latent").latents
                for name, request in requests.items()}
    got, errors = {}, []

    def run(name):
        try:
            got[name] = generate_loop(pipe, requests[name], output_type="latent").latents
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name in requests:
        assert torch.equal(got[name], expected[name]), name


def test_a_lora_that_fits_no_module_is_refused_before_sampling(tmp_path, wan_loras):
    from safetensors.torch import save_file

    pipe = build_tiny_wan()
    plain = generate_loop(pipe, LoopRequest(**WAN), output_type="latent").latents
    calls = []
    pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    # A Wan LoRA for a wider Wan: diffusers raises on the shapes
    with pytest.raises(ValueError) as info:
        generate_loop(pipe, LoopRequest(**WAN, loras=[str(wan_loras["wide"])]), output_type="latent")
    message = str(info.value)
    assert message.startswith(f"loras: '{wan_loras['wide']}' does not fit WanPipeline (") and "\n" not in message
    assert message.endswith("it seems to be for a Wan model of width 32")
    assert not calls
    # CogVideoX in Kohya's naming: diffusers has no converter for it and loads nothing (no error of its own)
    cog = _cog()
    kohya = tmp_path / "cog_kohya.safetensors"
    save_file({"lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)}, str(kohya))
    with pytest.raises(ValueError, match=r"^loras: '.*cog_kohya.safetensors' does not fit .* \(none of its keys names a "
                                         r"module of this model\); it seems to be for a CogVideoX model of width 32$"):
        generate_loop(cog, LoopRequest(**COG, loras=[str(kohya)]), output_type="latent")
    # the pipeline is still the stock one
    assert torch.equal(generate_loop(pipe, LoopRequest(**WAN), output_type="latent").latents, plain)


def test_adapters_beyond_the_cap_and_a_released_model_are_unloaded(monkeypatch, cog_loras, tiny_model_dir):
    import loopui.models.lora as lora_module
    from loopui.models import ModelManager

    monkeypatch.setattr(lora_module, "MAX_ADAPTERS", 1)
    manager = ModelManager(device="cpu")
    with manager.use(str(tiny_model_dir)) as loaded:
        pipe = loaded.pipe
        for name in ("a", "b"):
            generate_loop(pipe, LoopRequest(**COG, num_frames=9, loras=[str(cog_loras[name])]),
                          output_type="latent")
        assert list(pipe.transformer.peft_config) == ["lora_" + _sha(cog_loras["b"])[:16]]  # a was unloaded
    assert manager.release() == 1
    assert not getattr(pipe.transformer, "peft_config", None) and lora_status(pipe)["loaded"] == []


# -- the sidecar and the command line -------------------------------------------------------------------------------

def test_the_sidecar_records_each_lora_with_its_sha256_and_scale(tmp_path, cog_loras):
    from loopui.engine import render_loop

    render = render_loop(_cog(), LoopRequest(**COG, num_frames=9, loras=[f"{cog_loras['a']}:0.25"]),
                         outputs=[tmp_path / "loop.gif"])
    (record,) = json.loads(render.sidecar.read_text())["settings"]["loras"]
    assert record == {"source": str(cog_loras["a"]), "file": "a.safetensors", "sha256": _sha(cog_loras["a"]),
                      "scale": 0.25, "expert": "both"}
    # the record reproduces the loop: it reads back as the same request (and checks the file is unchanged)
    again = request_from_values({"prompt": COG["prompt"], "loras": [record]})
    assert again.loras == (LoraRef(str(cog_loras["a"]), 0.25, sha256=_sha(cog_loras["a"])),)


def test_cli_lora_flag_applies_and_records_it(tiny_model_dir, tmp_path, capsys, cog_loras):
    from loopui.cli import main

    out = tmp_path / "loop.gif"
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "a red ball", "--height", "32", "--width",
                 "48", "--steps", "2", "--frames", "9", "--lora", f"{cog_loras['a']}:0.5", "--lora",
                 str(cog_loras["b"]), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    records = json.loads(out.with_suffix(".json").read_text())["settings"]["loras"]
    assert [(r["file"], r["scale"], r["sha256"]) for r in records] == [
        ("a.safetensors", 0.5, _sha(cog_loras["a"])), ("b.safetensors", 1.0, _sha(cog_loras["b"]))]


@pytest.mark.parametrize("flag, needle", [
    ("missing.safetensors", "loras: 'missing.safetensors' does not exist [--lora]"),
    ("style.ckpt:0.5", "loras: 'style.ckpt' is not a .safetensors file"),
    ("style.safetensors:9", "loras: 'style.safetensors': scale must be in -4..4, got 9.0 [--lora]"),
])
def test_cli_refuses_a_bad_lora_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch, flag, needle):
    from loopui.cli import main
    from loopui.models import ModelManager

    monkeypatch.setattr(ModelManager, "run", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--lora", flag, "-o",
                 str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"loopui: error: {needle}") and "[--lora]" in err


def test_the_studio_looks_hub_loras_up_with_its_managers_offline_and_cache_settings(monkeypatch, cog_loras,
                                                                                    tmp_path):
    """A server whose model manager never contacts the hub (``local_files_only``, its own cache folder) looks a
    request's hub LoRAs up the same way, before the job is queued."""
    import huggingface_hub

    from loopui.models import ModelManager
    from loopui.studio import Studio

    asked = []

    def fake_download(repo, filename, **kwargs):
        asked.append((repo, kwargs.get("local_files_only"), kwargs.get("cache_dir")))
        return str(cog_loras["a"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    manager = ModelManager(local_files_only=True, cache_dir=tmp_path / "hub")
    studio = Studio(demo=True, has_gpu=False, output_root=tmp_path / "out", manager=manager)
    plan = studio.build_request(dict(prompt="x", num_frames=9, height=32, width=48,
                                     loras=["owner/repo/fast.safetensors:0.5"]))
    assert asked == [("owner/repo", True, str(tmp_path / "hub"))]
    assert [f.source for f in plan.lora_files] == ["owner/repo/fast.safetensors"]
