"""One loop across several GPUs: diffusers' context parallelism, one process per GPU launched with ``torchrun``.

``torchrun --nproc-per-node N -m loopui generate --parallel ...`` starts N copies of the CLI. Each loads the model
on its own GPU, :func:`enable_context_parallel` hands every denoiser to diffusers (``ContextParallelConfig``,
``model.enable_parallelism``): inside the transformer the token sequence is split across the processes and
attention exchanges what it needs (Ulysses all-to-all). Everything loopui does happens outside the transformer on
every process alike -- the cycle is rolled before the call and rolled back after it, the RoPE scale is set on
every process from the same request, the scheduler steps the same full latents -- so it composes; process 0 writes
the files. Only families whose transformer ships a context-parallel plan can do this: Wan 2.1/2.2 in diffusers
0.42; CogVideoX has none (run it one loop per GPU, several GPUs through the app's device pool).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)

LAUNCH_HINT = "torchrun --nproc-per-node N -m loopui generate --parallel ..."


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a ``torchrun`` launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Process 0 writes the files and prints the summary."""
        return self.rank == 0


def torchrun_context(environ: Optional[Mapping[str, str]] = None) -> ParallelContext:
    """The ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` that ``torchrun`` sets; ``ValueError`` (with the command to
    use) when this process was not started by it."""
    env = os.environ if environ is None else environ
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in env]
    if missing:
        raise ValueError(f"--parallel runs one process per GPU and must be started by torchrun: {LAUNCH_HINT}")
    try:
        context = ParallelContext(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
    except ValueError:
        raise ValueError(f"--parallel: torchrun's RANK/WORLD_SIZE/LOCAL_RANK are not integers "
                         f"({env['RANK']!r}, {env['WORLD_SIZE']!r}, {env['LOCAL_RANK']!r})") from None
    if context.world_size < 1 or not 0 <= context.rank < context.world_size:
        raise ValueError(f"--parallel: rank {context.rank} of {context.world_size} processes makes no sense")
    return context


def check_family(family: str, model_id: str = "") -> None:
    """Refuse, before any loading, a model family without a context-parallel plan (``ValueError``)."""
    from .families import FAMILIES

    known = FAMILIES.get(family)
    if known is None or known.context_parallel:
        return  # an unknown family is checked again after loading (its transformer's own plan)
    import diffusers

    name = model_id or family
    able = ", ".join(f for f, fam in FAMILIES.items() if fam.context_parallel)
    raise ValueError(f"--parallel needs a model whose transformer has a context-parallel plan in diffusers "
                     f"({able}); {name} is {family}, which "
                     f"has none in diffusers {diffusers.__version__}. Run one loop per GPU instead (several GPUs: "
                     f"`python app.py --devices cuda:0,cuda:1`)")


def init_process_group(context: ParallelContext, backend: Optional[str] = None) -> str:
    """Join the ``torchrun`` process group (NCCL on CUDA, else gloo) and pin this process to its GPU; returns the
    device name (``cuda:<local rank>``, or ``cpu`` without CUDA)."""
    import torch
    import torch.distributed as dist

    on_cuda = torch.cuda.is_available()
    if on_cuda:
        if context.local_rank >= torch.cuda.device_count():
            raise ValueError(f"--parallel: local rank {context.local_rank} but only {torch.cuda.device_count()} "
                             f"GPU(s) visible: start at most that many processes per node")
        torch.cuda.set_device(context.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if on_cuda else "gloo"))
    return f"cuda:{context.local_rank}" if on_cuda else "cpu"


def enable_context_parallel(pipe: Any, world_size: int) -> list[Any]:
    """Split every denoiser's token sequence across ``world_size`` processes (Ulysses attention); returns the
    configs used. Needs an initialised process group; ``ValueError`` for a transformer without a plan."""
    from diffusers import ContextParallelConfig

    if world_size < 2:
        logger.info("one process: nothing to split")
        return []
    from .families import family_for

    modules = family_for(pipe).denoisers(pipe)
    if not modules:
        raise ValueError(f"{type(pipe).__name__} has no transformer to parallelise")
    for module in modules:
        if getattr(module, "_cp_plan", None) is None:
            import diffusers

            raise ValueError(f"{type(module).__name__} has no context-parallel plan in diffusers "
                             f"{diffusers.__version__}: --parallel cannot split it across GPUs")
    configs = []
    for module in modules:
        heads = int(getattr(module.config, "num_attention_heads", world_size))
        # Ulysses hands each process heads / N heads of the full sequence; "anything" pads when N does not divide
        # the heads or the sequence.
        config = ContextParallelConfig(ulysses_degree=world_size, ulysses_anything=heads % world_size != 0)
        module.enable_parallelism(config=config)
        configs.append(config)
    logger.info("context parallelism over %d processes on %d denoiser(s)", world_size, len(modules))
    return configs
