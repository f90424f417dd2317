"""A CLIP model for the loop scores (CLIP score, CLIP-I, frame consistency, Loop-C in CLIP space).

Loaded like the video models: a hub id (downloaded once by huggingface_hub into its cache) or a local folder with
``config.json``, the weights, a tokenizer and ``preprocessor_config.json`` (what ``save_pretrained`` of a
``CLIPModel``, its tokenizer and its ``CLIPImageProcessor`` writes). Nothing is loaded at import.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from loopui.messages import REASON_LIMIT, one_line
from loopui.models.loader import ModelLoadError, load_error_types

logger = logging.getLogger(__name__)

# A suggestion for the docs and help text; nothing downloads unless the user names a model.
SUGGESTED_CLIP_MODEL = "openai/clip-vit-base-patch32"


class ClipEmbedder:
    """Unit-length CLIP embeddings of frames and prompts (what ``loopui.media.loop_scores`` takes as ``clip``)."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, device: str, name: str,
                 batch_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.name = name
        self.batch_size = batch_size

    @staticmethod
    def _embedding(output: Any) -> Any:
        # transformers 4 returns the projected embeddings as a tensor; transformers 5 returns a model output whose
        # pooler_output holds them.
        return output if hasattr(output, "ndim") else output.pooler_output

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 -> ``(N, D)`` float32, unit rows (the processor resizes and crops as trained)."""
        import torch

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        rows = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = list(images[start:start + self.batch_size])
                pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
                pixels = pixels.to(device=self.device, dtype=self.model.dtype)
                rows.append(self._embedding(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        e = torch.cat(rows)
        return torch.nn.functional.normalize(e, dim=-1).numpy()

    def embed_text(self, text: str) -> np.ndarray:
        """A prompt -> ``(D,)`` float32 unit vector (cut to the model's text length, as CLIP was trained)."""
        import torch

        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer([text], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            e = self._embedding(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                             attention_mask=tokens["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(e.float().cpu(), dim=-1)[0].numpy()


def load_clip(model: str | Path, device: Optional[str] = None, local_files_only: bool = False,
              cache_dir: Optional[str | Path] = None) -> ClipEmbedder:
    """Load a CLIP model by hub id or local folder (float32; CUDA when available unless ``device`` says otherwise).

    Raises:
        ModelLoadError: the model cannot be downloaded or loaded (one line naming it and what to do).
    """
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    name = str(model)
    folder = Path(name).expanduser()
    source = str(folder) if folder.exists() else name
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = dict(local_files_only=local_files_only, cache_dir=None if cache_dir is None else str(cache_dir))
    try:
        clip = CLIPModel.from_pretrained(source, **kwargs).eval().to(device)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    except load_error_types() as exc:
        hint = ("check it holds a CLIPModel saved with save_pretrained plus its tokenizer and image processor"
                if folder.exists() else
                f"if this machine has no network, download it elsewhere with `hf download {name} --local-dir DIR` "
                f"and pass that folder")
        raise ModelLoadError(f"cannot load CLIP model {name}: {one_line(exc, REASON_LIMIT)} -- {hint}") from exc
    logger.info("loaded CLIP model %s on %s", name, device)
    return ClipEmbedder(clip, tokenizer, processor, device=device, name=name)
