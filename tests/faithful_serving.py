"""A model manager for app tests that serves registry ids from saved config-faithful folders (never the hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from loopui.models import ModelLoadError, ModelManager, PipelineLoader


class FaithfulLoader(PipelineLoader):
    """Reads ``folders[model_id]`` (a ``save_faithful_pipeline`` folder) instead of downloading; any other hub id
    fails to load, as an unreachable hub would."""

    def __init__(self, folders: Mapping[str, Path]) -> None:
        super().__init__()
        self.folders = dict(folders)

    def from_pretrained(self, spec: Any, torch_dtype: Any, progress: Any, cancel: Any = None) -> Any:
        import diffusers

        folder = self.folders.get(spec.model_id)
        if folder is None:
            raise ModelLoadError(f"could not load {spec.model_id}: not among the test's faithful folders")
        progress("loading", None, f"loading {spec.model_id} (faithful test folder)")
        pipe = getattr(diffusers, spec.pipeline_class).from_pretrained(folder, dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe


class FaithfulManager(ModelManager):
    """``ModelManager`` whose loader is a ``FaithfulLoader`` over ``folders``."""

    def __init__(self, folders: Mapping[str, Path], **kwargs: Any) -> None:
        super().__init__(loader=FaithfulLoader(folders), **kwargs)
