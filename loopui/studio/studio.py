"""The app's service without gradio: the model manager, the device pool, the waiting line in front of it and the
running jobs; the page's knobs, mask previews and session files hang off it.

``loopui.ui`` wires this to components and turns ``ValueError`` into ``gr.Error``; everything here returns plain
data, so it reads (and tests) without a browser. Heavy imports (torch, the engine, rembg) happen inside methods.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from loopui.engine.plan import LoopPlan
import loopui.studio.requests as requests
from loopui.studio.devices import cuda_available, device_pool
from loopui.studio.files import DEFAULT_MAX_OUTPUT_AGE_S, DEFAULT_MAX_OUTPUT_BYTES, SessionFiles
from loopui.studio.jobs import JobRegistry, LoopJob, ProgressCallback, WaitingLine
from loopui.studio.knobs import Knobs, model_spec
from loopui.studio.requests import list_lora_dir
from loopui.studio.masks import MaskPreviews
from loopui.studio.results import LoopOutcome, loop_outcome
from loopui.studio.zerogpu import ZERO_GPU_MAX_SECONDS, estimate_gpu_seconds

logger = logging.getLogger(__name__)

# What the page says for an engine stage that needs words of its own (the others are named by the page).
ENGINE_STAGE_TEXTS = {"compile": "compiling (first run only)"}


class Studio:
    """State shared by every session of the app: the model manager, the device pool, the waiting line, the jobs.

    ``manager`` is a ``loopui.models.ModelManager`` (built lazily when None). ``demo`` switches the defaults to the
    tiny random model and preview settings. ``has_gpu`` None = ask torch. ``devices`` picks the GPUs: one job runs
    on each at a time, each device with its own cached model and memory policy (None = every visible GPU, else the
    CPU). ``zero_gpu``: a Hugging Face ZeroGPU Space (one "cuda" device, model loaded at start-up). ``public`` (a
    shared server): registry models only (no folders), requests capped by ``PUBLIC_LIMITS``. ``line`` is the
    waiting line in front of the GPUs (as many places running at once as there are devices); session outputs
    under ``output_root`` older than ``max_output_age_s`` or beyond ``max_output_bytes`` in total are deleted.

    ``lora_dir``: a folder whose ``*.safetensors`` LoRAs the page offers by file name (in public mode the only
    LoRAs a request may use).

    ``knobs`` says what the page offers per model (``loopui.studio.knobs``), ``masks`` makes mask previews and
    ``files`` keeps the session folders.
    """

    def __init__(self, manager: Any = None, model_id: Optional[str] = None, demo: bool = False,
                 has_gpu: Optional[bool] = None, output_root: Optional[Path] = None, devices: Optional[Any] = None,
                 zero_gpu: bool = False, public: bool = False, max_output_age_s: float = DEFAULT_MAX_OUTPUT_AGE_S,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, jobs: Optional[JobRegistry] = None,
                 line: Optional[WaitingLine] = None, pool: Any = None, lora_dir: Optional[Any] = None) -> None:
        from loopui.models import DEFAULT_MODEL_ID, DEMO_MODEL_ID, resolve_model_id

        if manager is None:
            from loopui.models import ModelManager

            manager = ModelManager(max_models=1)
        self.manager = manager
        self.demo = demo
        self.zero_gpu = zero_gpu
        self.model_id = resolve_model_id(str(model_id if model_id is not None else
                                             DEMO_MODEL_ID if demo else DEFAULT_MODEL_ID))
        spec = self.spec(self.model_id)  # a bad --model fails at start, with the registry's message
        if public and spec.local_path is not None:
            raise ValueError(f"public mode serves registry models only, not the folder {self.model_id!r}: pass a "
                             "model id (see `python -m loopui models`) or run without --public")
        self.files = SessionFiles(output_root, max_output_age_s, max_output_bytes)
        self.has_gpu = cuda_available() if has_gpu is None else has_gpu
        self.knobs = Knobs(self.model_id, demo=demo, has_gpu=self.has_gpu, public=public,
                           loras=list_lora_dir(lora_dir) if lora_dir is not None else {})
        self.masks = MaskPreviews()
        self.pool = pool if pool is not None else device_pool(devices, self.has_gpu, zero_gpu)
        # A bad LOOPUI_* setting fails here. ZeroGPU lends the GPU only inside a call: the engine checks there.
        self.knobs.runtime = requests.server_runtime(None if zero_gpu else self.pool.devices[0])
        self.line = line if line is not None else WaitingLine(slots=self.pool.size)
        self.jobs = jobs if jobs is not None else JobRegistry()

    @property
    def public(self) -> bool:
        """Public mode: registry models only, requests and the page's offers capped by ``PUBLIC_LIMITS``."""
        return self.knobs.public

    @public.setter
    def public(self, value: bool) -> None:
        self.knobs.public = bool(value)

    @property
    def loras(self) -> dict[str, str]:
        """The server's own LoRAs (``--lora-dir``): file name -> path."""
        return self.knobs.loras

    @property
    def output_root(self) -> Path:
        """The folder holding every session's outputs."""
        return self.files.root

    @staticmethod
    def spec(model_id: str) -> Any:
        """The registry's ``ModelSpec`` for an id, the ``demo`` alias or a local folder (``ValueError`` if unknown)."""
        return model_spec(model_id)

    # -- requests -------------------------------------------------------------------------------------------------

    def check_model(self, model_id: Any) -> Any:
        """The spec of a model a request names; only the dropdown's models are served (never a path from a client)."""
        return requests.check_model(model_id, self.knobs.served_models(), self.model_id)

    def build_request(self, values: dict, model_id: Any = None) -> LoopPlan:
        """The plan of a validated request (every automatic value filled in), from page or API values, for a model
        this server offers (``loopui.studio.requests.build_request``); ``ValueError`` naming the parameter
        otherwise. ``values["recipe"]`` (a speed recipe's name) fills the values left automatic."""
        loader = getattr(self.manager, "loader", None)  # the manager's hub settings (offline, cache folder)
        plan = requests.build_request(values, self.check_model(model_id), public=self.public,
                                      server_loras=self.loras, recipe=values.get("recipe"),
                                      local_files_only=bool(getattr(loader, "local_files_only", False)),
                                      cache_dir=getattr(loader, "cache_dir", None))
        # Checked against this server's GPUs (all of one kind, or the CPU) before the line.
        if not self.zero_gpu:
            requests.check_runtime(plan.request, self.pool.devices[0])
        server = self.knobs.runtime
        if self.public and server["compile"] and plan.request.attention not in ("auto", server["attention"]):
            raise ValueError(f"attention: this public server compiles its model for its own kernel "
                             f"({server['attention']}); another would compile it again for everyone: leave "
                             f"attention auto")
        return plan

    def page_loras(self, picks: Any, upload: Any, scale: Any, expert: Any) -> list[tuple]:
        """The page's LoRA controls as the request's ``loras``: the server's LoRAs picked by name and an uploaded
        file (refused in public mode), all at one ``scale`` and, on a two-expert model, one ``expert``."""
        names = [picks] if isinstance(picks, str) else list(picks or [])
        scale = 1.0 if scale is None else scale
        expert = expert or "both"
        loras = [(name, scale, expert) for name in names]
        if upload:
            if self.public:
                raise ValueError("loras: this public server uses only its own LoRAs; pick them by name")
            loras.append((str(upload), scale, expert))
        return loras

    def page_values(self, values: dict, model_id: str) -> dict:
        """The page's values as a request: a slider still at the model's automatic value asks for "automatic"
        (``Knobs.page_values``)."""
        return self.knobs.page_values(values, model_id)

    # -- generation -----------------------------------------------------------------------------------------------

    def start(self, session: str, model_id: str, plan: LoopPlan, replace: bool = True) -> LoopJob:
        """Start the generation ``plan`` (:meth:`build_request`'s) in a worker thread: wait in line, then for a free
        device; load (cached) and render there, export, seam strip. The device is held from the load to the last file,
        so no other job loads a model over it. The plan is used as it is: not planned again, its clip not read again.
        ``replace`` cancels the session's earlier jobs (the page); an API client's batch keeps them (``False``).

        Raises ``LineFull`` (a ``ValueError``) at once when the line is full.
        """
        ticket = self.line.join()
        index, stem, outputs = self.files.next_loop(session, plan.request.seed)

        def run(report: ProgressCallback, cancel: threading.Event) -> LoopOutcome:
            from loopui.engine import LoopInterrupted, render_loop
            from loopui.models import LoadCancelled

            notes: list[str] = []

            def on_load(stage: str, fraction: Optional[float], message: str) -> None:
                if stage == "memory":
                    notes.append(message)
                report("load", int(round(100 * (fraction or 0.0))), 100, message)

            def on_wait() -> None:
                report("load", 0, 100, f"Waiting for a free GPU ({self.pool.size} in use by other visitors)…")

            def engine_report(stage: str, step: int, total: int) -> None:
                report(stage, step, total, ENGINE_STAGE_TEXTS.get(stage, ""))

            def work(loaded: Any) -> LoopOutcome:
                if cancel.is_set():
                    raise LoopInterrupted("stopped before sampling started")
                render = render_loop(loaded.pipe, None, outputs=outputs, model_id=loaded.spec.model_id,
                                     callback=engine_report, cancel_event=cancel, plan=plan)
                return loop_outcome(index, render, stem, loaded, notes)

            try:
                self.line.wait(ticket, cancel, lambda ahead, waiting: report("queue", ahead, waiting))
                self.files.sweep()  # before this loop's files exist, so they are never the ones deleted
                report("load", 0, 100, f"Loading {model_id}")
                with self.pool.acquire(prefer=lambda device: self.manager.holds(model_id, device), cancel=cancel,
                                       on_wait=on_wait) as device:
                    return self.manager.run(model_id, work, device=device, progress=on_load, cancel=cancel,
                                            offload="none" if self.zero_gpu else None,
                                            quantize=plan.request.quantize)
            except LoadCancelled as exc:
                raise LoopInterrupted(str(exc)) from None
            finally:
                self.line.done(ticket)

        try:
            return self.jobs.start(session, run, replace=replace)
        except BaseException:
            self.line.done(ticket)
            raise

    def drop_session(self, session: str) -> None:
        """Stop a session's job and delete its files (when its browser tab goes away)."""
        self.jobs.stop(session)
        self.files.drop(session)

    def preload(self) -> Any:
        """Load the start-up model now (ZeroGPU's pattern: weights go to the GPU at start-up, outside any GPU call,
        so a visitor's GPU time is spent generating, not loading 20 GB)."""
        device = self.pool.devices[0]
        logger.info("loading %s on %s at start-up", self.model_id, device)
        return self.manager.get(self.model_id, device=device, offload="none" if self.zero_gpu else None)

    def gpu_seconds(self, model_id: str, values: dict) -> int:
        """GPU seconds to ask ZeroGPU for one generation with these settings (see
        :func:`loopui.studio.zerogpu.estimate_gpu_seconds`)."""
        try:
            spec = self.spec(model_id or self.model_id)
        except ValueError:
            spec = self.spec(self.model_id)
        try:
            return estimate_gpu_seconds(spec, values)
        except (TypeError, ValueError, OverflowError):
            # Malformed values fail validation inside the call with a proper message; this must not crash first.
            return ZERO_GPU_MAX_SECONDS

    def warm_up(self) -> threading.Thread:
        """In a background thread: tidy old outputs, open the default mask model when its weights are on disk (so
        the first mask preview is quick) and, on the demo model, build it (real models load on the first Generate)."""

        def run() -> None:
            from loopui import saliency

            self.files.sweep()
            try:
                if saliency.weights_available(saliency.DEFAULT_MASK_MODEL):
                    saliency.compute_saliency(np.zeros((32, 32, 3), np.uint8), saliency.DEFAULT_MASK_MODEL)
            except (saliency.SaliencyUnavailable, ValueError, OSError) as exc:
                logger.info("mask model warm-up skipped: %s", exc)
            if self.demo:
                from loopui.models import ModelLoadError

                try:
                    self.manager.get(self.model_id)
                except (ModelLoadError, ValueError) as exc:  # the first Generate reports it properly
                    logger.warning("demo model warm-up failed: %s", exc)

        thread = threading.Thread(target=run, name="loopui-warm-up", daemon=True)
        thread.start()
        return thread
