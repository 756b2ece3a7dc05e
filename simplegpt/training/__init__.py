"""The trainer, one job per module (simplegpt.trainer gathers the public names for users):

    loop         train() and the run loop: step, evaluate, save, sample, stop
    setup        the named setup steps (begin, load_data, prepare) and what they return
    ways/        the ways of running, one object each behind one interface: one process, core shards,
                 DDP, FSDP2 (docs/training-internals.md)
    loss         the loss object: cross-entropy over the loss tokens (a loss mask), token-weighted
    optimizer    the optimizer registry (AdamW, Muon), AdamW's parameter groups and clipped step, the
                 learning-rate schedule
    muon         Muon for the blocks' matrices with AdamW for the rest
    evaluation   the val loss and the samples
    progress     the progress bar or lines, the estimate, the train records, the stop signals
    result       TrainResult, and the result of a run that had already finished
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
