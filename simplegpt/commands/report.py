"""simplegpt report: a training run's report.html (config, curves, samples, summary)."""

from __future__ import annotations

import argparse

from ..errors import file_access_errors

HELP = "write a training run's report.html: config, loss/lr/throughput curves, samples, summary"
DESCRIPTION = (
    "Write report.html for a run folder (the out_dir of simplegpt train, which writes it at the end too): "
    "the config and parameter count, the train and val loss, learning-rate and throughput curves from "
    "metrics.jsonl, the samples of each evaluation and a summary. One self-contained page that opens "
    "offline. Works on a run that is still going (it shows what the run has written so far)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run folder (or a checkpoint in it, such as RUN/last)")
    p.add_argument("--out", metavar="FILE", default=None, help="write the page here instead of RUN/report.html")


def run(args: argparse.Namespace) -> int:
    from ..report import write_report

    with file_access_errors():
        path = write_report(args.run, args.out)
    print(path)
    return 0
