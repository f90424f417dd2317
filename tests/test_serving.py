"""Serving several users from one process: shared pipelines without cross-talk (issue 9, part 1).

Two bugs, each reproduced here first: two ``generate_loop`` calls overlapping on one pipeline, and a model evicted
(its accelerate hooks removed) while a generation still runs on it. GPU-only behaviour is simulated on the CPU
(``fake_cuda``: real accelerate offload hooks, fake memory figures).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fake_cuda import GIB, fake_cuda  # noqa: F401 - pytest fixture
from loopui.engine import LoopRequest, generate_loop

SMALL = dict(prompt="a paper boat on waves", height=32, width=48, num_inference_steps=6)
QUICK = dict(SMALL, num_frames=9, num_inference_steps=3)  # 3 latents: the app's jobs decode little


@pytest.fixture(autouse=True)
def one_export_per_job(monkeypatch):
    """The app's jobs write one GIF instead of MP4 + GIF + WebP (export is tested in test_media / test_app)."""
    import loopui.studio.files

    monkeypatch.setattr(loopui.studio.files, "OUTPUT_SUFFIXES", (".gif",))


def _wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# -- 1a. two generate_loop calls on one pipeline ------------------------------------------------------------------------

@pytest.mark.parametrize("shared", ["same pipeline", "two pipelines, one transformer"])
def test_overlapping_generate_loop_calls_equal_each_run_alone(tiny_pipe, shared):
    from diffusers import CogVideoXPipeline

    pipe_a = tiny_pipe
    pipe_b = tiny_pipe if shared == "same pipeline" else CogVideoXPipeline(**tiny_pipe.components)
    request_a, request_b = LoopRequest(**SMALL, seed=1), LoopRequest(**SMALL, seed=2, shift_skip=5)
    alone_a = generate_loop(pipe_a, request_a, output_type="latent").latents
    alone_b = generate_loop(pipe_b, request_b, output_type="latent").latents
    assert not torch.equal(alone_a, alone_b)

    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []
    transformer = tiny_pipe.transformer

    def run(name: str, pipe, request, callback=None) -> None:
        try:
            results[name] = generate_loop(pipe, request, output_type="latent", callback=callback).latents
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    thread_b = threading.Thread(target=run, args=("b", pipe_b, request_b))

    def pause_a(stage: str, step: int, total: int) -> None:
        if stage == "denoise" and step == 2:
            # Mid-run, B starts on the same model and gets every chance to install its wrapper.
            mine = transformer.__dict__.get("forward")
            thread_b.start()
            _wait(lambda: transformer.__dict__.get("forward") is not mine or not thread_b.is_alive(), timeout=1.0)

    thread_a = threading.Thread(target=run, args=("a", pipe_a, request_a, pause_a))
    thread_a.start()
    thread_a.join(120)
    thread_b.join(120)
    assert errors == []
    torch.testing.assert_close(results["a"], alone_a, rtol=0, atol=0)
    torch.testing.assert_close(results["b"], alone_b, rtol=0, atol=0)
    assert "forward" not in transformer.__dict__


# -- 1b. a model evicted while it renders -------------------------------------------------------------------------------

def test_two_models_at_once_on_one_device_both_correct_and_the_running_one_not_evicted(fake_cuda, tiny_model_dir,
                                                                                         tmp_path, monkeypatch):
    """The page's path: job A renders model X with model CPU offload (accelerate hooks); job B asks for model Y on
    the same device mid-run. Neither may spoil the other, and X must keep its hooks while A runs on it."""
    import loopui.engine
    import loopui.models.memory as memory
    from loopui.models import ModelManager
    from loopui.studio import LoopJob, Studio

    # The folder model is the start-up model, so the studio serves it (clients may not name other folders).
    studio = Studio(manager=ModelManager(max_models=1, offload="model"), model_id=str(tiny_model_dir), demo=True,
                    has_gpu=True, devices="cuda:0", output_root=tmp_path / "out")
    latents: dict[int, torch.Tensor] = {}
    running: set[int] = set()
    evicted_while_running: list[str] = []
    render, dispose = loopui.engine.render_loop, memory.dispose

    def tracked_render(pipe, request, **kwargs):
        running.add(id(pipe))
        try:
            out = render(pipe, request, **kwargs)
        finally:
            running.discard(id(pipe))
        latents[out.result.plan.request.seed] = out.result.latents
        return out

    def watched_dispose(entries, verb):
        evicted_while_running.extend(e.spec.model_id for e in entries if id(e.pipe) in running)
        return dispose(entries, verb)

    monkeypatch.setattr(loopui.engine, "render_loop", tracked_render)
    monkeypatch.setattr(memory, "dispose", watched_dispose)
    model_a, model_b = str(tiny_model_dir), "demo"
    plan_a = studio.build_request(dict(QUICK, seed=11), model_id=model_a)
    plan_b = studio.build_request(dict(QUICK, seed=12), model_id=model_b)

    def finish(job) -> None:
        last = [e for e in job.events(heartbeat=0.01) if e is not None][-1]
        assert last.kind == "done", last.payload

    # The reference loops: each model loaded alone on the device, its request run alone.
    alone = {}
    for model, request in ((model_a, plan_a.request), (model_b, plan_b.request)):
        pipe = studio.manager.get(model, device="cuda:0").pipe
        alone[request.seed] = generate_loop(pipe, request, output_type="latent").latents

    # Overlapping: A pauses after its second step until B has its model (or a second has passed).
    b_has_model = threading.Event()
    progress = LoopJob._progress

    def gated(self, stage, step, total, message=""):
        progress(self, stage, step, total, message)
        session = self._thread.name.rsplit("-", 1)[-1]
        if session == "bbbb" and stage == "encode":
            b_has_model.set()
        if session == "aaaa" and stage == "denoise" and step == 2:
            studio.start("bbbb", model_b, plan_b)
            b_has_model.wait(1.0)

    monkeypatch.setattr(LoopJob, "_progress", gated)
    finish(studio.start("aaaa", model_a, plan_a))
    assert _wait(lambda: 12 in latents or studio.jobs.running() == 0, 60)
    assert _wait(lambda: studio.jobs.running() == 0, 60)
    assert evicted_while_running == []
    assert set(latents) == {11, 12}
    torch.testing.assert_close(latents[11], alone[11], rtol=0, atol=0)
    torch.testing.assert_close(latents[12], alone[12], rtol=0, atol=0)


def test_a_lease_keeps_a_model_until_its_user_lets_go(fake_cuda, tiny_model_dir):
    """The library path (no app): a load that needs the room of a model in use waits for the lease to end."""
    from loopui.models import ModelManager

    manager = ModelManager(max_models=1)
    order: list[str] = []
    holding = threading.Event()
    let_go = threading.Event()

    def first() -> None:
        with manager.use(str(tiny_model_dir), device="cuda:0") as loaded:
            holding.set()
            let_go.wait(30)
            order.append("first done")
            assert manager.loaded() == [loaded]

    def second() -> None:
        holding.wait(30)
        manager.get("demo", device="cuda:0")
        order.append("second loaded")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    assert holding.wait(30)
    time.sleep(0.2)  # give the second load every chance to evict the first (it must wait instead)
    assert order == [] and len(manager.loaded()) == 1
    let_go.set()
    for thread in threads:
        thread.join(60)
    assert order == ["first done", "second loaded"]
    assert [m.spec.model_id for m in manager.loaded()] == [manager.loaded()[0].spec.model_id]
    assert manager.holds("demo", "cuda:0") and not manager.holds(str(tiny_model_dir), "cuda:0")
    # Another device has room of its own: no waiting there.
    manager.get(str(tiny_model_dir), device="cuda:1")
    assert manager.holds(str(tiny_model_dir), "cuda:1") and manager.holds("demo", "cuda:0")


def test_a_thread_cannot_evict_the_model_it_is_using_and_release_waits_for_users(fake_cuda, tiny_model_dir):
    from loopui.models import ModelManager

    manager = ModelManager(max_models=1)
    with manager.use(str(tiny_model_dir), device="cuda:0") as loaded:
        with pytest.raises(RuntimeError, match="leave its use"):
            manager.get("demo", device="cuda:0")  # would wait for itself forever
        assert manager.release() == 1 and manager.loaded() == []
        # Released while in use: still intact (its pipeline runs) until the block ends.
        assert loaded.pipe.transformer is not None
        result = generate_loop(loaded.pipe, LoopRequest(**QUICK), output_type="latent")
        assert result.latents.shape[1] == 3


def test_a_model_all_on_the_gpu_is_evicted_before_the_next_is_measured(fake_cuda, tiny_model_dir, tmp_path):
    """With the 'none' policy two large models never share a GPU, and the next one's policy is measured after the
    first has given its memory back (here a pipeline 'occupies' 4.5 GiB of a 6 GiB card while it is alive)."""
    import shutil

    from loopui.models import ModelManager, spec_for

    other = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    fake_cuda.total, fake_cuda.pipe_bytes = 6 * GIB, int(4.5 * GIB)
    assert spec_for(other).vram_gb == pytest.approx(4.0, abs=0.1)  # fits 6 GiB alone, not beside another
    manager = ModelManager(max_models=2)
    first = manager.get(str(tiny_model_dir), device="cuda:0")
    assert first.policy == "none"
    second = manager.get(str(other), device="cuda:0")
    assert second.policy == "none"  # measured with the first one gone: the whole card free again
    assert [m.spec.model_id for m in manager.loaded()] == [str(other)]
    # A small model fits beside a resident one and may stay with it (max_models=2).
    manager.get("demo", device="cuda:0")
    assert len(manager.loaded()) == 2


def test_group_offload_on_a_gpu_and_as_the_retry_after_model_offload(fake_cuda):
    """Group offload (diffusers' real hooks, onloading to the CPU here) serves the same loop, and an out-of-memory
    error under model offload is retried with group offload, which the model keeps."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from loopui.models import ModelManager

    reference = generate_loop(ModelManager().get("demo", device="cpu").pipe, LoopRequest(**QUICK),
                              output_type="latent").latents
    grouped = ModelManager(offload="group").get("demo", device="cuda:0")
    assert grouped.policy == "group" and ("group", "cuda:0") in fake_cuda.placements
    assert "group offload" in grouped.describe() and _is_group_offload_enabled(grouped.pipe.transformer)
    torch.testing.assert_close(generate_loop(grouped.pipe, LoopRequest(**QUICK), output_type="latent").latents,
                               reference, rtol=0, atol=0)
    manager = ModelManager(offload="model")
    failures = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")]
    said = []

    def work(loaded):
        if failures:
            raise failures.pop()
        return generate_loop(loaded.pipe, LoopRequest(**QUICK), output_type="latent").latents

    latents = manager.run("demo", work, device="cuda:0", progress=lambda stage, f, message: said.append(message))
    loaded = manager.loaded()[0]
    assert loaded.policy == "group" and _is_group_offload_enabled(loaded.pipe.transformer)
    assert not hasattr(loaded.pipe.transformer, "_hf_hook")  # model offload's hooks are gone
    assert any("retrying once with group offload" in m for m in said)
    torch.testing.assert_close(latents, reference, rtol=0, atol=0)
    assert manager.release() == 1 and not _is_group_offload_enabled(loaded.pipe.transformer)


# -- 2a. several GPUs: the device pool ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (None, ["cuda:0", "cuda:1"]), ("auto", ["cuda:0", "cuda:1"]), ("cuda:1", ["cuda:1"]),
    ("cuda, cuda:1", ["cuda:0", "cuda:1"]), ("cpu", ["cpu"]),
])
def test_parse_devices(fake_cuda, text, expected):
    from loopui.models import parse_devices

    assert parse_devices(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("cuda:2", "does not exist"), ("cuda:0,cuda:0", "listed twice"), ("gpu0", "not a torch device"),
    ("cuda:0,", "comma-separated"),
])
def test_parse_devices_refuses_bad_lists(fake_cuda, text, needle):
    from loopui.models import parse_devices

    with pytest.raises(ValueError, match=needle):
        parse_devices(text)


def test_device_pool_prefers_the_device_holding_the_model_and_stops_waiting_on_cancel():
    from loopui.models import DevicePool, LoadCancelled

    pool = DevicePool(["cuda:0", "cuda:1"])
    with pool.acquire(prefer=lambda d: d == "cuda:1") as device:
        assert device == "cuda:1"
        with pool.acquire() as other:
            assert other == "cuda:0" and pool.busy() == 2
            cancel, waited = threading.Event(), []
            cancel.set()
            with pytest.raises(LoadCancelled, match="free device"):
                with pool.acquire(cancel=cancel, on_wait=lambda: waited.append(True)):
                    pass
            assert waited == [True]
    assert pool.busy() == 0


def test_two_jobs_run_at_once_on_two_devices_each_with_its_own_pipeline_and_policy(fake_cuda, tiny_model_dir,
                                                                                  tmp_path, monkeypatch):
    import loopui.engine
    from loopui.models import ModelManager
    from loopui.studio import LoopJob, Studio

    fake_cuda.totals = {"cuda:0": 80 * GIB, "cuda:1": 3 * GIB}  # the second card is too small to hold it all
    studio = Studio(manager=ModelManager(max_models=1), model_id=str(tiny_model_dir), has_gpu=True,
                    devices="cuda:0,cuda:1", output_root=tmp_path / "out")
    assert studio.pool.size == 2
    plans = [studio.build_request(dict(QUICK, seed=seed)) for seed in (21, 22)]
    ran_on, latents = {}, {}
    render = loopui.engine.render_loop

    def recording_render(pipe, request, **kwargs):
        out = render(pipe, request, **kwargs)
        latents[out.result.plan.request.seed] = out.result.latents
        ran_on[out.result.plan.request.seed] = id(pipe)
        return out

    monkeypatch.setattr(loopui.engine, "render_loop", recording_render)
    second_denoising = threading.Event()
    overlapped = []
    progress = LoopJob._progress

    def gated(self, stage, step, total, message=""):
        progress(self, stage, step, total, message)
        session = self._thread.name.rsplit("-", 1)[-1]
        if session == "bbbb" and stage == "denoise":
            second_denoising.set()
        if session == "aaaa" and stage == "denoise" and step == 2:
            overlapped.append(second_denoising.wait(20))  # only true if B runs while A is mid-loop

    monkeypatch.setattr(LoopJob, "_progress", gated)
    jobs = [studio.start("aaaa", studio.model_id, plans[0])]
    for event in jobs[0].events(heartbeat=0.01):
        if event is not None and event.stage == "denoise":
            break
    jobs.append(studio.start("bbbb", studio.model_id, plans[1]))
    outcomes = [[e for e in job.events(heartbeat=0.01) if e is not None][-1] for job in jobs]
    assert [o.kind for o in outcomes] == ["done", "done"], [o.payload for o in outcomes]
    assert overlapped == [True]
    assert ran_on[21] != ran_on[22]  # one pipeline per device
    placed = {m.device: m.policy for m in studio.manager.loaded()}
    assert placed == {"cuda:0": "none", "cuda:1": "sequential"}
    assert {o.payload.model_text.split(" on ")[1].split(",")[0] for o in outcomes} == {"cuda:0", "cuda:1"}
    # The same loops as one run at a time on one device.
    pipe = studio.manager.get(studio.model_id, device="cuda:0").pipe
    for plan in plans:
        reference = generate_loop(pipe, plan.request, output_type="latent").latents
        torch.testing.assert_close(latents[plan.request.seed], reference, rtol=0, atol=0)


# -- 3. GPU faults --------------------------------------------------------------------------------------------------------

class _OOMInjector:
    """Stands in for the transformer's forward: raises CUDA's out-of-memory error on chosen calls, holding a
    'large' tensor in its frame (as a half-finished attention would), else runs the real forward."""

    def __init__(self, real, fail_calls):
        import weakref

        self.real, self.fail_calls, self.calls = real, set(fail_calls), 0
        self.ballast: list = []
        self._weakref = weakref.ref

    def __call__(self, module, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_calls:
            ballast = torch.ones(64, 64)
            self.ballast.append(self._weakref(ballast))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.real(module, *args, **kwargs)


@pytest.fixture
def oom_studio(fake_cuda, tmp_path, monkeypatch):
    """(studio, injector, observations): the demo model on fake cuda:0, everything on the GPU, OOM injection."""
    import sys

    from diffusers import CogVideoXTransformer3DModel

    from loopui.models import ModelManager
    from loopui.studio import Studio

    injector = _OOMInjector(CogVideoXTransformer3DModel.forward, fail_calls=())
    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward",
                        lambda module, *a, **k: injector(module, *a, **k))
    seen = []
    fake_cuda.on_empty_cache = lambda: seen.append(
        (sys.exc_info()[0], [ref() is None for ref in injector.ballast]))
    studio = Studio(manager=ModelManager(max_models=1), demo=True, has_gpu=True, devices="cuda:0",
                    output_root=tmp_path / "out")
    return studio, injector, seen


def _finish(job):
    return [e for e in job.events(heartbeat=0.01) if e is not None]


def test_out_of_memory_mid_run_cleans_up_tells_the_user_and_retries_once_with_offload(oom_studio, fake_cuda):
    studio, injector, seen = oom_studio
    plan = studio.build_request(dict(QUICK, seed=5))
    request = plan.request
    reference = generate_loop(studio.manager.get("demo", device="cuda:0").pipe, request, output_type="latent")
    assert studio.manager.loaded()[0].policy == "none"
    injector.calls, injector.fail_calls = 0, {2}  # the second denoising step of the next run
    fake_cuda.placements.clear()
    seen.clear()
    events = _finish(studio.start("s", "demo", plan))
    assert events[-1].kind == "done", events[-1].payload
    outcome = events[-1].payload
    # Clean-up ran outside the except block, after the failed frames had let go of their tensors.
    assert seen and seen[0] == (None, [True])
    # One retry, with model CPU offload, said on the page; the model keeps that policy.
    assert ("model", "cuda:0") in fake_cuda.placements
    notes = [w for w in outcome.warnings if "Out of GPU memory" in w]
    assert len(notes) == 1 and "model CPU offload" in notes[0] and "smaller size" in notes[0]
    assert any(e.kind == "progress" and "Out of GPU memory" in e.message for e in events)
    assert studio.manager.loaded()[0].policy == "model" and "model CPU offload" in outcome.model_text
    # The retried loop is the loop (offload changes where weights live, not the numbers).
    assert outcome.seam_ratio == pytest.approx(
        generate_loop(studio.manager.get("demo", device="cuda:0").pipe, request).seam_ratio)
    assert reference.latents.shape[1] == 3


def test_out_of_memory_twice_gives_one_clear_message_and_the_app_keeps_serving(oom_studio, fake_cuda):
    studio, injector, seen = oom_studio
    from loopui.studio.results import error_text

    plan = studio.build_request(dict(QUICK))
    injector.fail_calls = set(range(1, 1000))
    events = _finish(studio.start("s", "demo", plan))
    assert events[-1].kind == "error"
    text = error_text(events[-1].payload)
    assert text.startswith("Out of GPU memory on cuda:0 even after retrying with model CPU offload")
    assert "smaller size or fewer frames" in text and "\n" not in text
    assert injector.calls == 2  # the first try and exactly one retry
    # The next request (memory permitting) runs normally on the same, cleaned-up model.
    injector.fail_calls = set()
    assert _finish(studio.start("s", "demo", plan))[-1].kind == "done"


def test_nan_latents_are_a_clear_error_not_a_black_video(tiny_pipe, monkeypatch):
    from loopui.engine import NonFiniteOutput

    real = type(tiny_pipe.transformer).forward

    def poisoned(module, *args, **kwargs):
        out = real(module, *args, **kwargs)
        return (out[0] * float("nan"),) if isinstance(out, tuple) else out

    monkeypatch.setattr(type(tiny_pipe.transformer), "forward", poisoned)
    with pytest.raises(NonFiniteOutput, match="NaN or infinite.*black.*dtype"):
        generate_loop(tiny_pipe, LoopRequest(**QUICK))


# -- 3. Stop during decoding and export -----------------------------------------------------------------------------------

def test_stop_during_decoding_ends_before_the_next_decoder_call(tiny_pipe):
    from loopui.engine import LoopInterrupted

    stop = threading.Event()
    decoder_calls = []
    handle = tiny_pipe.vae.decoder.register_forward_hook(lambda *a: decoder_calls.append(1))

    def progress(stage, step, total):
        if stage == "decode" and step == 0:
            stop.set()  # Stop pressed just as decoding starts

    try:
        with pytest.raises(LoopInterrupted, match="decoding"):
            generate_loop(tiny_pipe, LoopRequest(**QUICK), callback=progress, cancel_event=stop)
    finally:
        handle.remove()
    assert decoder_calls == []
    assert tiny_pipe.vae.decoder._forward_pre_hooks == {}  # the checkpoint is gone again
    assert generate_loop(tiny_pipe, LoopRequest(**QUICK)).frames.shape[0] == 12


def test_stop_between_exports_removes_the_files_already_written(tiny_pipe, tmp_path):
    from loopui.engine import LoopInterrupted, render_loop

    stop = threading.Event()

    def progress(stage, step, total):
        if stage == "export" and step == 1:
            stop.set()  # pressed while the first file was being written

    outputs = [tmp_path / "loop.mp4", tmp_path / "loop.gif", tmp_path / "loop.webp"]
    with pytest.raises(LoopInterrupted, match="writing the files"):
        render_loop(tiny_pipe, LoopRequest(**dict(SMALL, num_frames=9, num_inference_steps=2)), outputs=outputs,
                    callback=progress, cancel_event=stop)
    assert list(tmp_path.iterdir()) == []


# -- 3. VAE tiling for a pipeline the caller built --------------------------------------------------------------------------

def test_vae_tiling_is_switched_on_for_the_decode_on_an_accelerator_unless_the_caller_chose(tiny_pipe, monkeypatch):
    import loopui.engine.guards as guards

    monkeypatch.setattr(guards, "_on_accelerator", lambda pipe: True)
    vae = tiny_pipe.vae
    seen = []
    handle = vae.decoder.register_forward_pre_hook(lambda *a: seen.append((vae.use_tiling, vae.use_slicing)))
    try:
        generate_loop(tiny_pipe, LoopRequest(**dict(SMALL, num_frames=9, num_inference_steps=1)))
        assert seen and set(seen) == {(True, True)}
        assert (vae.use_tiling, vae.use_slicing) == (False, False)  # restored
        seen.clear()
        vae.enable_slicing()  # the caller chose: leave it alone
        generate_loop(tiny_pipe, LoopRequest(**dict(SMALL, num_frames=9, num_inference_steps=1)))
        assert set(seen) == {(False, True)}
    finally:
        handle.remove()
        vae.disable_slicing()
