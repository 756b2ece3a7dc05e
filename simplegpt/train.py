"""The trainer's public names, gathered from simplegpt.training (where each lives, one job per module).

    from simplegpt.train import train, TrainResult
    result = train(load_config("shakespeare_char"))

`train(cfg)` runs a whole TrainConfig and returns a TrainResult; a run folder holds config.toml,
metrics.jsonl, samples.txt, last/ (with the full train state for `--resume`), best/ and loss.png.
(`simplegpt.train` the module is bound before the tutorial's `train` function takes that name in
the package; see simplegpt/__init__.py.)
"""

from .training import TrainingError
from .training.dataset import dataset_dir, prepare_data
from .training.hardware import auto_threads, core_shards, peak_flops, resolve_dtype
from .training.loop import TrainResult, evaluate, train
from .training.optimizer import lr_at, make_optimizer, param_groups
from .training.run_dir import BEST, CONFIG_FILE, LAST, METRICS_FILE, SAMPLES_FILE, checkpoint_dir

__all__ = ["BEST", "CONFIG_FILE", "LAST", "METRICS_FILE", "SAMPLES_FILE", "TrainResult", "TrainingError",
           "auto_threads", "checkpoint_dir", "core_shards", "dataset_dir", "evaluate", "lr_at", "make_optimizer",
           "param_groups", "peak_flops", "prepare_data", "resolve_dtype", "train"]
