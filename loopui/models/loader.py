"""Download and build one pipeline: from the Hugging Face Hub (with progress in bytes, a free-disk check and a
stoppable download), from a local diffusers folder, or in code (the demo model).

``PipelineLoader`` is the small interface the ``ModelManager`` loads through; a subclass that overrides
``from_pretrained`` serves the weights from elsewhere (the app tests serve registry ids from saved folders). It only
builds: placing the pipeline on a device is ``loopui.models.memory``'s job, caching it the manager's.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from loopui.messages import REASON_LIMIT, one_line
from loopui.models.registry import ModelSpec

logger = logging.getLogger(__name__)

# progress(stage, fraction or None, message): what a load tells its caller.
LoadProgress = Callable[[str, Optional[float], str], None]


class ModelLoadError(RuntimeError):
    """A model could not be downloaded or loaded; the message names the model and what to do."""


class LoadCancelled(Exception):
    """A load (or the wait for a device) was stopped through its cancel event."""


@dataclass
class LoadedModel:
    """A loaded pipeline and how it was placed (what the UI shows as the model's status)."""

    pipe: Any
    spec: ModelSpec
    device: str
    dtype: str
    policy: str  # "none" | "model" | "group" | "sequential"
    load_seconds: float
    key: tuple = field(default=(), repr=False)
    quantize: str = "none"  # the denoisers' weights: "none" | "fp8" | "int8" (loopui.models.quantize)
    # Leases (``ModelManager.use``): a model in use is never evicted; ``retired`` = released while in use.
    users: int = field(default=0, repr=False, compare=False)
    holders: dict = field(default_factory=dict, repr=False, compare=False)  # thread id -> leases it holds
    retired: bool = field(default=False, repr=False, compare=False)

    def describe(self) -> str:
        """One line such as ``THUDM/CogVideoX-5b on cuda:0, bfloat16 (int8 transformer), model CPU offload, loaded
        in 41.2 s``."""
        placement = {"none": "all on device", "model": "model CPU offload", "group": "group offload",
                     "sequential": "sequential CPU offload"}[self.policy]
        weights = f"{self.dtype} ({self.quantize} transformer)" if self.quantize != "none" else self.dtype
        return (f"{self.spec.model_id} on {self.device}, {weights}, {placement}, "
                f"loaded in {self.load_seconds:.1f} s")


def log_progress(stage: str, fraction: Optional[float], message: str) -> None:
    """The default ``LoadProgress``: one log line per report."""
    logger.info("%s: %s", stage, message)


def load_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions a failed download or load of hub weights raises (what becomes a ``ModelLoadError``)."""
    # diffusers wraps most hub failures in OSError; httpx transport errors (not OSError) can still surface.
    types: list[type[BaseException]] = [OSError, ValueError, RuntimeError, ImportError, KeyError]
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        types.append(httpx.HTTPError)
    return tuple(types)


def check_cancel(cancel: Optional[threading.Event], message: str) -> None:
    """Raise ``LoadCancelled(message)`` when ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise LoadCancelled(message)


class PipelineLoader:
    """Builds one pipeline of a ``ModelSpec`` in a torch dtype, on the CPU.

    ``local_files_only`` never contacts the hub (only already downloaded models load); ``cache_dir`` overrides the
    Hugging Face cache folder.
    """

    def __init__(self, local_files_only: bool = False, cache_dir: Optional[str | Path] = None) -> None:
        self.local_files_only = local_files_only
        self.cache_dir = None if cache_dir is None else str(cache_dir)

    def load(self, spec: ModelSpec, dtype_name: str, progress: LoadProgress,
             cancel: Optional[threading.Event] = None) -> Any:
        """The pipeline of ``spec`` in dtype ``dtype_name`` (built in code for the demo model, else through
        :meth:`from_pretrained`). A hub model's pipeline records the hub id as its ``name_or_path``."""
        import torch

        check_cancel(cancel, f"stopped before loading {spec.model_id}")
        if spec.builtin:
            from loopui.models.demo import build_tiny_cogvideox

            progress("loading", None, f"building {spec.model_id} in code")
            pipe = build_tiny_cogvideox()
            if dtype_name != "float32":  # built in float32; casting a no-op only makes diffusers warn
                pipe.to(dtype=getattr(torch, dtype_name))
        else:
            pipe = self.from_pretrained(spec, getattr(torch, dtype_name), progress, cancel)
        if spec.local_path is None:
            # A hub model loads from its cache snapshot folder; record the id so results and sidecars name it.
            pipe.register_to_config(_name_or_path=spec.model_id)
        return pipe

    def from_pretrained(self, spec: ModelSpec, torch_dtype: Any, progress: LoadProgress,
                        cancel: Optional[threading.Event] = None) -> Any:
        """Download ``spec``'s weights (hub id) or read its folder, and build its diffusers pipeline.

        Raises ``LoadCancelled`` when ``cancel`` stops the download, ``ModelLoadError`` (one line naming the model
        and what to do) when it cannot be fetched or loaded.
        """
        import diffusers

        from loopui.models.download import DownloadCancelled, NotEnoughDisk, format_bytes, watched_download

        cls = getattr(diffusers, spec.pipeline_class)
        folder: str | None = spec.local_path

        def on_bytes(done: int, total: int) -> None:
            if total:
                progress("downloading", done / total, f"downloading {spec.model_id}: {format_bytes(done)} of "
                                                      f"{format_bytes(total)} ({100 * done / total:.0f} %)")
            else:
                progress("downloading", 1.0, f"{spec.model_id}: every file is already in the cache")

        try:
            if folder is None:
                progress("downloading", None, f"fetching {spec.model_id} from the Hugging Face Hub "
                                              f"(the first time this downloads the weights; later runs use the cache)")
                # diffusers/huggingface_hub do the download and the caching; only the files the class needs.
                with watched_download(on_bytes, cancel, self.cache_dir):
                    folder = cls.download(spec.model_id, local_files_only=self.local_files_only,
                                          cache_dir=self.cache_dir)
            check_cancel(cancel, f"stopped before loading {spec.model_id}")
            progress("loading", None, f"loading {spec.model_id} weights")
            # use_safetensors left at diffusers' default: safetensors whenever the folder has them; remote code is
            # never enabled (no custom_pipeline, no trust_remote_code).
            return cls.from_pretrained(folder, dtype=torch_dtype)
        except DownloadCancelled:
            raise LoadCancelled(f"stopped while downloading {spec.model_id}; what was fetched stays in the cache "
                                f"and the next load resumes it") from None
        except NotEnoughDisk as exc:
            raise ModelLoadError(str(exc)) from None
        except load_error_types() as exc:
            raise ModelLoadError(load_failure_message(spec, exc)) from exc


def load_failure_message(spec: ModelSpec, exc: BaseException) -> str:
    """One line saying why ``spec`` could not be loaded and what to do about it."""
    reason = one_line(exc, REASON_LIMIT)
    if spec.local_path is not None:
        return (f"cannot load model folder {spec.local_path}: {reason} -- check it is a complete diffusers "
                f"download (model_index.json plus each component's config and weights)")
    if isinstance(exc, MemoryError) or "out of memory" in reason.lower():
        return f"not enough memory to load {spec.model_id}: {reason}"
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:  # ENOSPC mid-download
        return f"the disk filled up while downloading {spec.model_id}: {reason} -- free some space and retry"
    return (f"cannot download or load {spec.model_id}: {reason} -- if this machine has no network, download it "
            f"elsewhere with `hf download {spec.model_id} --local-dir DIR` and pass that folder as the model")
