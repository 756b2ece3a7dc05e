"""The ways of running a training run's steps, one object each behind one interface
(base.WayOfRunning): one process, CPU core shards, DDP and FSDP2. `select` picks the run's.

Adding a way (tensor parallelism, say) is one new module with a class that implements the
interface (most start from single.Single or ranks.Ranks) and one line in LAUNCHED below, with its
name among the choices of the `parallel` key.
"""

from __future__ import annotations

import torch

from ...config import TrainConfig
from .. import distributed, hardware
from .base import Compute, WayOfRunning
from .core_shards import CoreShardsWay
from .ddp import DDPWay
from .fsdp2 import FSDP2Way
from .single import Single

# cfg.parallel -> the way a torchrun launch runs
LAUNCHED = {
    "ddp": lambda d, threads, cfg: DDPWay(d, threads),
    "fsdp": lambda d, threads, cfg: FSDP2Way(d, threads, cfg.seed),
}


def select(cfg: TrainConfig, device: torch.device) -> WayOfRunning:
    """The way this process runs cfg: under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) it joins the process
    group (simplegpt.training.distributed.setup) and runs cfg.parallel's way; otherwise one process, its
    batches split over CPU cores where that is faster (hardware.core_shards). ConfigError for settings
    that cannot run; the way's close() leaves the process group."""
    d = distributed.setup(device, cfg.dist_timeout)
    if d is not None:
        threads = cfg.num_threads or distributed.threads_per_rank(d.local_world_size)
        torch.set_num_threads(threads)
        return LAUNCHED[cfg.parallel](d, threads, cfg)
    threads = cfg.num_threads or hardware.auto_threads()
    torch.set_num_threads(threads)
    shards = hardware.core_shards(cfg, device, hardware.resolve_dtype(cfg.dtype, device), threads)
    return CoreShardsWay(threads, device, shards) if shards > 1 else Single(threads, device)


__all__ = ["Compute", "CoreShardsWay", "DDPWay", "FSDP2Way", "LAUNCHED", "Single", "WayOfRunning", "select"]
