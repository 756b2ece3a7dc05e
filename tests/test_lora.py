"""LoRA fine-tuning (train --lora, simplegpt.training.lora): only the adapters train, the loss falls,
resume is exact, checkpoints hold merged weights that equal the model with its adapters, and the
adapters export as a folder that peft loads onto the exported base."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_gpt
from safetensors.torch import load_file

from simplegpt.accel import cpu
from simplegpt.checkpoint import load_checkpoint, load_train_state
from simplegpt.cli import main
from simplegpt.config import TrainConfig
from simplegpt.errors import ConfigError
from simplegpt.generation.engine import Engine
from simplegpt.generation.sampling import SamplingParams
from simplegpt.training import lora
from simplegpt.training.hardware import core_shards
from simplegpt.training.loop import train

peft = pytest.importorskip("peft")

RANK = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_path) -> Path:
    path = tmp_path_factory.mktemp("lora_corpus") / "corpus.txt"
    path.write_text(shakespeare_path.read_text()[:40_000])
    return path


def tiny(root: Path, corpus: Path, **kw) -> TrainConfig:
    base = dict(data=str(corpus), data_dir=str(root / "data"), n_layer=2, n_head=2, n_embd=32, block_size=16,
                batch_size=8, max_iters=8, eval_interval=4, eval_iters=2, log_interval=1, warmup_iters=0,
                sample_tokens=0, out_dir=str(root / "run"), num_threads=1, plot=False, tensorboard=False,
                peak_flops=1e12)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus) -> Path:
    """A briefly pretrained char model: the weights LoRA starts from."""
    root = tmp_path_factory.mktemp("lora_base")
    train(tiny(root, corpus, max_iters=30, eval_interval=30, lr=1e-2, out_dir=str(root / "base")), progress=False)
    return root / "base" / "last"


def lora_run(root: Path, corpus: Path, base: Path, **kw) -> TrainConfig:
    return tiny(root, corpus, init_from=str(base), lora=RANK, lr=1e-2, min_lr=1e-2, **kw)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def rebuilt_base(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The base weights a LoRA checkpoint holds: model.safetensors with the wrapped layers' weights
    of lora/base.safetensors."""
    return {**load_file(str(checkpoint / "model.safetensors")),
            **load_file(str(checkpoint / lora.LORA_DIR / lora.BASE_WEIGHTS))}


REPEATED = "the cat sat on the mat. "


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, corpus, base) -> Path:
    """A LoRA fine-tune of base on a text of its own (one sentence, repeated)."""
    root = tmp_path_factory.mktemp("lora_ft")
    (root / "cat.txt").write_text(REPEATED * 400)
    train(lora_run(root, root / "cat.txt", base, max_iters=40, eval_interval=40), progress=False)
    return root / "run"


def text_loss(checkpoint: Path) -> float:
    """The model's loss on the fine-tuning text, one window of 16 characters."""
    ck = load_checkpoint(checkpoint)
    ids = torch.tensor(ck.tokenizer.encode(REPEATED * 2)[:17])
    with torch.no_grad():
        return float(ck.model.loss(ids[None, :-1], ids[None, 1:]))


def test_only_the_adapters_train_and_the_loss_falls(finetuned, base):
    ckpt = finetuned / "last"
    before = load_file(str(base / "model.safetensors"))
    after = rebuilt_base(ckpt)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the frozen base, bit for bit
    merged = load_file(str(ckpt / "model.safetensors"))
    wrapped = load_file(str(ckpt / lora.LORA_DIR / lora.BASE_WEIGHTS)).keys()
    assert len(wrapped) == 2 * 4  # 2 blocks x c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert all(torch.equal(merged[k], before[k]) for k in before.keys() - wrapped)  # embeddings, norms, biases
    assert all(not torch.equal(merged[k], before[k]) for k in wrapped)  # the adapters changed the model
    # the optimizer holds the adapters alone: rank x (in + out) per layer
    state = load_train_state(ckpt)["optimizer"]
    params = [i for group in state["param_groups"] for i in group["params"]]
    adapters = load_file(str(ckpt / lora.LORA_DIR / lora.ADAPTER_WEIGHTS))
    assert len(params) == len(adapters) == 2 * len(wrapped)
    C = 32
    assert sum(t.numel() for t in adapters.values()) == 2 * RANK * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert text_loss(ckpt) < text_loss(base) - 0.05  # it learned the new text (2.73 -> 2.65)


@pytest.mark.parametrize("cpu_shards", [1, 2])
def test_resume_is_exact(tmp_path, corpus, base, cpu_shards):
    whole = lora_run(tmp_path / "a", corpus, base, cpu_shards=cpu_shards, num_threads=cpu_shards,
                     lora_targets="c_attn,mlp")
    train(whole, progress=False)
    parted = whole.replace(out_dir=str(tmp_path / "b" / "run"))
    train(parted, stop_at=3, progress=False)
    resumed = train(parted, resume=tmp_path / "b" / "run" / "last", progress=False)
    assert resumed.step == 8
    assert losses(tmp_path / "a" / "run") == losses(tmp_path / "b" / "run")
    a, b = (load_file(str(tmp_path / r / "run" / "last" / lora.LORA_DIR / lora.ADAPTER_WEIGHTS)) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", [
    dict(),  # LlamaForCausalLM, tied head
    dict(qk_norm=True, tie_word_embeddings=False, lora_targets="c_attn,mlp.c_fc,mlp.c_proj"),  # Qwen3ForCausalLM
], ids=["llama", "qwen3"])
def test_a_llama_style_model_resumes_exactly_and_its_adapters_load_in_peft(tmp_path, corpus, capsys, variant):
    transformers = pytest.importorskip("transformers")
    variant = dict(variant)
    targets = variant.pop("lora_targets", "attn,mlp")
    llama = dict(n_kv_head=1, positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False, **variant)
    train(tiny(tmp_path / "base", corpus, max_iters=4, eval_interval=4, **llama), progress=False)
    base = tmp_path / "base" / "run" / "last"
    whole = lora_run(tmp_path / "a", corpus, base, max_iters=6, eval_interval=3, lora_targets=targets, **llama)
    train(whole, progress=False)
    parted = whole.replace(out_dir=str(tmp_path / "b" / "run"))
    train(parted, stop_at=2, progress=False)
    train(parted, resume=tmp_path / "b" / "run" / "last", progress=False)
    assert losses(tmp_path / "a" / "run") == losses(tmp_path / "b" / "run")
    ckpt = tmp_path / "a" / "run" / "last"
    for args in ([str(base), str(tmp_path / "base_hf")], [str(ckpt), str(tmp_path / "merged_hf")],
                 [str(ckpt), str(tmp_path / "adapters"), "--adapters-only"]):
        assert main(["export-hf", *args]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "adapters" / lora.ADAPTER_CONFIG).read_text())
    want_targets = {"attn,mlp": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                 "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
                    "c_attn,mlp.c_fc,mlp.c_proj": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                   "self_attn.q_proj", "self_attn.v_proj"]}[targets]
    assert config["target_modules"] == want_targets and not config["fan_in_fan_out"]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    with torch.no_grad():
        want, _ = load_checkpoint(ckpt).model(ids)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", dtype=torch.float32)
        assert type(hf_base).__name__ == ("Qwen3ForCausalLM" if llama.get("qk_norm") else "LlamaForCausalLM")
        plain = hf_base(ids).logits
        adapted = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapters")).eval()
        got = adapted(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf").eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)
    assert (plain - want).abs().max() > 1e-3  # the adapters matter


def test_merged_checkpoint_equals_the_base_with_its_adapters_in_peft(finetuned, base):
    ckpt = finetuned / "last"
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    merged = load_checkpoint(ckpt).model
    model = load_checkpoint(base).model
    folder = ckpt / lora.LORA_DIR
    peft.inject_adapter_in_model(peft.LoraConfig.from_pretrained(str(folder)), model)
    saved = {k.removeprefix(lora.PEFT_PREFIX): v for k, v in load_file(str(folder / lora.ADAPTER_WEIGHTS)).items()}
    assert not peft.set_peft_model_state_dict(model, saved).unexpected_keys
    with torch.no_grad():
        want, _ = model.eval()(ids)
        got, _ = merged(ids)
        plain, _ = load_checkpoint(base).model(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (plain - want).abs().max() > 1e-2  # the adapters matter


def adapted_model(targets: str) -> torch.nn.Module:
    """make_tiny_gpt with LoRA adapters on targets whose B factors are far from 0 (they matter)."""
    model = make_tiny_gpt(scale=8.0)
    lora.add_adapters(model, TrainConfig(lora=RANK, lora_targets=targets, init_from="x"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.skipif(cpu.load() is None, reason="the CPU kernels are not available")
def test_the_training_kernels_run_the_adapters():
    model = adapted_model("attn,mlp")
    ids = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    want = model.loss(ids, targets)
    (want_grad,) = torch.autograd.grad(want, [model.transformer.h[0].attn.c_attn.lora_B["default"].weight])
    got = cpu.for_training(model).loss(ids, targets)
    (got_grad,) = torch.autograd.grad(got, [model.transformer.h[0].attn.c_attn.lora_B["default"].weight])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(cpu.load() is None, reason="the CPU kernels are not available")
def test_the_engine_runs_the_adapters_of_a_partly_adapted_model():
    # adapters on attention only: the MLP's plain linears alone must not make the decode step fused
    model = adapted_model("attn").eval()
    ids = [1, 2, 3]
    [result] = Engine(model).generate([ids], SamplingParams(max_new_tokens=8, temperature=0.0))
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert result.token_ids == seq[3:]


def test_export_hf_adapters_only_loads_in_peft_onto_the_exported_base(finetuned, base, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    ckpt = finetuned / "last"
    for args in ([str(base), str(tmp_path / "base_hf")], [str(ckpt), str(tmp_path / "merged_hf")],
                 [str(ckpt), str(tmp_path / "adapters"), "--adapters-only"]):
        assert main(["export-hf", *args]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    with torch.no_grad():
        want, _ = load_checkpoint(ckpt).model(ids)
        hf_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base_hf", torch_dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapters")).eval()
        got = adapted(ids).logits
        merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged_hf").eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)
    # a LoRA checkpoint is an ordinary one to the readers: generate runs it
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "KING", "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    assert main(["export-hf", str(base), str(tmp_path / "none"), "--adapters-only"]) != 0
    err = capsys.readouterr().err
    assert "holds no LoRA adapters" in err and len(err.strip().splitlines()) == 1, err


def test_ddp_over_two_processes_gives_the_losses_of_one(tmp_path, corpus, base):
    one = lora_run(tmp_path / "one", corpus, base, grad_accum_steps=2, max_iters=4, cpu_shards=1)
    train(one, progress=False)
    settings = {**one.to_dict(), "out_dir": str(tmp_path / "ddp"), "num_threads": 1}
    args = [a for k, v in settings.items() if k not in ("init_from", "data_dir")
            for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "simplegpt", "train", "--quiet", "--init-from", str(base), "--data_dir",
                           one.data_dir, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert losses(tmp_path / "ddp") == losses(tmp_path / "one" / "run")
    assert lora.has_saved_adapters(tmp_path / "ddp" / "last")


@pytest.mark.parametrize("args, message", [
    (["--lora", "0"], "a LoRA rank is 1 or more"),
    (["--lora", "4", "--lora_targets", "attn,q_proj"], "unknown LoRA target 'q_proj'"),
    (["--lora", "4", "--init_from", ""], "give --init-from CHECKPOINT"),
    (["--lora_alpha", "8"], "applies to LoRA runs only"),
    (["--lora", "-2"], "lora must be >= 0"),
])
def test_bad_lora_settings_are_one_line(tmp_path, base, corpus, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    init = [] if "--init_from" in args else ["--init-from", str(base)]
    code = main(["train", "--data", str(corpus), "--block_size", "16", "--max_iters", "2", "--quiet", *init, *args])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # refused before a run folder was made


def test_adapter_dropout_keeps_the_batches_whole():
    # dropout draws from one random stream, which the core shards' threads would share out of order
    cfg = TrainConfig(lora=RANK, init_from="x", batch_size=4)
    assert core_shards(cfg, torch.device("cpu"), torch.float32, 2) == 2
    assert core_shards(cfg.replace(lora_dropout=0.1), torch.device("cpu"), torch.float32, 2) == 1


def test_a_resume_cannot_change_the_adapters_and_fsdp_or_muon_are_refused(finetuned, corpus, base, tmp_path):
    cfg = TrainConfig(**{**load_checkpoint(finetuned / "last").metadata["train_config"], "lora": 8,
                         "max_iters": 50})
    with pytest.raises(ConfigError, match="cannot resume .* with lora=8"):
        train(cfg, resume=finetuned / "last", progress=False)
    cfg = lora_run(tmp_path, corpus, base)
    with pytest.raises(ConfigError, match="parallel = 'fsdp'"):
        lora.check(cfg, SimpleNamespace(name="fsdp"))
    with pytest.raises(ConfigError, match="optimizer = 'muon'"):
        lora.check(cfg.replace(optimizer="muon"), SimpleNamespace(name="single"))


# a GPT-2 (tied head) and a Llama-style model with an untied head, whose rows train apart from the embedding's
SHAPES = {True: {},
          False: dict(positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False, tie_word_embeddings=False)}


@pytest.mark.parametrize("tied", [True, False], ids=["gpt2_tied", "llama_untied"])
def test_lora_trains_the_rows_of_the_chat_markers_sft_added_and_resumes_exactly(tmp_path, tied, capsys):
    from simplegpt import get_tokenizer, save_checkpoint
    from simplegpt.chat.vocab import prepare_chat_model
    from simplegpt.config import load_config

    tok = get_tokenizer("byte")  # no chat markers: SFT adds them at 257 and 258
    base = make_tiny_gpt(vocab_size=tok.vocab_size, n_positions=64, **SHAPES[tied])
    save_checkpoint(tmp_path / "base", base, tok)
    chats = [{"messages": [{"role": "user", "content": f"add {a} and {b}"},
                           {"role": "assistant", "content": str(a + b)}]} for a in range(5) for b in range(4)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))

    def run(name: str) -> TrainConfig:
        return load_config(None, {"sft": str(tmp_path / "chats.jsonl"), "init_from": str(tmp_path / "base"),
                                  "lora": RANK, "out_dir": str(tmp_path / name), "max_iters": 6, "eval_interval": 3,
                                  "log_interval": 1, "batch_size": 4, "lr": 1e-2, "cpu_shards": 1, "plot": False,
                                  "tensorboard": False, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64,
                                  "tokenizer": "byte", **SHAPES[tied]})

    train(run("whole"), progress=False, log=lambda line: None)
    train(run("parted"), stop_at=2, progress=False, log=lambda line: None)
    train(run("parted"), resume=tmp_path / "parted" / "last", progress=False, log=lambda line: None)
    assert losses(tmp_path / "whole") == losses(tmp_path / "parted")  # the resume is bit for bit
    a, b = (load_file(str(tmp_path / r / "last" / lora.LORA_DIR / lora.ADAPTER_WEIGHTS)) for r in ("whole", "parted"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lora.saved_token_indices(tmp_path / "whole" / "last" / lora.LORA_DIR) == (
        {"transformer.wte": [257, 258]} if tied else {"transformer.wte": [257, 258], "lm_head": [257, 258]})
    grown = make_tiny_gpt(vocab_size=tok.vocab_size, n_positions=64, **SHAPES[tied])
    prepare_chat_model(grown, tok)  # the rows the markers start at
    merged = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    keys = ["transformer.wte.weight"] + ([] if tied else ["lm_head.weight"])
    for key in keys:
        start = grown.state_dict()[key]
        assert not torch.equal(merged[key][257:], start[257:])  # the markers' rows trained
        assert torch.equal(merged[key][:257], start[:257])  # every other row is the base's, bit for bit

    # the adapter folder carries the rows in peft's way: onto the exported base, its vocabulary resized to the
    # chat tokenizer's, peft gives the fine-tuned model's logits
    transformers = pytest.importorskip("transformers")
    ckpt = tmp_path / "whole" / "last"
    for args in ([str(tmp_path / "base"), str(tmp_path / "base_hf")],
                 [str(ckpt), str(tmp_path / "ad"), "--adapters-only"]):
        assert main(["export-hf", *args]) == 0, capsys.readouterr().err
    ids = torch.tensor([[257, 117, 115, 101, 114, 10, 97, 100, 258, 10, 257, 97]])  # the markers among bytes
    with torch.no_grad():
        want, _ = load_checkpoint(ckpt).model(ids)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", dtype=torch.float32)
        hf_base.resize_token_embeddings(259)
        got = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "ad")).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
