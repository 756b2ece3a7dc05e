import subprocess
import sys
import textwrap

import pytest
import torch

from simplegpt.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from simplegpt.errors import CheckpointError
from simplegpt.model import GPT, GPTConfig
from simplegpt.tokenizer import ByteTokenizer


def _model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=257, n_positions=8, n_embd=8, n_layer=1, n_head=2))


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    old = _model(0)
    save_checkpoint(tmp_path / "last", old, ByteTokenizer(), metadata={"step": 1}, train_state={"step": 1})
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
    assert "1 layers, 2 heads, 8 wide, context 8, vocab 257" in out and "byte" in out
    assert f"parameters: {model.num_parameters():,}" in out and "val loss: 1.2500" in out
    assert main(["info", str(tmp_path / "ck"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == 7 and doc["parameters"] == model.num_parameters() and doc["model"]["n_embd"] == 8
    assert main(["info", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.strip() == f"simplegpt info: error: checkpoint {tmp_path / 'nope'} does not exist"
