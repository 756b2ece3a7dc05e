"""The trainer, one job per module (simplegpt.trainer gathers the public names for users):

    loop         train(): the run from config to checkpoints; the step, evaluation and samples
    optimizer    AdamW's parameter groups and clipped step, the learning-rate schedule
    run_dir      the run folder: config.toml, metrics.jsonl, samples.txt, loss.png, last/ and best/
    lock         one trainer per run folder: the flock held for the whole run
    start        where the weights start (random, init_from, a resumed run) and the RNG state
    dataset      the prepared dataset a config names, and its batch samplers
    hardware     dtype, CPU threads, batch splitting over cores, peak FLOP/s for MFU
    core_shards  CoreShards: a batch split over CPU cores, one replica of the model each
    cpu_memory   keep_freed_memory: glibc's malloc keeps a step's freed buffers for the next
    distributed  under torchrun: the process group (gloo / NCCL), the global batch, rank roles, agreement
    fsdp         FSDP2 sharding, sharded checkpoints (torch.distributed.checkpoint), consolidate
"""

from ..errors import SimpleGPTError


class TrainingError(SimpleGPTError):
    """Training cannot go on (non-finite loss, no space left)."""
