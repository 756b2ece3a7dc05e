"""The run report: report.html at the end of simplegpt train and from simplegpt report, in a real
browser with the network off; a report that cannot be written never loses the run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simplegpt.checkpoint import load_checkpoint
from simplegpt.config import TrainConfig
from simplegpt.report import read_run, write_report
from simplegpt.trainer import train
from test_inspect import open_in_browser


@pytest.fixture(scope="module")
def corpus(shakespeare_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(shakespeare_path.read_text()[:60_000])
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simplegpt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("report")
    proc = cli("train", "--data", str(corpus), "--data_dir", str(tmp / "data"), "--n_layer", "1", "--n_head", "2",
               "--n_embd", "16", "--block_size", "16", "--batch_size", "4", "--eval_iters", "2", "--max_iters", "12",
               "--eval_interval", "4", "--sample_tokens", "24", "--sample_prompt", "ROMEO:", "--num_threads", "1",
               "--log_interval", "1", "--tensorboard", "false", "--peak_flops", "1e12",
               "--out_dir", str(tmp / "run"), "--quiet", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run", proc


def test_train_writes_a_report_that_opens_offline_with_every_image(run, tmp_path):
    folder, proc = run
    page = folder / "report.html"
    assert f"report: {page}" in proc.stdout + proc.stderr
    widths, text, outside = open_in_browser(page, tmp_path / "report.png")
    assert len(widths) == 3 and all(w > 0 for w in widths)  # loss, learning rate, throughput
    assert outside == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
    # the config and parameter count, the summary and every evaluation's sample
    ck = load_checkpoint(folder / "last")
    assert f"{ck.model.num_parameters():,}" in text
    assert "max_iters = 12" in text and "12 of 12" in text
    evals = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert f"{min(r['val_loss'] for r in evals):.4f}" in text
    samples = read_run(folder).samples
    assert [s[0] for s in samples] == [4, 8, 12] and all(s[2].startswith("ROMEO:") for s in samples)
    html = page.read_text()
    for _, _, sample in samples:
        assert sample.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html


def test_report_command_rewrites_it_from_the_run_folder_or_a_checkpoint_in_it(run, tmp_path):
    folder, _ = run
    out = tmp_path / "again.html"
    proc = cli("report", str(folder / "last"), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "simplegpt run report: run" in out.read_text()


@pytest.mark.parametrize("case", ["missing", "not_a_run"])
def test_report_of_something_that_is_not_a_run_is_one_line(tmp_path, case):
    target = tmp_path / "nothing"
    if case == "not_a_run":
        target.mkdir()
        (target / "notes.txt").write_text("hi")
    proc = cli("report", str(target), cwd=tmp_path)
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith("simplegpt report: error: ") and str(target) in line
    assert not (target / "report.html").exists()


def test_a_partial_last_record_is_skipped_and_counted(run, tmp_path):
    folder, _ = run
    copy = tmp_path / "run"
    copy.mkdir()
    lines = (folder / "metrics.jsonl").read_text()
    (copy / "metrics.jsonl").write_text(lines + '{"kind": "train", "step": 13, "lo')  # killed mid-write
    rec = read_run(copy)
    assert rec.skipped_lines == 1 and rec.train[-1]["step"] == 12 and rec.checkpoint is None
    page = write_report(copy).read_text()
    assert "1 line(s) of metrics.jsonl skipped" in page and "no checkpoint saved yet" in page


def test_the_loss_curve_and_the_report_read_metrics_alike(run, tmp_path):
    """One reader of metrics.jsonl (run_dir.read_metrics): loss.png used to parse it strictly, so a line
    the report skips (cut off mid-write, or JSON that is not a record) made the curve fail."""
    from simplegpt.training import run_dir

    folder, _ = run
    copy = tmp_path / "run"
    copy.mkdir()
    lines = (folder / "metrics.jsonl").read_text()
    (copy / "metrics.jsonl").write_text(lines + "[1, 2]\n" + '{"kind": "eval", "step": 13, "val_lo')
    metrics = run_dir.read_metrics(copy)
    rec = read_run(copy)
    assert metrics.skipped == rec.skipped_lines == 2
    assert (metrics.train, metrics.evals) == (rec.train, rec.evals) and metrics.evals[-1]["step"] == 12
    png = run_dir.plot_losses(copy)
    assert png == copy / "loss.png" and png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in copy.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporary file left


def test_a_report_that_cannot_be_written_never_loses_the_run(corpus, tmp_path):
    out = tmp_path / "run"
    (out / "report.html").mkdir(parents=True)  # a folder in the page's place: os.replace cannot put it there
    (out / "report.html" / "keep").write_text("x")
    cfg = TrainConfig(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_embd=16,
                      block_size=16, batch_size=4, max_iters=4, eval_interval=4, eval_iters=1, sample_tokens=0,
                      out_dir=str(out), num_threads=1, tensorboard=False, peak_flops=1e12)
    logged: list[str] = []
    result = train(cfg, overwrite=True, progress=False, log=logged.append)
    assert result.step == 4 and (out / "last" / "config.json").is_file()
    assert any(line.startswith("report: not written (") and "simplegpt report" in line for line in logged)
