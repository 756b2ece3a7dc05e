"""The trainer's public names, gathered from simplegpt.training (where each lives, one job per module).

    from simplegpt.trainer import train, TrainResult
    result = train(load_config("shakespeare_char"))

`train(cfg)` runs a whole TrainConfig and returns a TrainResult; a run folder holds config.toml,
metrics.jsonl, samples.txt, last/ (with the full train state for `--resume`), best/ and loss.png.
This module is for users: simplegpt's own modules import from simplegpt.training's modules.
(It is not named `train`, the tutorial's function that `simplegpt` exports.)
"""

from .files import BEST, CONFIG_FILE, LAST, METRICS_FILE, SAMPLES_FILE
from .training import TrainingError
from .training.dataset import dataset_dir, prepare_data
from .training.hardware import auto_threads, core_shards, peak_flops, resolve_dtype
from .training.loop import TrainResult, evaluate, train
from .training.optimizer import lr_at, make_optimizer, param_groups
from .training.run_dir import checkpoint_dir

__all__ = ["BEST", "CONFIG_FILE", "LAST", "METRICS_FILE", "SAMPLES_FILE", "TrainResult", "TrainingError",
           "auto_threads", "checkpoint_dir", "core_shards", "dataset_dir", "evaluate", "lr_at", "make_optimizer",
           "param_groups", "peak_flops", "prepare_data", "resolve_dtype", "train"]
