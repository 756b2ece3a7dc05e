"""No file simplegpt reads runs code, and a hostile file is one clear error, not a traceback or an
unbounded allocation (docs/reliability.md).

Every file of every checkpoint kind (plain, which DDP's rank 0 writes too; FSDP2 sharded; a Hugging
Face folder to import) is replaced in turn by a pickle whose loading would create a file, with its
digest re-signed and with the digests removed; every loader that reads that kind must refuse it
with a CheckpointError and create nothing.
"""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simplegpt import checkpoint as ckpt
from simplegpt.cli import main
from simplegpt.errors import CheckpointError
from simplegpt.hf import export_hf, load_hf_model
from simplegpt.model import GPT, GPTConfig
from simplegpt.tokenizer import ByteTokenizer, CharTokenizer
from simplegpt.training import fsdp
from test_checkpoint import _model, train_state

CONFIG = dict(vocab_size=257, n_positions=8, n_embd=8, n_layer=1, n_head=2)


class Payload:
    """Unpickled, it creates the file `marker` (what a real attack would do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _sign(folder: Path, name: str, how: str) -> None:
    """Re-sign `name` in config.json's digests ("re-signed"), or drop the digests ("unsigned")."""
    doc = json.loads((folder / "config.json").read_text())
    if how == "unsigned":
        doc.pop("sha256", None)
    elif name in doc.get("sha256", {}):
        doc["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(doc))


def _optimizer(model: GPT) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))[1].backward()
    optimizer.step()
    return optimizer


def _save_sharded(path: Path, model: GPT) -> None:
    """A sharded checkpoint as the FSDP2 trainer writes it (here in one process, no process group)."""
    optimizer = _optimizer(model)
    ckpt.save_checkpoint(path, model, ByteTokenizer(), metadata={"step": 1}, train_state=train_state(1),
                         write_weights=lambda tmp: fsdp.save_sharded(tmp, model, optimizer))


def _plant_dcp_value(folder: Path, marker: Path) -> None:
    """dcp/ rewritten by DCP itself with the token embedding stored as a pickled Payload: a value
    DCP would torch.load(weights_only=False) for the model's weights and the optimizer's alike."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _model(0)
    model_state, optim_state = get_state_dict(model, _optimizer(model))
    model_state.pop(ckpt.TIED_KEY)
    model_state["transformer.wte.weight"] = Payload(marker)
    for f in (folder / "dcp").iterdir():
        f.unlink()
    dcp.save({"model": model_state, "optimizer": optim_state}, storage_writer=dcp.FileSystemWriter(folder / "dcp"),
             no_dist=True)


def _loaders(kind: str, folder: Path, tmp: Path):
    """Every reader of a checkpoint of that kind: (name, call)."""
    if kind == "hf":
        return [("load_hf_model", lambda: load_hf_model(str(folder)))]
    common = [("describe_checkpoint (info)", lambda: ckpt.describe_checkpoint(folder)),
              ("load_train_state", lambda: ckpt.load_train_state(folder))]
    if kind == "plain":
        return common + [("load_checkpoint", lambda: ckpt.load_checkpoint(folder))]
    model = _model(5)
    return common + [("consolidate", lambda: fsdp.consolidate(folder, tmp / "out", overwrite=True)),
                     ("load_sharded", lambda: fsdp.load_sharded(folder, model, _optimizer(model))),
                     ("load_sharded weights", lambda: fsdp.load_sharded(folder, _model(6), None))]


def _make(kind: str, folder: Path, tmp: Path) -> None:
    if kind == "plain":
        ckpt.save_checkpoint(folder, _model(0), ByteTokenizer(), metadata={"step": 1}, train_state=train_state(1))
    elif kind == "sharded":
        _save_sharded(folder, _model(0))
    else:  # a Hugging Face folder, with its weights as the pickled pytorch_model.bin of older uploads
        ckpt.save_checkpoint(tmp / "src", _model(0), ByteTokenizer())
        export_hf(tmp / "src", folder)
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()


def _files(kind: str, tmp: Path) -> list[str]:
    folder = tmp / f"probe-{kind}"
    _make(kind, folder, tmp)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["re-signed", "unsigned"])
@pytest.mark.parametrize("kind", ["plain", "sharded", "hf"])
def test_a_pickle_planted_in_any_file_of_any_checkpoint_runs_nothing(tmp_path, kind, how):
    planted = 0
    for name in _files(kind, tmp_path) + (["dcp/__0_0.distcp (a value)"] if kind == "sharded" else []):
        folder, marker = tmp_path / f"{kind}-{planted}", tmp_path / f"pwned-{planted}"
        planted += 1
        _make(kind, folder, tmp_path)
        if name.endswith("(a value)"):
            _plant_dcp_value(folder, marker)
            name = name.split(" ")[0]
            names = [p.relative_to(folder).as_posix() for p in (folder / "dcp").iterdir()]
        else:
            (folder / name).write_bytes(pickle.dumps(Payload(marker)))
            names = [name]
        if kind != "hf" and name != "config.json":
            for n in names:
                _sign(folder, n, how)
        elif kind != "hf":
            pass  # config.json itself is the payload: it holds the digests
        for what, load in _loaders(kind, folder, tmp_path):
            try:
                load()
            except CheckpointError as e:
                assert "\n" not in str(e), (name, what, str(e))
            assert not marker.exists(), f"{what} ran the code planted in {kind} {name} ({how})"
    assert planted >= 4


def test_refusals_name_the_file_and_say_what_to_do(tmp_path, capsys):
    _save_sharded(tmp_path / "sh", _model(0))
    (tmp_path / "sh" / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    _sign(tmp_path / "sh", "dcp/.metadata", "re-signed")
    with pytest.raises(CheckpointError, match=r"\.metadata names io\.open, which is not part of a checkpoint's "
                                              "metadata; unpickling it could run code"):
        fsdp.consolidate(tmp_path / "sh", tmp_path / "out")
    # A Hugging Face .bin holding other objects: one line saying what to do (not torch's weights_only advice).
    hf = tmp_path / "hf"
    ckpt.save_checkpoint(tmp_path / "src", _model(0), ByteTokenizer())
    export_hf(tmp_path / "src", hf)
    (hf / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": Payload(tmp_path / "pwned")}, hf / "pytorch_model.bin")
    assert main(["import-hf", str(hf), str(tmp_path / "imported")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "pytorch_model.bin holds objects other than tensors" in line and "model.safetensors" in line
    assert "weights_only" not in line and not (tmp_path / "pwned").exists()


def _hostile(folder: Path, **model) -> None:
    doc = json.loads((folder / "config.json").read_text())
    doc["model"].update(model)
    (folder / "config.json").write_text(json.dumps(doc))  # config.json holds the digests: none covers it


def test_a_hostile_config_is_refused_before_anything_is_built(tmp_path):
    _save_sharded(tmp_path / "sharded", _model(0))
    ckpt.save_checkpoint(tmp_path / "ck", _model(0), ByteTokenizer(), metadata={"step": 1})
    for folder in (tmp_path / "sharded", tmp_path / "ck"):
        _hostile(folder, n_layer=1_000_000, n_embd=1_000_000, n_head=1)
    # One process for the three commands, its address space limited: the model this config names
    # would need terabytes (and a million blocks of Python objects); a refusal needs well under this.
    script = f"""if True:
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from simplegpt.cli import main
        for args in (["info", {str(tmp_path / "ck")!r}], ["consolidate", {str(tmp_path / "sharded")!r}],
                     ["generate", "--checkpoint", {str(tmp_path / "ck")!r}, "--prompt", "a", "--max-new-tokens", "2"]):
            print(main(args), file=sys.stderr)
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 6 and lines[1::2] == ["1", "1", "1"], done.stderr[-2000:]
    for line in lines[0::2]:
        assert "does not match" in line and "n_layer 1000000" in line and "1 blocks" in line, line
    # the same number of blocks: each tensor is checked against the config (here the width)
    _hostile(tmp_path / "ck", n_layer=1)
    with pytest.raises(CheckpointError, match=r"c_attn.bias is \[24\] in the weights, \[3000000\] for the config"):
        ckpt.describe_checkpoint(tmp_path / "ck")


def test_info_reads_the_shapes_and_builds_no_model(tmp_path, monkeypatch):
    model = _model(0)
    ckpt.save_checkpoint(tmp_path / "ck", model, ByteTokenizer(), metadata={"step": 3})
    _save_sharded(tmp_path / "sh", _model(0))
    built, real_init = [], GPT.__init__

    def init(self, config):
        built.append((config.n_layer, torch.empty(0).device.type))  # the device it is built on
        real_init(self, config)

    monkeypatch.setattr(GPT, "__init__", init)
    for folder in (tmp_path / "ck", tmp_path / "sh"):
        info = ckpt.describe_checkpoint(folder)
        assert info.parameters == sum(p.numel() for p in model.parameters()) and info.tokenizer == "byte"
        assert info.config == model.config
    assert set(built) <= {(1, "meta")}  # at most one block's shapes, which allocate nothing


def test_a_hostile_hugging_face_config_is_refused_before_anything_is_built(tmp_path):
    ckpt.save_checkpoint(tmp_path / "src", _model(0), ByteTokenizer())
    export_hf(tmp_path / "src", tmp_path / "hf")
    doc = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**doc, "n_layer": 1_000_000}))
    with pytest.raises(CheckpointError, match="n_layer=1000000 but the weights hold 1 blocks"):
        load_hf_model(str(tmp_path / "hf"))


@pytest.mark.parametrize("chars", [12345, [], "", None, ["a", "b"]])
def test_a_damaged_tokenizer_json_is_one_line_everywhere(tmp_path, capsys, chars):
    folder = tmp_path / "ck"
    ckpt.save_checkpoint(folder, _model(0), CharTokenizer("abc"), metadata={"step": 1}, train_state=train_state(1))
    spec = folder / "tokenizer" / "tokenizer.json"
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "chars": chars}))
    _sign(folder, "tokenizer/tokenizer.json", "re-signed")
    for load in (ckpt.load_checkpoint, ckpt.describe_checkpoint):
        with pytest.raises(CheckpointError, match=r"tokenizer is damaged \(\"chars\" in tokenizer\.json is"):
            load(folder)
    for args in (["info", str(folder)], ["export-hf", str(folder), str(tmp_path / "hf")],
                 ["generate", "--checkpoint", str(folder), "--prompt", "a", "--max-new-tokens", "2"]):
        assert main(args) == 1
        assert len(capsys.readouterr().err.strip().splitlines()) == 1, args


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    small = GPT(GPTConfig(**{**CONFIG, "vocab_size": 3}))
    ckpt.save_checkpoint(tmp_path / "ck", small, CharTokenizer("abcdef"))
    with pytest.raises(CheckpointError, match="its 7 tokens do not fit the model's vocabulary of 3"):
        ckpt.load_checkpoint(tmp_path / "ck")


def test_a_hostile_n_embd_is_refused_at_once():
    def too_long(*_):
        raise TimeoutError("GPTConfig took more than 20 s to refuse")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match="must be divisible by n_head"):
            GPTConfig(n_embd=10**15 + 37, n_head=7)  # the hint lists divisors: it must not count to 10**15
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
