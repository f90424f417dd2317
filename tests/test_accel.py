"""How the denoiser runs (loopui.models.accel): the attention kernel table and its choice, every refusal, native as
today's loop bit for bit, and regional torch.compile on the CPU (inductor) -- same loop, no recompiles at one size,
Stop still acting between blocks. Availability is faked by patching the probes (no GPU kernel is installed here)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

from loopui.engine import LoopRequest, generate_loop
from loopui.engine.request import ATTENTION_BACKENDS
from loopui.models import accel
from stopping import blocks_run_after_stop

WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
RUN = dict(prompt="a red fox", num_inference_steps=2, num_frames=9, height=32, width=48, seed=1)
KERNEL_MODULES = {"flash_attn", "flash_attn_3", "flash_attn_interface", "sageattention", "xformers"}
VERSIONS = {"flash-attn": "2.8.3", "flash_attn_3": "3.0.0b1", "sageattention": "2.2.0", "xformers": "0.0.32"}


@pytest.fixture()
def gpu(monkeypatch):
    """A fake CUDA GPU of a given compute capability with a given set of kernels installed:
    ``gpu((9, 0), {"flash3", "sage"}, versions={...})``."""
    real_find_spec, real_version = importlib.util.find_spec, importlib.metadata.version

    def install(capability, kernels=(), versions=None):
        modules = {m for k in kernels for m in accel.ATTENTION_KERNELS[k].modules}
        dists = {accel.ATTENTION_KERNELS[k].distribution for k in kernels}
        table = {**VERSIONS, **(versions or {})}

        def find_spec(name, *args, **kwargs):
            if name in KERNEL_MODULES:
                return object() if name in modules else None
            return real_find_spec(name, *args, **kwargs)

        def version(name):
            if name in VERSIONS:
                if name not in dists:
                    raise importlib.metadata.PackageNotFoundError(name)
                return table[name]
            return real_version(name)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(importlib.metadata, "version", version)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm{capability[0]}{capability[1]}")

    monkeypatch.delenv(accel.ATTENTION_ENV, raising=False)
    return install


# -- the table ----------------------------------------------------------------------------------------------------

def test_the_kernel_table_names_the_request_knobs_and_diffusers_backends():
    from diffusers.models.attention_dispatch import AttentionBackendName

    assert tuple(accel.ATTENTION_KERNELS) == tuple(n for n in ATTENTION_BACKENDS if n != "auto")
    assert accel.ATTENTION_NAMES == ATTENTION_BACKENDS
    backends = {name: kernel.backend for name, kernel in accel.ATTENTION_KERNELS.items()}
    assert backends == {"native": "native", "flash": "flash", "flash3": "_flash_3", "sage": "sage",
                        "xformers": "xformers"}
    assert all(AttentionBackendName(value) for value in backends.values())
    for name, kernel in accel.ATTENTION_KERNELS.items():
        assert (kernel.min_capability is None) == (name == "native")
        assert name == "native" or (kernel.modules and kernel.install), name


# -- the choice ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, installed, chosen", [
    ((9, 0), {"flash", "flash3", "sage", "xformers"}, "flash3"),  # Hopper: FlashAttention 3 first
    ((9, 0), {"flash", "sage"}, "sage"),
    ((8, 0), {"flash", "flash3", "sage"}, "sage"),  # Ampere: FA3 does not fit
    ((8, 9), {"flash"}, "flash"),
    ((8, 6), {"xformers"}, "native"),  # auto never picks xFormers
    ((10, 0), {"flash3"}, "native"),  # Blackwell: FA3 is Hopper only
    ((7, 5), {"flash", "sage"}, "native"),  # Turing: neither fits
    ((9, 0), set(), "native"),
])
def test_auto_picks_the_fastest_installed_kernel_that_fits_the_gpu(gpu, capability, installed, chosen):
    gpu(capability, installed)
    assert accel.resolve_attention("auto", "cuda") == chosen
    assert accel.resolve_attention(None, "cuda:0") == chosen


def test_the_choice_follows_the_models_dtype_and_context_parallelism(gpu):
    """FlashAttention and SageAttention take 16-bit inputs only (a float32 model would fail in its first attention
    call); FlashAttention 3 and xFormers do not run split across GPUs (diffusers' registry says so)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for kernel in accel.ATTENTION_KERNELS.values():
        assert kernel.context_parallel == (kernel.backend in _AttentionBackendRegistry._supports_context_parallel)
    gpu((9, 0), {"flash", "flash3", "sage", "xformers"})
    assert accel.resolve_attention("auto", "cuda", torch.bfloat16) == "flash3"
    assert accel.resolve_attention("auto", "cuda", torch.float32) == "native"
    assert accel.resolve_attention("auto", "cuda", "bfloat16", parallel=True) == "sage"
    assert accel.resolve_attention("xformers", "cuda", torch.float32) == "xformers"
    with pytest.raises(ValueError, match=r"^attention 'sage' \(SageAttention 2\) takes float16 or bfloat16 only, "
                                         r"and this model runs in float32: use attention 'auto' or 'native'$"):
        accel.resolve_attention("sage", "cuda", torch.float32)
    with pytest.raises(ValueError, match=r"^attention 'flash3' .* does not run split across GPUs"):
        accel.resolve_attention("flash3", "cuda", torch.bfloat16, parallel=True)


def test_a_bad_device_is_one_line_before_anything_loads():
    with pytest.raises(ValueError, match=r"^unknown device 'gpu0': use cpu, cuda or cuda:N$"):
        accel.resolve_attention("auto", "gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device 'cuda' requested but CUDA is not available$"):
            accel.resolve_attention("auto", "cuda")


def test_auto_is_native_on_a_cpu_and_named_native_runs_anywhere(gpu):
    gpu((9, 0), {"flash3", "sage", "flash"})
    assert accel.resolve_attention("auto", "cpu") == "native"
    assert accel.resolve_attention("native", "cpu") == "native"
    assert accel.resolve_attention("native", "cuda") == "native"


def test_auto_takes_the_server_setting_first(gpu, monkeypatch):
    gpu((9, 0), {"flash3", "flash"})
    monkeypatch.setenv(accel.ATTENTION_ENV, "flash")
    assert accel.resolve_attention("auto", "cuda") == "flash"
    assert accel.resolve_attention("native", "cuda") == "native"  # a request that names one wins
    assert accel.resolve_attention("auto", "cpu") == "native"  # a GPU setting does not apply on a CPU
    monkeypatch.setenv(accel.ATTENTION_ENV, "sage")
    with pytest.raises(ValueError, match=r"^LOOPUI_ATTENTION=sage: attention 'sage': SageAttention 2 is not "
                                         r"installed .*pip install "
                                         r"sageattention.*requirements-gpu.txt"):
        accel.resolve_attention("auto", "cuda")
    monkeypatch.setenv(accel.ATTENTION_ENV, "fastest")
    with pytest.raises(ValueError, match=r"^LOOPUI_ATTENTION must be one of auto, native, flash, flash3, sage, "
                                         r"xformers; got 'fastest'$"):
        accel.resolve_attention("auto", "cpu")


# -- every refusal, one line naming the knob ----------------------------------------------------------------------

def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_an_unknown_kernel_is_refused(gpu):
    with pytest.raises(ValueError) as exc:
        accel.resolve_attention("flash4", "cpu")
    assert _one_line(exc) == "attention must be one of auto, native, flash, flash3, sage, xformers; got 'flash4'"


@pytest.mark.parametrize("name", ["flash", "flash3", "sage", "xformers"])
def test_a_gpu_kernel_on_a_cpu_is_refused(gpu, name):
    gpu((9, 0), {name})
    with pytest.raises(ValueError) as exc:
        accel.resolve_attention(name, "cpu")
    assert _one_line(exc).startswith(f"attention {name!r} (")
    assert "needs a CUDA GPU; this run is on cpu" in str(exc.value)


def test_a_kernel_not_installed_names_it_and_how_to_install(gpu):
    gpu((9, 0), {"flash"})
    with pytest.raises(ValueError) as exc:
        accel.resolve_attention("flash3", "cuda")
    text = _one_line(exc)
    assert text.startswith("attention 'flash3': FlashAttention 3 is not installed (module 'flash_attn_3' not found)")
    assert "hopper && python setup.py install" in text and "requirements-gpu.txt" in text
    with pytest.raises(ValueError, match=r"^attention 'xformers': xFormers is not installed .*pip install xformers"):
        accel.resolve_attention("xformers", "cuda")


def test_a_kernel_older_than_diffusers_needs_is_refused(gpu):
    gpu((8, 9), {"sage"}, versions={"sageattention": "1.0.6"})
    with pytest.raises(ValueError) as exc:
        accel.resolve_attention("sage", "cuda")
    assert _one_line(exc) == ("attention 'sage': sageattention 1.0.6 is installed, diffusers needs >= 2.1.1: "
                              "pip install sageattention==2.2.0 --no-build-isolation")
    assert accel.resolve_attention("auto", "cuda") == "native"  # auto skips it


@pytest.mark.parametrize("name, capability, needs", [
    ("flash3", (8, 0), "compute capability 9.0 to 9.x"),
    ("flash3", (10, 0), "compute capability 9.0 to 9.x"),
    ("flash", (7, 5), "compute capability 8.0 or newer"),
    ("sage", (7, 0), "compute capability 8.0 or newer"),
    ("xformers", (5, 2), "compute capability 6.0 or newer"),
])
def test_a_gpu_the_kernel_does_not_fit_is_refused_with_its_capability(gpu, name, capability, needs):
    gpu(capability, {name})
    with pytest.raises(ValueError) as exc:
        accel.resolve_attention(name, "cuda")
    text = _one_line(exc)
    assert text.startswith(f"attention {name!r}") and needs in text
    assert f"is {capability[0]}.{capability[1]}" in text


def test_resolve_compile_reads_the_request_then_the_server_setting(monkeypatch):
    monkeypatch.delenv(accel.COMPILE_ENV, raising=False)
    assert accel.resolve_compile(None) is False
    assert accel.resolve_compile(True) is True
    for value, expected in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("off", False)):
        monkeypatch.setenv(accel.COMPILE_ENV, value)
        assert accel.resolve_compile(None) is expected
    assert accel.resolve_compile(False) is False  # the request wins
    monkeypatch.setenv(accel.COMPILE_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"^LOOPUI_COMPILE must be 1/true/on or 0/false/off; got 'sometimes'$"):
        accel.resolve_compile(None)


# -- applying a kernel --------------------------------------------------------------------------------------------

def test_native_is_todays_loop_bit_for_bit_and_set_only_on_change(monkeypatch):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from loopui.testing.faithful import build_faithful_pipeline

    pipe = build_faithful_pipeline(WAN)
    with monkeypatch.context() as patch:  # the loop as it was: nothing ever touches the attention backend
        patch.setattr(accel, "use_attention", lambda modules, name: None)
        before = generate_loop(pipe, LoopRequest(**RUN), output_type="latent")
    processors = accel._attention_processors(pipe.transformer)
    assert processors and all(p._attention_backend is None for p in processors)

    calls = []
    original = type(pipe.transformer).set_attention_backend
    monkeypatch.setattr(type(pipe.transformer), "set_attention_backend",
                        lambda self, backend: (calls.append(backend), original(self, backend))[1])
    global_before = _AttentionBackendRegistry._active_backend
    native = generate_loop(pipe, LoopRequest(**RUN, attention="native"), output_type="latent")
    assert torch.equal(native.latents, before.latents)
    assert native.attention == "native" and native.settings["attention"] == "native"
    assert all(str(p._attention_backend.value) == "native" for p in processors)
    again = generate_loop(pipe, LoopRequest(**RUN), output_type="latent")  # auto on a CPU: native, unchanged
    assert torch.equal(again.latents, before.latents)
    assert calls == ["native"]  # set once, not on every call
    assert _AttentionBackendRegistry._active_backend == global_before


def test_a_kernel_diffusers_refuses_becomes_one_line_naming_attention():
    from loopui.testing.faithful import build_faithful_pipeline

    transformer = build_faithful_pipeline(WAN).transformer
    with pytest.raises(ValueError) as exc:  # flash-attn is not installed here: diffusers' own check refuses
        accel.use_attention([transformer], "flash")
    assert _one_line(exc).startswith("attention 'flash': Flash Attention backend 'flash' is not usable")
    assert getattr(transformer, "_loopui_attention", None) is None


def test_cogvideox_attention_does_not_dispatch_so_only_native_applies():
    from loopui.models.demo import build_tiny_cogvideox

    pipe = build_tiny_cogvideox()
    assert not accel.supports_attention_backends(pipe.transformer)
    accel.use_attention([pipe.transformer], "native")
    with pytest.raises(ValueError) as exc:
        accel.use_attention([pipe.transformer], "sage")
    assert _one_line(exc).startswith("attention 'sage': CogVideoXTransformer3DModel's attention in diffusers calls")


# -- compile (inductor on the CPU) ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan_pipe():
    from loopui.testing.faithful import build_faithful_pipeline

    return build_faithful_pipeline(WAN, layers=2)


def test_compiled_blocks_make_the_same_loop_and_compile_once_per_size(wan_pipe):
    eager = generate_loop(wan_pipe, LoopRequest(**RUN), output_type="latent")
    assert not eager.compiled and not accel.is_compiled(wan_pipe.transformer)
    blocks = accel.compiled_blocks(wan_pipe.transformer)
    assert blocks == list(wan_pipe.transformer.blocks) and len(blocks) == 2  # Wan lists WanTransformerBlock

    stages, start = [], accel.compile_count()
    first = generate_loop(wan_pipe, LoopRequest(**RUN, compile=True), output_type="latent",
                          callback=lambda stage, step, total: stages.append(stage))
    assert first.compiled and first.settings["compile"] is True
    assert stages[:3] == ["encode", "compile", "denoise"]
    assert accel.compile_count() == start + 1  # both blocks share one graph
    assert torch.allclose(first.latents, eager.latents, atol=1e-3, rtol=0)

    stages.clear()
    second = generate_loop(wan_pipe, LoopRequest(**RUN, compile=True), output_type="latent",
                           callback=lambda stage, step, total: stages.append(stage))
    assert accel.compile_count() == start + 1  # the rotations kept every shape: nothing recompiled
    assert "compile" not in stages
    assert torch.equal(second.latents, first.latents)

    off = generate_loop(wan_pipe, LoopRequest(**RUN, compile=False), output_type="latent")
    assert not off.compiled and not accel.is_compiled(wan_pipe.transformer)  # back to eager
    assert torch.equal(off.latents, eager.latents)
    assert accel.compile_blocks(wan_pipe.transformer) and accel.is_compiled(wan_pipe.transformer)
    generate_loop(wan_pipe, LoopRequest(**RUN, compile=True), output_type="latent")
    assert accel.compile_count() == start + 1  # the kept compiled callables came back


def test_stop_acts_between_compiled_blocks(wan_pipe):
    blocks = list(wan_pipe.transformer.blocks)
    generate_loop(wan_pipe, LoopRequest(**RUN, compile=True), output_type="latent")  # compiled at this size
    start = accel.compile_count()
    after_stop = blocks_run_after_stop(wan_pipe, blocks, LoopRequest(**RUN, compile=True), "stopped during step 1 of 2")
    assert after_stop == []
    assert all(block._forward_pre_hooks == {} for block in blocks)
    assert accel.compile_count() == start  # the checks run around the compiled forward: no recompilation


def test_cogvideox_compiles_its_transformer_blocks_too():
    from loopui.models.demo import build_tiny_cogvideox

    pipe = build_tiny_cogvideox()
    assert getattr(pipe.transformer, "_repeated_blocks", None) in (None, [], ())
    assert accel.compiled_blocks(pipe.transformer) == list(pipe.transformer.transformer_blocks)
    run = dict(prompt="a red ball", height=32, width=48, num_frames=9, num_inference_steps=2)
    eager = generate_loop(pipe, LoopRequest(**run), output_type="latent")
    start = accel.compile_count()
    compiled = generate_loop(pipe, LoopRequest(**run, compile=True), output_type="latent")
    assert compiled.compiled and accel.compile_count() > start
    assert torch.allclose(compiled.latents, eager.latents, atol=1e-3, rtol=0)


def test_the_page_says_compiling_first_run_only_for_the_compile_stage():
    from loopui.studio.jobs import JobEvent, ProgressClock
    from loopui.studio.studio import ENGINE_STAGE_TEXTS
    from loopui.ui.updates import progress_view

    assert ENGINE_STAGE_TEXTS["compile"] == "compiling (first run only)"
    (args, kwargs), line = progress_view(JobEvent("progress", stage="compile", step=0, total=2,
                                                  message=ENGINE_STAGE_TEXTS["compile"]), ProgressClock(lambda: 0.0))
    assert line == "Compiling (first run only)…" and kwargs["desc"].startswith("Compiling (first run only) · ")


def test_the_gpu_kernels_install_from_requirements_gpu_and_never_from_requirements():
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]

    def names(path: Path) -> set[str]:
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return {Requirement(line).name for line in lines if line and not line.startswith("-")}

    gpu = names(root / "requirements-gpu.txt")
    pip_names = {k.distribution.replace("_", "-") for k in accel.ATTENTION_KERNELS.values()
                 if k.distribution and k.min_version}
    assert pip_names <= gpu  # flash-attn, sageattention, xformers (FlashAttention 3 builds from source)
    assert not (pip_names & names(root / "requirements.txt"))
    assert "hopper && python setup.py install" in (root / "requirements-gpu.txt").read_text()
