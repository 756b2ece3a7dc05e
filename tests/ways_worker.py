"""The contract every way of running passes (tests/test_ways_of_running.py), as one function that runs
in the test's own process (one process, CPU core shards) or in each rank of a torchrun launch (DDP,
FSDP2: `python -m torch.distributed.run ... tests/ways_worker.py OUT SETTINGS_JSON...`, on gloo, in one
process group that train() reuses for every run).

For each settings dict: the run to max_iters; the same run with SIGTERM delivered to one process (the
last rank) during step SIGNAL_STEP, which must stop every rank after that step with a checkpoint;
and that checkpoint resumed to max_iters. Rank 0 writes what it saw to OUT/<name>.json.
"""

import json
import os
import signal
import sys
from pathlib import Path

from simplegpt.config import load_config
from simplegpt.errors import SimpleGPTError
from simplegpt.training import loop

SIGNAL_STEP = 3  # the signal arrives while this step (1-based) runs


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if r["kind"] == "train"}


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records(run) if r["kind"] == "eval"}


def _signal_during(step: int, rank: int, world: int):
    """loop.lr_at, sending SIGTERM to this process during `step` on the last rank only."""
    real = loop.lr_at

    def lr_at(at, cfg):
        if at + 1 == step and rank == world - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(at, cfg)

    return lr_at


def contract(settings: dict, out: Path, name: str, rank: int = 0, world: int = 1) -> dict:
    """The three runs of the contract under out/name_*; what rank 0 saw (losses by step, the stop)."""
    base = {**settings, "log_interval": 1, "plot": False, "tensorboard": False, "sample_tokens": 0}
    try:
        whole = loop.train(load_config(None, {**base, "out_dir": str(out / f"{name}_whole")}), progress=False)
    except SimpleGPTError as e:  # a way that refuses the settings: the error's one line
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)  # in the test's failure output
        return {"refused": f"{type(e).__name__}: {e}"}
    stopped_dir = out / f"{name}_stopped"
    real = loop.lr_at
    loop.lr_at = _signal_during(SIGNAL_STEP, rank, world)
    try:
        stopped = loop.train(load_config(None, {**base, "out_dir": str(stopped_dir)}), progress=False)
    finally:
        loop.lr_at = real
    resumed = loop.train(load_config(None, {**base, "out_dir": str(stopped_dir)}), resume=stopped_dir / "last",
                         progress=False)
    return {"whole": losses(out / f"{name}_whole"), "whole_val": val_losses(out / f"{name}_whole"),
            "stopped_step": stopped.step, "interrupted": stopped.interrupted, "resumed_step": resumed.step,
            "after_resume": losses(stopped_dir), "after_resume_val": val_losses(stopped_dir),
            "result_losses": whole.losses}


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    for arg in sys.argv[2:]:
        spec = json.loads(arg)
        seen = contract(spec["settings"], out, spec["name"], dist.get_rank(), dist.get_world_size())
        if dist.get_rank() == 0:
            (out / f"{spec['name']}.json").write_text(json.dumps(seen))
        dist.barrier()
    dist.destroy_process_group()
