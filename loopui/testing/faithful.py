"""Config-faithful test models: every registry model's real configuration, built small with random weights.

``configs/<slug>.json`` holds the public config facts of each supported hub model (pipeline, transformer(s), VAE,
scheduler, text encoder, tokenizer, image encoder), with a ``sources`` list saying where each came from; where a
hub file's hash was found, the stored JSON reproduces it byte for byte (checked in the tests).

``build_faithful_pipeline`` builds the stock diffusers pipeline from those configs, changing only width and depth
(``SHRUNK_KEYS``): layers, attention heads (never the head dimension, so rotary dims stay real), feed-forward widths,
VAE channel widths and block counts, the text encoder's depth/heads/vocabulary and the CLIP tower's depth. Every
other flag -- patch sizes, sample sizes, learned positional embeddings, rope settings, text/image embedding dims,
latent channels, scaling factors, latents mean/std, compressions, the scheduler and its settings, pipeline config
(boundary_ratio, expand_timesteps) -- is the real one. ``build_true_size`` builds the full-size architecture with
random weights for speed benchmarks.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_SLUGS: dict[str, str] = {
    "THUDM/CogVideoX-2b": "cogvideox-2b",
    "THUDM/CogVideoX-5b": "cogvideox-5b",
    "THUDM/CogVideoX-5b-I2V": "cogvideox-5b-i2v",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan2.1-t2v-1.3b-diffusers",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "wan2.1-t2v-14b-diffusers",
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": "wan2.1-i2v-14b-480p-diffusers",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "wan2.2-ti2v-5b-diffusers",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "wan2.2-t2v-a14b-diffusers",
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": "wan2.2-i2v-a14b-diffusers",
}
FAITHFUL_MODELS: tuple[str, ...] = tuple(_SLUGS)

# Components whose stored config is a model/scheduler/processor config (the rest of a config file is prose).
MODEL_COMPONENTS = ("transformer", "transformer_2", "vae", "text_encoder", "image_encoder")
CONFIG_COMPONENTS = MODEL_COMPONENTS + ("scheduler", "image_processor")

# File metadata in a stored config: who wrote it and when, not how the module is built.
METADATA_KEYS = frozenset(
    {"_class_name", "_diffusers_version", "_name_or_path", "architectures", "transformers_version", "torch_dtype"}
)
# Keys a hub file still carries that the installed diffusers no longer accepts (and ignores when loading).
IGNORED_KEYS: dict[str, frozenset[str]] = {
    "AutoencoderKLWan": frozenset({"clip_output"}),  # removed in diffusers PR #12041; Wan2.2 TI2V's file has it
}

# Keys the library itself rewrites when it builds the class from the real config (so from_pretrained of the hub
# checkpoint shows the same values): transformers 5 sets is_encoder_decoder False on an encoder-only T5, and its
# UMT5Config forces tie_word_embeddings True (the hub's false becomes scale_decoder_outputs). Encoder-only models
# have no lm_head, so neither changes the architecture.
LIBRARY_REWRITTEN_KEYS: dict[str, frozenset[str]] = {
    "T5EncoderModel": frozenset({"is_encoder_decoder"}),
    "UMT5EncoderModel": frozenset({"tie_word_embeddings"}),
}

# Per class: the only config keys a faithful build changes (width and depth). Everything else is the real value.
SHRUNK_KEYS: dict[str, tuple[str, ...]] = {
    "WanTransformer3DModel": ("num_layers", "num_attention_heads", "ffn_dim", "added_kv_proj_dim"),
    "CogVideoXTransformer3DModel": ("num_layers", "num_attention_heads"),
    "AutoencoderKLWan": ("base_dim", "decoder_base_dim", "num_res_blocks"),
    "AutoencoderKLCogVideoX": ("block_out_channels", "layers_per_block", "norm_num_groups"),
    "UMT5EncoderModel": ("num_layers", "num_decoder_layers", "num_heads", "d_ff", "vocab_size"),
    "T5EncoderModel": ("num_layers", "num_decoder_layers", "num_heads", "d_ff", "vocab_size"),
    "CLIPVisionModelWithProjection": ("num_hidden_layers", "intermediate_size"),
    "CLIPVisionModel": ("num_hidden_layers", "intermediate_size"),
}

# The character-level tokenizer (loopui.models.demo) has 71 tokens; one embedding-table size for every encoder.
_TINY_VOCAB = 128

DEFAULT_SHRINK: dict[str, int] = {
    "layers": 1,  # transformer blocks (each expert of a two-expert model)
    "heads": 2,  # attention heads; attention_head_dim stays real (Wan 128, CogVideoX 64)
    "ffn_dim": 32,  # Wan feed-forward width (CogVideoX's is tied to the inner dim)
    "vae_divisor": 16,  # VAE channel widths are the real ones divided by this (at least 4)
    "vae_blocks": 1,  # res blocks per VAE stage
    "text_layers": 1,
    "text_heads": 2,  # d_kv and d_model (4096 = the transformers' text dim) stay real
    "text_ff": 32,
    "clip_layers": 2,  # diffusers reads hidden_states[-2]: two layers keep one block in the path
    "clip_intermediate": 64,
}


def _slug(model_id: str) -> str:
    try:
        return _SLUGS[model_id]
    except KeyError:
        raise ValueError(f"model_id: no faithful config for {model_id!r}; known: {', '.join(FAITHFUL_MODELS)}") from None


def load_config(model_id: str) -> dict:
    """The stored real configuration of ``model_id`` (a fresh copy): components, ``recommended``, ``sources``."""
    with (CONFIG_DIR / f"{_slug(model_id)}.json").open(encoding="utf-8") as f:
        return json.load(f)


def component_class_name(component_config: Mapping[str, Any]) -> str:
    """The class a stored component config builds (diffusers ``_class_name``, transformers ``architectures[0]``)."""
    if "_class_name" in component_config:
        return component_config["_class_name"]
    return component_config["architectures"][0]


def constructor_kwargs(component_config: Mapping[str, Any]) -> dict:
    """A stored component config as constructor arguments: metadata and keys the installed library dropped removed."""
    class_name = component_class_name(component_config)
    ignored = IGNORED_KEYS.get(class_name, frozenset())
    return {k: copy.deepcopy(v) for k, v in component_config.items() if k not in METADATA_KEYS and k not in ignored}


def shrunk_overrides(class_name: str, config: Mapping[str, Any], **shrink: int) -> dict:
    """The width/depth overrides a faithful build applies to one component (keys are a subset of ``SHRUNK_KEYS``)."""
    unknown = set(shrink) - set(DEFAULT_SHRINK)
    if unknown:
        raise ValueError(f"shrink: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULT_SHRINK)}")
    s = {**DEFAULT_SHRINK, **shrink}
    if class_name == "WanTransformer3DModel":
        out = {"num_layers": s["layers"], "num_attention_heads": s["heads"], "ffn_dim": s["ffn_dim"]}
        if config.get("added_kv_proj_dim") is not None:
            # the real one equals the inner dim (40 x 128 = 5120); keep that relation
            out["added_kv_proj_dim"] = s["heads"] * config["attention_head_dim"]
        return out
    if class_name == "CogVideoXTransformer3DModel":
        return {"num_layers": s["layers"], "num_attention_heads": s["heads"]}
    if class_name == "AutoencoderKLWan":
        out = {"base_dim": max(4, config["base_dim"] // s["vae_divisor"]), "num_res_blocks": s["vae_blocks"]}
        if config.get("decoder_base_dim") is not None:
            out["decoder_base_dim"] = max(4, config["decoder_base_dim"] // s["vae_divisor"])
        return out
    if class_name == "AutoencoderKLCogVideoX":
        widths = [max(4, c // s["vae_divisor"]) for c in config["block_out_channels"]]
        # GroupNorm needs groups dividing every width (the real 32 divides 128/256/512)
        return {"block_out_channels": widths, "layers_per_block": s["vae_blocks"],
                "norm_num_groups": math.gcd(4, *widths)}
    if class_name in ("UMT5EncoderModel", "T5EncoderModel"):
        return {"num_layers": s["text_layers"], "num_decoder_layers": s["text_layers"], "num_heads": s["text_heads"],
                "d_ff": s["text_ff"], "vocab_size": _TINY_VOCAB}
    if class_name in ("CLIPVisionModelWithProjection", "CLIPVisionModel"):
        return {"num_hidden_layers": s["clip_layers"], "intermediate_size": s["clip_intermediate"]}
    return {}


def _tokenizer(model_max_length: int):
    from loopui.models.demo import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.model_max_length = model_max_length
    return tok


def _build_component(name: str, config: Mapping[str, Any], seed: int, shrink: Mapping[str, int],
                     true_size: bool = False):
    """Instantiate one model component from its stored config (random weights, eval mode)."""
    import torch

    class_name = component_class_name(config)
    kwargs = constructor_kwargs(config)
    if not true_size:
        kwargs.update(shrunk_overrides(class_name, config, **shrink))
    torch.manual_seed(seed)
    if name in ("text_encoder", "image_encoder"):
        import transformers

        if class_name.startswith("CLIPVision"):
            kwargs.pop("model_type", None)
            cfg = transformers.CLIPVisionConfig(**kwargs)
        elif class_name == "UMT5EncoderModel":
            cfg = transformers.UMT5Config(**kwargs)
        else:
            cfg = transformers.T5Config(**kwargs)
        module = getattr(transformers, class_name)(cfg)
    else:
        import diffusers

        module = getattr(diffusers, class_name).from_config(kwargs)
    # freshly built modules are in training mode: dropout (T5) would make runs differ
    return module.eval()


def _build_scheduler(config: Mapping[str, Any]):
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(constructor_kwargs(config))


def _build_image_processor(config: Mapping[str, Any]):
    import transformers

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(transformers, config["_class_name"])(**kwargs)


def _pipeline_class_and_extras(model_index: Mapping[str, Any]):
    import diffusers

    cls = getattr(diffusers, model_index["_class_name"])
    extras = {k: model_index[k] for k in ("boundary_ratio", "expand_timesteps") if k in model_index}
    return cls, extras


def build_faithful_pipeline(model_id: str, seed: int = 0, pipeline_class: Optional[str] = None, **shrink: int):
    """Build ``model_id``'s stock diffusers pipeline from its real configs, shrunk only in width and depth.

    Weights are random (seeded); every module is in eval mode. ``shrink`` overrides ``DEFAULT_SHRINK``
    (e.g. ``layers=2``). The pipeline class, scheduler and pipeline config are exactly the hub's, unless
    ``pipeline_class`` names another stock pipeline to put over the same components and pipeline config (e.g.
    ``"WanImageToVideoPipeline"`` for Wan2.2 TI2V-5B's image-to-video mode).
    """
    stored = load_config(model_id)
    components: dict[str, Any] = {}
    for i, name in enumerate(MODEL_COMPONENTS):
        if name in stored:
            components[name] = _build_component(name, stored[name], seed + i, shrink)
    components["scheduler"] = _build_scheduler(stored["scheduler"])
    max_len = stored["tokenizer"].get("model_max_length") or stored["tokenizer"]["model_max_length_used_by_pipeline"]
    components["tokenizer"] = _tokenizer(int(max_len))
    if "image_processor" in stored:
        components["image_processor"] = _build_image_processor(stored["image_processor"])
    cls, extras = _pipeline_class_and_extras(stored["model_index"])
    if pipeline_class is not None:
        import diffusers

        if not pipeline_class.endswith("Pipeline") or not hasattr(diffusers, pipeline_class):
            raise ValueError(f"pipeline_class: {pipeline_class!r} is not a diffusers pipeline")
        cls = getattr(diffusers, pipeline_class)
    pipe = cls(**components, **extras)
    pipe.set_progress_bar_config(disable=True)
    logger.debug("built faithful %s (%s)", model_id, cls.__name__)
    return pipe


def save_faithful_pipeline(model_id: str, directory: str | Path, seed: int = 0, **shrink: int) -> Path:
    """Build a faithful pipeline and ``save_pretrained`` it into ``directory`` (a loadable diffusers folder)."""
    directory = Path(directory)
    pipe = build_faithful_pipeline(model_id, seed=seed, **shrink)
    pipe.save_pretrained(directory, safe_serialization=True)
    logger.info("saved faithful %s to %s", model_id, directory)
    return directory


def _fill_random_(module, std: float) -> None:
    """Small normal noise for weights, ones/zeros for norm scales/shifts: finite outputs through deep stacks."""
    import torch

    with torch.no_grad():
        for mod in module.modules():
            is_norm = "norm" in type(mod).__name__.lower()
            for pname, p in mod.named_parameters(recurse=False):
                if is_norm and pname in ("weight", "gamma", "scale"):
                    p.fill_(1.0)
                elif pname in ("bias", "beta") or (is_norm and p.ndim == 1):
                    p.zero_()
                else:
                    p.normal_(0.0, std)


def _build_on_meta(model_id: str, name: str, config_overrides: Optional[Mapping[str, Any]] = None):
    from accelerate import init_empty_weights

    stored = load_config(model_id)
    if name not in stored or name not in MODEL_COMPONENTS:
        raise ValueError(f"components: {model_id} has no model component {name!r}")
    config = dict(stored[name])
    config.update(config_overrides or {})
    # parameters on the meta device (no memory), buffers real: rotary and sincos tables are computed here
    with init_empty_weights():
        return _build_component(name, config, seed=0, shrink={}, true_size=True)


def count_true_size_weights(model_id: str, component: str) -> int:
    """Number of stored weights (parameters and persistent buffers) of the full-size ``component``.

    Built on the meta device, so it costs no memory; weights tied to each other (T5's shared embedding) count once,
    as a checkpoint stores them. Times the bytes per element, this is the component's size at that dtype.
    """
    module = _build_on_meta(model_id, component)
    tied = set(getattr(module, "_tied_weights_keys", None) or ())
    return sum(t.numel() for k, t in module.state_dict().items() if k not in tied)


def build_true_size(model_id: str, components: Iterable[str] = ("transformer", "vae"), device: str = "cuda",
                    dtype=None, std: float = 0.02, config_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None
                    ) -> dict:
    """The full-size architecture of ``components`` with random weights on ``device``, for speed benchmarks.

    Built on the meta device (accelerate's ``init_empty_weights``), materialised with ``to_empty`` and filled with
    N(0, ``std``) weights (norm scales 1, biases 0), so a 14B transformer builds in seconds on a GPU. Buffers computed
    at construction (rotary tables, sincos position tables) keep their values. Modules listed in a class's
    ``_keep_in_fp32_modules`` stay float32, as ``from_pretrained`` keeps them. ``config_overrides`` (per component)
    exists so tests can build a reduced stand-in on CPU. Returns ``{component: module}``.
    """
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    out = {}
    for name in components:
        module = _build_on_meta(model_id, name, (config_overrides or {}).get(name))
        # to_empty would discard the real buffers' values, so keep copies
        saved = {k: b.detach().clone() for k, b in module.named_buffers() if b.device.type != "meta"}
        module = module.to_empty(device=device)
        for k, b in module.named_buffers():
            if k in saved:
                b.copy_(saved[k].to(b.device))
        _fill_random_(module, std)
        keep_fp32 = getattr(module, "_keep_in_fp32_modules", None) or []
        for pname, p in module.named_parameters():
            if p.is_floating_point() and not any(part in keep_fp32 for part in pname.split(".")):
                p.data = p.data.to(dtype)
        out[name] = module.eval()
    return out
