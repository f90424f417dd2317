"""The first run on a GPU box and on a ZeroGPU Space (issue 9, part 3), simulated: no network, no GPU here.

Downloads go through diffusers' real ``DiffusionPipeline.download`` (its file selection and patterns); only the hub
answers are faked (``model_info``, the config file, and the ``snapshot_download`` that diffusers calls, which copies
a saved tiny model into a fake cache in 64 kB chunks and drives the byte bars as huggingface_hub does). ZeroGPU is
a fake ``spaces`` module plus ``fake_cuda``.
"""

from __future__ import annotations

import functools
import shutil
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from fake_cuda import GIB, fake_cuda  # noqa: F401 - pytest fixture
from served_app import free_port

HUB_MODEL = "THUDM/CogVideoX-2b"  # any registry id: its files are the tiny model's here


class FakeHub:
    """diffusers' view of the hub for one repo whose files are those of ``source`` (a saved tiny pipeline)."""

    def __init__(self, source: Path, cache: Path) -> None:
        self.source, self.snapshot = source, cache / "snapshot"
        self.snapshot.mkdir(parents=True)
        shutil.copy(source / "model_index.json", self.snapshot / "model_index.json")
        self.files = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
        self.copied: list[str] = []
        self.calls: list[str] = []
        self.pause_after_first_chunk: threading.Event | None = None

    def install(self, monkeypatch) -> None:
        import diffusers.pipelines.pipeline_utils as pipeline_utils

        monkeypatch.setattr(pipeline_utils, "model_info", lambda repo, **kwargs: SimpleNamespace(
            siblings=[SimpleNamespace(rfilename=f) for f in self.files]))
        monkeypatch.setattr(pipeline_utils, "hf_hub_download", lambda repo, filename, **kwargs: str(
            self.snapshot / filename))
        monkeypatch.setattr(pipeline_utils, "snapshot_download", self.snapshot_download)

    def snapshot_download(self, repo_id, *, allow_patterns=None, ignore_patterns=None, dry_run=False,
                          tqdm_class=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        wanted = list(filter_repo_objects(self.files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        if dry_run:
            self.calls.append("dry run")
            return [SimpleNamespace(filename=f, file_size=(self.source / f).stat().st_size,
                                    will_download=not (self.snapshot / f).exists()) for f in wanted]
        self.calls.append("download")
        missing = [f for f in wanted if not (self.snapshot / f).exists()]
        # As huggingface_hub does: one files bar, byte bars whose totals grow as files start.
        files_bar = tqdm_class(total=len(missing), desc=f"Fetching {len(missing)} files")
        bytes_bar = tqdm_class(desc="Reconstructing (incomplete total...)", total=0, unit="B", unit_scale=True)
        for name in missing:
            data = (self.source / name).read_bytes()
            bytes_bar.total += len(data)
            target = self.snapshot / name
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".incomplete")
            with open(partial, "wb") as handle:
                for start in range(0, max(len(data), 1), 65536):
                    handle.write(data[start:start + 65536])
                    bytes_bar.update(len(data[start:start + 65536]))
            partial.rename(target)
            self.copied.append(name)
            files_bar.update(1)
        return str(self.snapshot)


@pytest.fixture
def hub(tiny_model_dir, tmp_path, monkeypatch):
    import loopui.models.download as download

    fake = FakeHub(Path(tiny_model_dir), tmp_path / "hub-cache")
    fake.install(monkeypatch)
    monkeypatch.setattr(download, "REPORT_EVERY_SECONDS", 0.0)  # every chunk reported: deterministic counts
    return fake


def _weights_bytes(hub: FakeHub) -> int:
    return sum((hub.source / f).stat().st_size for f in hub.files if f != "model_index.json")


# -- download: progress in bytes, disk check, Stop ----------------------------------------------------------------------

def test_first_download_reports_progress_in_bytes(hub, tmp_path):
    from loopui.models import ModelManager

    seen = []
    loaded = ModelManager(cache_dir=tmp_path / "hub-cache").get(
        HUB_MODEL, progress=lambda stage, fraction, message: seen.append((stage, fraction, message)))
    assert type(loaded.pipe).__name__ == "CogVideoXPipeline"
    assert hub.calls == ["dry run", "download"]
    fractions = [f for stage, f, _ in seen if stage == "downloading" and f is not None]
    assert len(fractions) > 5 and fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] < 0.2
    from loopui.models.download import format_bytes

    last = [m for stage, f, m in seen if stage == "downloading" and f == 1.0][-1]
    assert last.endswith(f"{format_bytes(_weights_bytes(hub))} of {format_bytes(_weights_bytes(hub))} (100 %)")
    assert [stage for stage, _, _ in seen][-1] == "ready"


def test_a_full_disk_is_said_before_the_download_starts(hub, tmp_path, monkeypatch):
    import loopui.models.download as download
    from loopui.models import ModelLoadError, ModelManager

    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: SimpleNamespace(free=1 * GIB, total=100 * GIB,
                                                                                   used=99 * GIB))
    with pytest.raises(ModelLoadError) as info:
        ModelManager(cache_dir=tmp_path / "hub-cache").get(HUB_MODEL)
    message = str(info.value)
    assert message.startswith("not enough free disk space for THUDM/CogVideoX-2b")
    assert "1.1 GB is free" in message and "HF_HOME" in message and "no network" not in message
    assert hub.calls == ["dry run"] and hub.copied == []


def test_stop_during_a_download_ends_it_and_the_next_load_resumes(hub, tmp_path):
    from loopui.models import LoadCancelled, ModelManager

    manager = ModelManager(cache_dir=tmp_path / "hub-cache")
    stop = threading.Event()

    def progress(stage, fraction, message):
        if stage == "downloading" and fraction and fraction > 0:
            stop.set()  # Stop pressed once bytes are flowing

    with pytest.raises(LoadCancelled, match="stopped while downloading THUDM/CogVideoX-2b.*resumes"):
        manager.get(HUB_MODEL, progress=progress, cancel=stop)
    assert manager.loaded() == [] and len(hub.copied) < len(hub.files) - 1
    first_round = list(hub.copied)
    fractions = []
    manager.get(HUB_MODEL, progress=lambda s, f, m: fractions.append(f) if s == "downloading" and f else None)
    assert set(first_round).isdisjoint(hub.copied[len(first_round):])  # only the rest was fetched
    assert fractions[-1] == 1.0 and len(manager.loaded()) == 1


def test_stop_while_downloading_in_the_app_reads_stopped(hub, tmp_path, monkeypatch):
    from loopui.models import ModelManager
    from loopui.studio import LoopJob, Studio

    studio = Studio(manager=ModelManager(cache_dir=tmp_path / "hub-cache"), model_id=HUB_MODEL, has_gpu=False,
                    output_root=tmp_path / "out")
    progress = LoopJob._progress

    def press_stop(self, stage, step, total, message=""):
        progress(self, stage, step, total, message)
        if stage == "load" and "downloading" in message and "%" in message:
            self.cancel()

    monkeypatch.setattr(LoopJob, "_progress", press_stop)
    plan = studio.build_request(dict(prompt="waves", height=32, width=48, num_inference_steps=2))
    events = [e for e in studio.start("s", HUB_MODEL, plan).events(heartbeat=0.01) if e is not None]
    from loopui.engine import LoopInterrupted

    assert events[-1].kind == "error" and isinstance(events[-1].payload, LoopInterrupted)
    assert "stopped while downloading" in str(events[-1].payload)
    assert any("B of" in e.message and "%" in e.message for e in events if e.kind == "progress")


# -- ZeroGPU: load at start-up, size the GPU time --------------------------------------------------------------------------

@pytest.fixture
def zero_gpu(monkeypatch, fake_cuda):
    """A fake ``spaces`` package whose ``GPU(duration=...)`` records the duration, on a ZeroGPU Space."""
    recorded = {}

    def GPU(duration=60):  # noqa: N802 - the real name
        def decorate(fn):
            recorded["duration"] = duration

            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                recorded["calls"] = recorded.get("calls", 0) + 1
                return fn(*args, **kwargs)

            return wrapper

        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    return recorded


def test_zero_gpu_loads_the_model_at_start_up_and_sizes_the_gpu_time(zero_gpu, monkeypatch, tmp_path):
    import app
    import loopui.studio
    import loopui.ui
    from loopui.ui import build_app as real_build_app

    built = {}

    class FakeDemo:
        mcp_server = False

        def launch(self, **kwargs):
            built["launched"] = True

        def block_thread(self):
            pass

    def build_app(studio):
        built["studio"] = studio
        built["loads_before_build"] = studio.manager.load_count
        built["generate"] = real_build_app(studio)
        return FakeDemo()

    monkeypatch.setattr(loopui.ui, "build_app", build_app)
    monkeypatch.setattr(loopui.studio.Studio, "warm_up", lambda self: None)
    monkeypatch.chdir(tmp_path)
    assert app.main(["--demo", "--port", str(free_port())]) == 0  # never the README app's 7860: it may be running
    studio = built["studio"]
    assert studio.zero_gpu and studio.pool.devices == ["cuda"] and built["launched"]
    # The GPU is not asked at start-up (ZeroGPU lends it only inside a call): the kernel is chosen there.
    assert studio.knobs.runtime == {"attention": "chosen on the GPU", "compile": False, "quantize": "none"}
    # Compiling there would compile again in every fresh worker: refused at start, in one line naming the setting.
    from loopui.studio.requests import server_runtime

    monkeypatch.setenv("LOOPUI_COMPILE", "1")
    with pytest.raises(ValueError, match="^LOOPUI_COMPILE: a ZeroGPU Space"):
        server_runtime(None)
    monkeypatch.delenv("LOOPUI_COMPILE")
    # Loaded before the page was built (so before any visitor's GPU call), all on the GPU.
    assert built["loads_before_build"] == 1
    (model,) = studio.manager.loaded()
    assert (model.device, model.policy) == ("cuda:0", "none")
    # A generation (inside the GPU call) finds it loaded.
    plan = studio.build_request(dict(prompt="waves", height=32, width=48, num_frames=9, num_inference_steps=2))
    last = [e for e in studio.start("s", studio.model_id, plan).events(heartbeat=0.01) if e is not None][-1]
    assert last.kind == "done" and studio.manager.load_count == 1
    # The GPU time asked for follows the request, through generate's own arguments.
    duration = zero_gpu["duration"]
    assert callable(duration)
    assert duration(prompt="x", num_inference_steps=4, num_frames=49, model="THUDM/CogVideoX-5b",
                    height=64, width=96) == 30
    full = duration(prompt="x", num_inference_steps=50, num_frames=49, model="THUDM/CogVideoX-5b")
    assert 100 < full < 200


def test_gpu_seconds_grow_with_steps_frames_size_and_model():
    from loopui.models import spec_for
    from loopui.studio.zerogpu import ZERO_GPU_MAX_SECONDS, estimate_gpu_seconds

    five, two = spec_for("THUDM/CogVideoX-5b"), spec_for("THUDM/CogVideoX-2b")
    base = estimate_gpu_seconds(five, {"num_inference_steps": 50})
    assert estimate_gpu_seconds(five, {"num_inference_steps": 25}) < base
    assert estimate_gpu_seconds(two, {"num_inference_steps": 50}) < base
    assert estimate_gpu_seconds(five, {"num_inference_steps": 50, "height": 320, "width": 480}) < base
    # Window mode pays for its overlaps at twice the trained length, but grows linearly; one full pass grows
    # quadratically (attention), so at four to five times the trained length windows are cheaper.
    def cost(frames: int, mode: str) -> int:
        return estimate_gpu_seconds(five, {"num_inference_steps": 5, "num_frames": frames, "window_mode": mode})

    assert cost(97, "window") > cost(97, "full") and cost(241, "window") < cost(241, "full")
    assert estimate_gpu_seconds(five, {"num_inference_steps": 50, "seam_polish": "strong"}) > base
    assert estimate_gpu_seconds(five, {"num_inference_steps": 200, "num_frames": 241}) == ZERO_GPU_MAX_SECONDS
    # Steps left empty are the model's own: 40 for Wan 2.2 A14B, not 50.
    a14b = spec_for("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    assert estimate_gpu_seconds(a14b, {}) == estimate_gpu_seconds(a14b, {"num_inference_steps": 40}) < \
        estimate_gpu_seconds(a14b, {"num_inference_steps": 50})
    # With a sigma list they are one per sigma (a 4-step distilled loop is not sized as 40 steps).
    assert estimate_gpu_seconds(a14b, {"sigmas": "1, 0.9375, 0.8333, 0.625"}) == \
        estimate_gpu_seconds(a14b, {"num_inference_steps": 4})


def test_gpu_seconds_of_malformed_values_do_not_crash_the_call(fake_cuda):
    from loopui.studio import Studio
    from loopui.studio.zerogpu import ZERO_GPU_MAX_SECONDS

    studio = Studio(demo=True, devices="cuda:0")
    assert studio.gpu_seconds("THUDM/CogVideoX-5b", {"num_inference_steps": "lots"}) == ZERO_GPU_MAX_SECONDS
    assert studio.gpu_seconds("Wan-AI/Wan2.2-T2V-A14B-Diffusers", {"sigmas": "high"}) == ZERO_GPU_MAX_SECONDS
    unknown = studio.gpu_seconds("no/such-model", {"num_inference_steps": 4})
    assert unknown == studio.gpu_seconds(studio.model_id, {"num_inference_steps": 4})  # sized for the default


# -- several GPUs in the app ------------------------------------------------------------------------------------------------

def test_app_devices_flag_sets_the_pool_and_the_queue_runs_one_job_per_device(fake_cuda, monkeypatch):
    import app
    import loopui.ui
    from loopui.studio import Studio
    from loopui.ui import build_app

    studio = Studio(demo=True, devices="cuda:0,cuda:1")
    assert studio.pool.devices == ["cuda:0", "cuda:1"]
    generate = next(fn for fn in build_app(studio).fns.values() if fn.api_name == "generate")
    # Gradio admits every generation (no limit of its own: they wait in the studio's own line, which answers "busy"
    # past its capacity); two run at once, one per device.
    assert studio.line.slots == 2 and generate.concurrency_limit is None
    assert app.parse_args(["--devices", "cuda:1"]).devices == "cuda:1"
    monkeypatch.setattr(loopui.ui, "build_app", lambda studio: pytest.fail("must not get this far"))
    # A device that does not exist: refused at start (on a free port, so the refusal is the device's).
    assert app.main(["--demo", "--devices", "cuda:7", "--port", str(free_port())]) == 2


def test_gpu_seconds_follow_a_speed_recipe_and_no_cfg():
    """A 4-step recipe without classifier-free guidance asks ZeroGPU for far less than the model's 40 steps with it;
    guidance 1 halves a step."""
    from loopui.models import spec_for
    from loopui.studio.zerogpu import estimate_gpu_seconds

    a14b = spec_for("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    automatic = estimate_gpu_seconds(a14b, {})
    recipe = estimate_gpu_seconds(a14b, {"recipe": "lightx2v-4step"})
    assert recipe < automatic / 4
    assert estimate_gpu_seconds(a14b, {"num_inference_steps": 10, "guidance_scale": 1}) < \
        estimate_gpu_seconds(a14b, {"num_inference_steps": 10})
