import hashlib
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch

from simplegpt.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from simplegpt.errors import CheckpointError
from simplegpt.model import GPT, GPTConfig
from simplegpt.tokenizer import ByteTokenizer


def _model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=257, n_positions=8, n_embd=8, n_layer=1, n_head=2))


def train_state(step: int, model: GPT | None = None) -> dict:
    """A resume state shaped as the trainer's: AdamW moments, the three RNGs (numpy's holds an array)."""
    model = model or _model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))[1].backward()
    optimizer.step()
    return {"step": step, "tokens_seen": 96 * step, "optimizer": optimizer.state_dict(), "scaler": {},
            "sampler": {"rng": np.random.default_rng(step).bit_generator.state},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "best_val_loss": math.inf, "elapsed_s": 1.5}


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    old = _model(0)
    save_checkpoint(tmp_path / "last", old, ByteTokenizer(), metadata={"step": 1}, train_state=train_state(1))
    # A second process overwrites the checkpoint and is SIGKILLed after writing the new weights,
    # in the middle of the save (while the tokenizer is written).
    script = textwrap.dedent(f"""
        import os, signal, torch
        from simplegpt.checkpoint import save_checkpoint
        from simplegpt.model import GPT, GPTConfig
        from simplegpt.tokenizer import ByteTokenizer

        class Dying(ByteTokenizer):
            def save(self, directory):
                os.kill(os.getpid(), signal.SIGKILL)

        torch.manual_seed(1)
        model = GPT(GPTConfig(vocab_size=257, n_positions=8, n_embd=8, n_layer=1, n_head=2))
        save_checkpoint({str(tmp_path / "last")!r}, model, Dying(), metadata={{"step": 2}}, train_state={{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    ck = load_checkpoint(tmp_path / "last")
    assert ck.metadata["step"] == 1 and load_train_state(tmp_path / "last")["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(ck.model.state_dict().values(), old.state_dict().values()))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".last.tmp-")]
    assert len(leftovers) == 1  # the killed writer's half-written directory
    save_checkpoint(tmp_path / "last", old, ByteTokenizer(), metadata={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # the next save of "last" removed it


def test_damaged_config_json_is_reported(tmp_path):
    save_checkpoint(tmp_path / "ck", _model(0), ByteTokenizer())
    (tmp_path / "ck" / "config.json").write_text('{"format": "simplegpt", "model": {')
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "ck")


def test_load_round_trip_keeps_weights_and_the_tied_head(tmp_path):
    model = _model(3)
    save_checkpoint(tmp_path / "ck", model, ByteTokenizer())
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.model.lm_head.weight is ck.model.transformer.wte.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[name], tensor), name
    assert all(p.device.type == "cpu" for p in ck.model.parameters())


@pytest.mark.parametrize("device,message", [("gpu0", "is not a device"), ("tpu", "is not a device"),
                                            ("cuda:7", "CUDA|only")])
def test_load_with_a_bad_device_names_the_device_not_the_weights(tmp_path, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    save_checkpoint(tmp_path / "ck", _model(0), ByteTokenizer())
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(tmp_path / "ck", device=device)
    assert not isinstance(info.value, CheckpointError) and "corrupted" not in str(info.value)


def test_info_command_text_json_and_missing(tmp_path, capsys):
    import json

    from simplegpt.cli import main

    model = _model(0)
    save_checkpoint(tmp_path / "ck", model, ByteTokenizer(), metadata={"step": 7, "metrics": {"val_loss": 1.25}})
    assert main(["info", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "1 layer, 2 heads, 8 wide, context 8, vocab 257" in out and "byte" in out
    assert f"parameters: {model.num_parameters():,}" in out and "val loss: 1.2500" in out
    assert main(["info", str(tmp_path / "ck"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == 7 and doc["parameters"] == model.num_parameters() and doc["model"]["n_embd"] == 8
    assert main(["info", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.strip() == f"simplegpt info: error: checkpoint {tmp_path / 'nope'} does not exist"


def _same(a, b) -> bool:
    """Deep equality of resume states: same types, tensors and arrays equal bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b or (a != a and b != b)


def _record(ck, name: str) -> None:
    """Rewrite the digest config.json holds for `name`, as someone who tampers with a file on purpose would."""
    doc = json.loads((ck / "config.json").read_text())
    doc["sha256"][name] = hashlib.sha256((ck / name).read_bytes()).hexdigest()
    (ck / "config.json").write_text(json.dumps(doc))


def test_train_state_round_trips_numpy_state_in_a_file_of_tensors_and_plain_values(tmp_path):
    state = train_state(4)
    state["extra"] = {"scalar": np.float64(0.25), "ints": np.arange(3, dtype=np.int16), "list": [1, (2, None)],
                      "ordered": OrderedDict(a=np.ones(2))}
    save_checkpoint(tmp_path / "ck", _model(0), ByteTokenizer(), train_state=state)
    torch.load(tmp_path / "ck" / "train_state.pt", weights_only=True)  # no allow-listed globals needed
    loaded = load_train_state(tmp_path / "ck")
    assert _same(loaded, state)
    np.random.set_state(loaded["rng"]["numpy"])
    random.setstate(loaded["rng"]["python"])


def test_a_malicious_train_state_is_refused_and_runs_nothing(tmp_path):
    save_checkpoint(tmp_path / "ck", _model(0), ByteTokenizer(), train_state=train_state(1))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    f = tmp_path / "ck" / "train_state.pt"
    torch.save({**train_state(1), "step": Payload()}, f)
    _record(tmp_path / "ck", "train_state.pt")  # the digest fits: only the loader can stop it now
    with pytest.raises(CheckpointError, match="could run code") as info:
        load_train_state(tmp_path / "ck")
    assert str(f) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("case,message", [
    ("empty", "it has no 'step'"), ("not_a_dict", "it is a list, expected dict"),
    ("step_type", "'step' is a str, expected int"), ("rng_missing", "it has no 'rng.numpy'"),
    ("optimizer_type", "'optimizer.param_groups' is a dict, expected list"), ("bool_step", "'step' is a bool"),
    ("negative_step", "'step' is -3, a count that cannot be negative"),
    ("negative_tokens", "'tokens_seen' is -1, a count that cannot be negative"),
    ("sampler_rng", "'sampler.rng' is a int, expected dict"), ("sampler_missing", "it has no 'sampler.rng'"),
    ("param_group", "'optimizer.param_groups' item 0 is not a parameter group"),
    ("param_state", "'optimizer.state' holds a value that is not a dict"),
])
def test_a_train_state_without_its_fields_or_of_other_types_names_the_file(tmp_path, case, message):
    state = train_state(2)
    bad = {"empty": {}, "not_a_dict": [1, 2], "step_type": {**state, "step": "5"},
           "rng_missing": {**state, "rng": {"torch": state["rng"]["torch"], "python": state["rng"]["python"]}},
           "optimizer_type": {**state, "optimizer": {"state": {}, "param_groups": {}}},
           "bool_step": {**state, "step": True}, "negative_step": {**state, "step": -3},
           "negative_tokens": {**state, "tokens_seen": -1}, "sampler_rng": {**state, "sampler": {"rng": 5}},
           "sampler_missing": {**state, "sampler": {}},
           "param_group": {**state, "optimizer": {**state["optimizer"], "param_groups": [7]}},
           "param_state": {**state, "optimizer": {**state["optimizer"], "state": {0: 1.5}}}}[case]
    save_checkpoint(tmp_path / "ck", _model(0), ByteTokenizer(), train_state=bad)
    with pytest.raises(CheckpointError, match=message) as info:
        load_train_state(tmp_path / "ck")
    assert str(tmp_path / "ck" / "train_state.pt") in str(info.value)


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt", "tokenizer/tokenizer.json"])
def test_64_random_bytes_in_any_file_are_reported_naming_it(tmp_path, name):
    model, state = _model(0), train_state(3)
    save_checkpoint(tmp_path / "ck", model, ByteTokenizer(), train_state=state)
    f = tmp_path / "ck" / name
    data = bytearray(f.read_bytes())
    # inside the data a loader would take without complaint: a weight matrix, the torch RNG state
    inside = {"model.safetensors": model.transformer.wte.weight.detach().numpy().tobytes(),
              "train_state.pt": state["rng"]["torch"].numpy().tobytes()}.get(name, bytes(data[:64]))
    at = bytes(data).find(inside) + 8
    data[at:at + 64] = np.random.default_rng(0).bytes(64)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted") as info:
        load_train_state(tmp_path / "ck") if name == "train_state.pt" else load_checkpoint(tmp_path / "ck")
    assert str(f) in str(info.value)
    # each loader checks its own files: the weights still load when only the train state is damaged
    if name == "train_state.pt":
        assert torch.equal(load_checkpoint(tmp_path / "ck").model.transformer.wte.weight, model.transformer.wte.weight)


def test_checkpoints_from_before_the_digests_and_weights_only_loading_still_load(tmp_path):
    model, state = _model(0), train_state(5)
    save_checkpoint(tmp_path / "ck", model, ByteTokenizer(), metadata={"step": 5}, train_state=state)
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    del doc["sha256"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(doc))
    torch.save(state, tmp_path / "ck" / "train_state.pt")  # as before: numpy's RNG state pickled as an array
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.metadata == {"step": 5} and torch.equal(ck.model.lm_head.weight, model.lm_head.weight)
    assert _same(load_train_state(tmp_path / "ck"), state)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "ck", _model(0), ByteTokenizer(), train_state=train_state(1))
        (tmp_path / "plain").write_text("x")
        (tmp_path / "folder").mkdir()
    finally:
        os.umask(old)
    file_mode, folder_mode = ((tmp_path / name).stat().st_mode & 0o777 for name in ("plain", "folder"))
    paths = [tmp_path / "ck", *(tmp_path / "ck").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in paths}
    assert modes == {"ck": folder_mode, "ck/tokenizer": folder_mode, "ck/model.safetensors": file_mode,
                     "ck/config.json": file_mode, "ck/train_state.pt": file_mode, "ck/tokenizer/tokenizer.json": file_mode}


def test_a_damaged_checkpoint_is_one_line_from_the_cli(tmp_path, capsys):
    from simplegpt.cli import main

    save_checkpoint(tmp_path / "ck", _model(0), ByteTokenizer())
    f = tmp_path / "ck" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-64:] = bytes(64)  # the last weights, zeroed: still a valid safetensors file
    f.write_bytes(bytes(data))
    assert main(["info", str(tmp_path / "ck")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("simplegpt info: error: ") and str(f) in line and "truncated or corrupted" in line


def test_a_run_folder_given_as_a_checkpoint_names_its_checkpoint(tmp_path, capsys):
    """`generate`/`info`/`serve --checkpoint out/RUN` (the run folder, not RUN/best): one line naming the
    checkpoint inside it to use instead."""
    from simplegpt.cli import main

    save_checkpoint(tmp_path / "run" / "best", _model(0), ByteTokenizer())
    assert main(["info", str(tmp_path / "run")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("simplegpt info: error: ") and f"name its checkpoint, {tmp_path / 'run' / 'best'}" in line
    with pytest.raises(CheckpointError, match=r"config\.json is missing$"):  # not a run folder: no hint
        load_checkpoint(tmp_path)


def test_a_config_json_naming_a_huge_n_layer_is_refused_at_once(tmp_path):
    # the number of blocks is compared without making a set of n_layer numbers (10**12 of them did not fit)
    from simplegpt.checkpoint import describe_checkpoint

    save_checkpoint(tmp_path / "ck", _model(0), ByteTokenizer())
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    doc["model"]["n_layer"] = 10**12
    (tmp_path / "ck" / "config.json").write_text(json.dumps(doc))
    for read in (load_checkpoint, describe_checkpoint):
        with pytest.raises(CheckpointError, match="n_layer 1000000000000, the weights hold 1 blocks"):
            read(tmp_path / "ck")
