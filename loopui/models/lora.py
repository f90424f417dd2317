"""LoRAs on a loaded pipeline: find the file (local or on the hub), hash it, load it once with diffusers'
``load_lora_weights``, and switch adapters between generations.

diffusers does all the reading: ``load_lora_weights`` converts diffusers/PEFT, Kohya/musubi, ComfyUI, lightx2v and
CausVid keys to its own, and PEFT injects the adapters; ``set_adapters`` sets the scales. The key names are read here
only to say, when a file does not fit, which model it seems to be for.

One adapter per (file content, denoiser): a file is loaded once per pipeline and named by its sha256, so requests
that share it share the weights; a request activates exactly its own set (every other adapter off). Wan 2.2 A14B
loads a LoRA into its high-noise expert (``transformer``), its low-noise expert (``transformer_2``,
``load_into_transformer_2``) or both. At most ``MAX_ADAPTERS`` adapters stay per denoiser; the least recently used
is deleted first, and they all go when the model is released (``unload_loras``).

Fusing (``fuse_lora``) folds a set into the weights so the LoRA costs nothing per step. A set is fused once it
serves a second request in a row (policy ``auto``; ``always`` fuses at once, ``never`` not at all); the weights it
changes are kept on the CPU first, so switching to another set puts back the exact original weights (an unfuse
by subtraction would leave rounding residue in bf16 -- another request would see it). ``single`` is for a process
that serves one set (the CLI): folded at once and no copy kept (a 14B model's copy is many GB of RAM); should
another set come after all, the set is unfolded by subtraction, with a warning.

Every function that changes adapters must run under the engine's pipeline lock (``generate_loop`` calls
:func:`active_loras` inside it): adapters are module state shared by every call on the pipeline.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from loopui.messages import REASON_LIMIT, one_line

logger = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
FUSE_POLICIES = ("auto", "always", "never", "single")
MAX_ADAPTERS = 8  # per denoiser; a LoRA of a 14B model is 0.1-1 GB
# diffusers' default file name in a LoRA repo (diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE)
HUB_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMPONENTS = ("transformer", "transformer_2")
_EXPERT_COMPONENTS = {"both": ("transformer", "transformer_2"), "high": ("transformer",), "low": ("transformer_2",)}


@dataclass(frozen=True)
class LoraFile:
    """A LoRA of a request, found and hashed: what is loaded and what the sidecar records."""

    source: str  # as the request named it
    path: str  # the local file (a hub file: its cache copy)
    sha256: str
    scale: float = 1.0
    expert: str = "both"

    @property
    def adapter_name(self) -> str:
        """The adapter's name in the pipeline: its content, so one file is one adapter whatever it is called."""
        return f"lora_{self.sha256[:16]}"

    def record(self) -> dict:
        """What the sidecar keeps to reproduce the loop (the file's name, not the server's folder)."""
        return {"source": self.source, "file": Path(self.path).name, "sha256": self.sha256, "scale": self.scale,
                "expert": self.expert}


# -- finding and checking files ------------------------------------------------------------------------------------

def is_hub_source(source: str) -> bool:
    """Whether ``source`` names a hub repo (``owner/repo`` or ``owner/repo/path/file.safetensors``) rather than a
    file here: only when no such file exists locally and it has that shape."""
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~", "\\")) or "\\" in source:
        return False
    parts = source.split("/")
    if len(parts) == 2:
        return bool(_HUB_REPO.match(source)) and not source.lower().endswith(LORA_SUFFIX)
    return len(parts) >= 3 and bool(_HUB_REPO.match("/".join(parts[:2]))) and source.lower().endswith(LORA_SUFFIX)


def check_lora_source(source: str, label: Optional[str] = None, name: str = "loras") -> None:
    """The checks that need no download and no model: a local source exists, is a file and ends in
    ``.safetensors`` (pickled ``.ckpt``/``.pt``/``.bin`` weights are refused). ``ValueError`` names ``name`` and
    the file (``label``: how to call it in messages, default the source)."""
    label = label or source
    if is_hub_source(source):
        return
    path = Path(source).expanduser()
    if path.suffix.lower() != LORA_SUFFIX:
        raise ValueError(f"{name}: {label!r} is not a .safetensors file (other weight files can run code when "
                         f"loaded and are refused)")
    if not path.exists():
        raise ValueError(f"{name}: {label!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{name}: {label!r} is not a file")


def download_lora(source: str, local_files_only: bool = False, cache_dir: Optional[str] = None,
                  name: str = "loras") -> Path:
    """The local file of a hub ``source``: ``owner/repo/file.safetensors``, or ``owner/repo`` (its
    ``pytorch_lora_weights.safetensors``, else its only ``.safetensors`` file). ``ValueError`` naming the source
    when it cannot be fetched."""
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    parts = source.split("/")
    repo, filename = "/".join(parts[:2]), ("/".join(parts[2:]) or None)
    try:
        if filename is None:
            try:
                return Path(hf_hub_download(repo, HUB_WEIGHT_NAME, cache_dir=cache_dir,
                                            local_files_only=local_files_only))
            except EntryNotFoundError as exc:
                if isinstance(exc, LocalEntryNotFoundError) or local_files_only:
                    raise  # offline: the repo's file list is not to be asked for
                files = [f for f in list_repo_files(repo) if f.lower().endswith(LORA_SUFFIX)]
                if len(files) != 1:
                    listed = ", ".join(files[:6]) or "none"
                    raise ValueError(f"{name}: {source!r} has {len(files)} .safetensors files ({listed}): name one "
                                     f"as {repo}/FILE.safetensors") from None
                filename = files[0]
        return Path(hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=local_files_only))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub errors (offline, missing repo, no access) become one line
        raise ValueError(f"{name}: {source!r} is not a file here and could not be fetched from the Hugging Face "
                         f"Hub ({one_line(exc, REASON_LIMIT)})") from None


_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file (hex), remembered per (path, size, mtime) so a file is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        known = _HASHES.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = value
    return value


def lora_shapes(path: str | Path, label: str, name: str = "loras") -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, read from its header (no weights loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise ValueError(f"{name}: {label!r} is not a valid safetensors file ({one_line(exc, REASON_LIMIT)})") from None


_WAN_SIZES = {1536: "Wan 2.1 T2V 1.3B", 3072: "Wan 2.2 TI2V-5B", 5120: "a Wan 14B model (Wan 2.1 14B or a Wan 2.2 "
                                                                          "A14B expert)"}
_COG_SIZES = {1920: "CogVideoX-2b", 3072: "CogVideoX-5b"}


def guess_lora_target(shapes: Mapping[str, Sequence[int]]) -> tuple[Optional[str], Optional[str]]:
    """(loopui family or None, a description such as ``"Wan 2.1 T2V 1.3B"``) of the model a LoRA's keys were made
    for, or (None, None) when they do not say. Only for messages: loading is diffusers' business."""
    keys = list(shapes)
    text = " ".join(keys[:4000])

    def inner_dim(patterns: Sequence[str]) -> Optional[int]:
        for key in keys:
            if any(p in key for p in patterns) and ("lora_A" in key or "lora_down" in key) and len(shapes[key]) == 2:
                return int(shapes[key][1])
        return None

    if any(s in text for s in ("single_transformer_blocks", "double_blocks", "single_blocks")):
        return None, "Flux or HunyuanVideo (a model loopui does not run)"
    if any(s in text for s in ("down_blocks", "lora_unet_down", "input_blocks", "lora_te")):
        return None, "Stable Diffusion (an image model with a UNet)"
    if "lora_unet_blocks_" in text or "diffusion_model.blocks." in text or ".self_attn." in text or (
            re.search(r"(^|\.)blocks\.\d+\.attn1\.", text) and "transformer_blocks" not in text):
        dim = inner_dim(("self_attn.q", "self_attn_q", "attn1.to_q"))
        what = _WAN_SIZES.get(dim, f"a Wan model of width {dim}" if dim else "a Wan model")
        if any(s in text for s in ("k_img", "add_k_proj")):
            what += " (image-to-video)"
        return "wan", what
    if "transformer_blocks" in text and "attn1" in text and "attn2" not in text:
        dim = inner_dim(("attn1.to_q", "attn1_to_q"))
        return "cogvideox", _COG_SIZES.get(dim, f"a CogVideoX model of width {dim}" if dim else "a CogVideoX model")
    return None, None


def check_lora_ref(ref: Any, spec: Any, allowed: Optional[Mapping[str, str]] = None, name: str = "loras") -> str:
    """The checks of one LoRA (a ``loopui.engine.lora_refs.LoraRef``) that need no download and no weights: a server
    LoRA when ``allowed`` (name -> file) is given, a local file that exists and ends in ``.safetensors``, an expert
    choice only on a two-expert model. Returns the source to load (``allowed``'s file for a listed name).
    ``ValueError`` names ``name`` and the file."""
    source = ref.source
    if allowed is not None:
        if ref.source not in allowed:
            offered = ", ".join(sorted(allowed)[:8]) or "none"
            raise ValueError(f"{name}: {ref.source!r} is not one of this server's LoRAs ({offered})")
        source = str(allowed[ref.source])
    check_lora_source(source, ref.source, name)
    if ref.expert != "both" and spec.experts < 2:
        raise ValueError(f"{name}: {ref.source!r}: expert {ref.expert!r} needs a two-expert model (Wan 2.2 A14B); "
                         f"{spec.model_id or 'this model'} has one denoiser")
    return source


def resolve_loras(refs: Sequence[Any], spec: Any, allowed: Optional[Mapping[str, str]] = None,
                  local_files_only: bool = False, cache_dir: Optional[str] = None,
                  name: str = "loras") -> tuple[LoraFile, ...]:
    """The request's LoRAs (``loopui.engine.lora_refs.LoraRef``) as files found, checked against the model ``spec``
    and hashed -- everything that can be refused before the model loads: :func:`check_lora_ref`'s checks, a hub
    source that cannot be fetched, a file that is no valid safetensors file or whose keys are another model
    family's, a file changed since a sidecar recorded it. ``ValueError`` names ``name`` and the file."""
    files = []
    seen: dict[tuple, str] = {}
    for ref in refs:
        label = ref.source
        source = check_lora_ref(ref, spec, allowed, name)
        path = (download_lora(source, local_files_only, cache_dir, name) if is_hub_source(source)
                else Path(source).expanduser())
        if path.suffix.lower() != LORA_SUFFIX:
            raise ValueError(f"{name}: {label!r} is not a .safetensors file")
        family, what = guess_lora_target(lora_shapes(path, label, name))
        if (family is None and what is not None) or family not in (None, spec.family):
            raise ValueError(f"{name}: {label!r} does not fit {spec.model_id or 'this model'} ({spec.family}): its "
                             f"keys are those of a LoRA for {what}")
        sha = file_sha256(path)
        if ref.sha256 and ref.sha256 != sha:
            raise ValueError(f"{name}: {label!r} has changed since it was recorded (sha256 {sha[:12]}..., recorded "
                             f"{ref.sha256[:12]}...)")
        key = (sha, ref.expert)
        if key in seen:
            raise ValueError(f"{name}: {label!r} is the same file as {seen[key]!r}: give it once")
        seen[key] = label
        files.append(LoraFile(source=ref.source, path=str(path), sha256=sha, scale=float(ref.scale),
                              expert=ref.expert))
    return tuple(files)


# -- adapters on a pipeline ----------------------------------------------------------------------------------------

@dataclass
class _State:
    """The LoRA state of one set of denoisers (keyed by the pipeline's ``transformer``, which pipelines over the
    same modules share)."""

    loaded: "OrderedDict[tuple[str, str], str]" = field(default_factory=OrderedDict)  # (component, adapter) -> path
    fused: Optional[tuple] = None  # the set folded into the weights
    stash: dict = field(default_factory=dict)  # (component, module, param) -> original tensor on the CPU
    last: Optional[tuple] = None  # the set of the previous request
    fuse: str = "auto"
    fuse_count: int = 0  # how many times a set was fused (tests, bench)


_STATES: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _state(pipe: Any) -> _State:
    with _STATES_LOCK:
        state = _STATES.get(pipe.transformer)
        if state is None:
            state = _STATES[pipe.transformer] = _State()
        return state


def set_fuse_policy(pipe: Any, policy: str) -> None:
    """How ``pipe``'s LoRA sets are fused: ``auto`` (once a set serves a second request in a row), ``always``,
    ``never`` or ``single`` (at once, no copy of the original weights kept: a process serving one set)."""
    if policy not in FUSE_POLICIES:
        raise ValueError(f"lora_fuse must be one of {', '.join(FUSE_POLICIES)}; got {policy!r}")
    _state(pipe).fuse = policy


def lora_status(pipe: Any) -> dict:
    """What is loaded and fused on ``pipe``: ``{"loaded": [(component, adapter)], "fused": set or None,
    "fuse_count": n}``."""
    state = _state(pipe)
    return {"loaded": list(state.loaded), "fused": state.fused, "fuse_count": state.fuse_count}


def _components(pipe: Any) -> list[str]:
    return [c for c in _COMPONENTS if getattr(pipe, c, None) is not None]


def _wanted(pipe: Any, files: Sequence[LoraFile]) -> dict[str, list[tuple[str, float]]]:
    """component -> [(adapter, scale)] for a request's files."""
    present = _components(pipe)
    wanted: dict[str, list[tuple[str, float]]] = {}
    for lora in files:
        targets = _EXPERT_COMPONENTS[lora.expert] if len(present) > 1 else ("transformer",)
        for component in targets:
            wanted.setdefault(component, []).append((lora.adapter_name, lora.scale))
    return wanted


def _model_name(pipe: Any) -> str:
    config = getattr(pipe, "config", None) or {}
    return str(config.get("_name_or_path") or type(pipe).__name__)


def _load(pipe: Any, lora: LoraFile, component: str) -> None:
    """Load ``lora`` into ``component`` with diffusers; a file none of whose keys fit is refused in one line."""
    module = getattr(pipe, component)
    kwargs = {"load_into_transformer_2": True} if component == "transformer_2" else {}
    label = lora.source
    reason = None
    try:
        with warnings.catch_warnings():
            # PEFT warns whenever a second adapter joins a model: that is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # On a quantized transformer, once per layer: sets are never folded into quantized weights (_fusable).
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            pipe.load_lora_weights(lora.path, adapter_name=lora.adapter_name, **kwargs)
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:
        # diffusers/PEFT: no target module found (ValueError), a shape mismatch (RuntimeError), a converter that
        # misses the keys it expects (KeyError)
        reason = one_line(exc, REASON_LIMIT)
    if reason is None and lora.adapter_name in (getattr(module, "peft_config", None) or {}):
        return
    _family, what = guess_lora_target(lora_shapes(lora.path, label))
    seems = f"; it seems to be for {what}" if what else ""
    because = f" ({reason})" if reason else " (none of its keys names a module of this model)"
    raise ValueError(f"loras: {label!r} does not fit {_model_name(pipe)}{because}{seems}")


def _evict(pipe: Any, state: _State, keep: set[tuple[str, str]]) -> None:
    for component in _components(pipe):
        mine = [key for key in state.loaded if key[0] == component]
        for key in mine[:max(0, len(mine) - MAX_ADAPTERS)]:
            if key in keep:
                continue
            getattr(pipe, component).delete_adapters([key[1]])
            state.loaded.pop(key)
            logger.info("LoRA %s unloaded from %s (least recently used)", key[1], component)


def _has_lora_layers(module: Any) -> bool:
    return bool(getattr(module, "peft_config", None))


def _lora_layers(module: Any, adapters: Sequence[str]) -> Iterator[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer) and any(a in getattr(layer, "lora_A", {}) for a in adapters):
            yield name, layer


def _fusable(pipe: Any, wanted: Mapping[str, Any]) -> bool:
    """Weights that live somewhere (not on the meta device of sequential offload), in the load dtype and held by
    the module itself can be fused. A quantized weight (``loopui.models.quantize``) would be rounded to int8/fp8
    again with the set folded in, and unfolding could not give the original back (PEFT's torchao layer refuses to
    merge anyway); group offload streams its own pinned copies of the weights, which a fold would miss."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from loopui.models.quantize import pipeline_quantization

    if pipeline_quantization(pipe) != "none" or any(_is_group_offload_enabled(getattr(pipe, c)) for c in wanted):
        return False
    return all(p.device.type != "meta" for c in wanted for p in getattr(pipe, c).parameters())


def _fuse(pipe: Any, state: _State, wanted: Mapping[str, list[tuple[str, float]]], key: tuple) -> None:
    """Keep the weights the set changes on the CPU, then fold the set (at its scales) into them."""
    for component, entries in wanted.items():
        module = getattr(pipe, component)
        adapters = [a for a, _ in entries]
        for name, layer in _lora_layers(module, adapters) if state.fuse != "single" else ():
            base = layer.get_base_layer()
            for pname in ("weight", "bias"):
                tensor = getattr(base, pname, None)
                if tensor is not None:
                    state.stash[(component, name, pname)] = tensor.detach().to("cpu", copy=True)
        module.fuse_lora(adapter_names=adapters)
    state.fused = key
    state.fuse_count += 1


def _unfuse(pipe: Any, state: _State) -> None:
    """Unfold the fused set and put the exact original weights back."""
    import torch

    if not state.stash:
        logger.warning("unfolding a LoRA set fused without a copy of the original weights (lora_fuse 'single'): "
                       "the weights come back up to rounding")
    for component in {c for c, _, _ in state.fused}:
        getattr(pipe, component).unfuse_lora()
    with torch.no_grad():
        for (component, name, pname), original in state.stash.items():
            tensor = getattr(getattr(pipe, component).get_submodule(name).get_base_layer(), pname)
            tensor.copy_(original.to(device=tensor.device, dtype=tensor.dtype))
    state.stash.clear()
    state.fused = None


def _activate(pipe: Any, state: _State, files: Sequence[LoraFile]) -> None:
    wanted = _wanted(pipe, files)
    key = tuple(sorted((c, a, s) for c, entries in wanted.items() for a, s in entries))
    if state.fused is not None and state.fused != key:
        _unfuse(pipe, state)
    if state.fused == key and key:
        state.last = key
        return
    # 1. Load what is missing (each file once per denoiser), forget the least recently used beyond the cap
    by_name = {lora.adapter_name: lora for lora in files}
    for component, entries in wanted.items():
        for adapter, _scale in entries:
            if (component, adapter) not in state.loaded:
                _load(pipe, by_name[adapter], component)
                state.loaded[(component, adapter)] = by_name[adapter].path
            state.loaded.move_to_end((component, adapter))
    _evict(pipe, state, {(c, a) for c, entries in wanted.items() for a, _ in entries})
    # 2. Exactly this set active, at its scales, on each denoiser; every other adapter off
    for component in _components(pipe):
        module = getattr(pipe, component)
        entries = wanted.get(component)
        if entries:
            module.enable_lora()
            module.set_adapters([a for a, _ in entries], [s for _, s in entries])
        elif _has_lora_layers(module):
            module.disable_lora()
    # 3. Fold a set into the weights once it serves many requests
    at_once = state.fuse in ("always", "single")
    if key and (at_once or (state.fuse == "auto" and key == state.last)) and _fusable(pipe, wanted):
        _fuse(pipe, state, wanted, key)
    state.last = key


def _deactivate(pipe: Any, state: _State) -> None:
    if state.fused is not None:
        return  # stays folded in for the next request of the same set (reset_loras unfolds it)
    for component in _components(pipe):
        module = getattr(pipe, component)
        if _has_lora_layers(module):
            module.disable_lora()


@contextmanager
def active_loras(pipe: Any, files: Optional[Sequence[LoraFile]]) -> Iterator[None]:
    """For one generation: exactly ``files`` active on ``pipe`` at their scales (loaded first if need be), every
    other adapter off; afterwards the adapters are switched off again (a fused set stays folded in until another
    set is asked for). Call it under the engine's pipeline lock. ``ValueError`` (``loras: ...``) for a file that
    fits no module of the model."""
    state = _state(pipe)
    files = tuple(files or ())
    if not files and not state.loaded and state.fused is None:
        yield  # a pipeline that never saw a LoRA stays untouched
        return
    _activate(pipe, state, files)
    try:
        yield
    finally:
        _deactivate(pipe, state)


def reset_loras(pipe: Any) -> None:
    """Back to the stock model: a fused set unfolded (exact original weights), every adapter off (still loaded)."""
    state = _state(pipe)
    if state.fused is not None:
        _unfuse(pipe, state)
    state.last = None
    _deactivate(pipe, state)


def unload_loras(pipe: Any) -> None:
    """Back to the stock model and every adapter deleted (when the model is released)."""
    transformer = getattr(pipe, "transformer", None)
    try:
        with _STATES_LOCK:
            state = _STATES.get(transformer)
    except TypeError:  # not weak-referenceable: never had a LoRA state
        return
    if state is None:
        return
    reset_loras(pipe)
    for component in _components(pipe):
        names = [a for c, a in state.loaded if c == component]
        if names:
            getattr(pipe, component).delete_adapters(names)
    state.loaded.clear()

