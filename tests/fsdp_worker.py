"""tests/test_fsdp.py's worker, run by `torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT ONE_PROCESS_CKPT`
on gloo, and the definitions the test's one-process reference shares with it (imported from there).

What it does, every rank:
  1. builds the tiny GPT from seed 0, shards it (shard_model), trains STEPS steps on the fixed global
     batches (each rank its half of the rows, micro-batches with gradient sync only on the last),
     saves a sharded checkpoint to OUT/sharded (rank 0 adds config.json and tokenizer/ with
     simplegpt.checkpoint), then trains MORE steps: the uninterrupted run;
  2. builds the model from another seed, shards it, load_sharded(OUT/sharded), trains MORE steps;
  3. the same from ONE_PROCESS_CKPT, saved by the test's one-process reference without a process group;
  4. shards the seed-0 model with bf16 compute and takes one step.
Rank 0 writes OUT/result.json (the losses) and the full (unsharded) states as torch files.
"""

from __future__ import annotations

import json
import shutil
import string
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from simplegpt import checkpoint as ckpt
from simplegpt.files import sha256_file
from simplegpt.model import GPT, GPTConfig
from simplegpt.tokenizer import CharTokenizer
from simplegpt.training.optimizer import param_groups

CONFIG = dict(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, dropout=0.0)
ROWS, SEQ = 4, 16  # the global batch of one optimizer step: ROWS sequences of SEQ tokens
STEPS, MORE = 3, 2  # steps before the checkpoint, and after it
MICRO_ROWS = 1  # rows per micro-batch, on 1 process and on N alike


def make_model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CONFIG))


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """The trainer's parameter groups (decayed matrices, undecayed biases and norms), plain AdamW."""
    return torch.optim.AdamW(param_groups(model, 0.1, False), lr=1e-2, betas=(0.9, 0.95))


def batches() -> list[torch.Tensor]:
    """The STEPS + MORE global batches, (ROWS, SEQ + 1) token ids each, the same in every process."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, CONFIG["vocab_size"], (ROWS, SEQ + 1), generator=gen) for _ in range(STEPS + MORE)]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One optimizer step on this rank's rows of the global batch; returns the global batch's mean loss.
    Each micro-batch's loss is divided by the rank's number of micro-batches; FSDP2 averages the
    gradients over the ranks, so the gradient is the global batch's mean whatever the world size."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = batch.chunk(world)[rank]
    micro = rows.split(MICRO_ROWS)
    total = torch.zeros(())
    for i, part in enumerate(micro):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2's no_sync
            model.set_requires_gradient_sync(i == len(micro) - 1)
        loss = model.loss(part[:, :-1], part[:, 1:]) / len(micro)
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(total)
        total /= world
    return float(total)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The model's and optimizer's whole state as plain CPU tensors keyed by parameter names
    (get_state_dict: gathered on rank 0 for a sharded model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if dist.is_initialized() else None
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    # a copy: without a process group get_state_dict gives the live parameters and moments themselves
    return torch.utils._pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v,
                                        {"model": model_state, "optimizer": optim_state})


def flatten(tree, prefix: str = "") -> dict:
    """A nested state as {"a.b.c": leaf}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def write_other_files(directory: Path, model_state: dict, step: int) -> None:
    """What rank 0 writes beside dcp/: config.json and tokenizer/, made by simplegpt.checkpoint's own
    save of the same weights into a scratch folder (its model.safetensors is left out, dcp/'s files
    are recorded in its place)."""
    scratch = directory.parent / f"{directory.name}-scratch"
    model = ckpt.model_from_state(GPTConfig(**CONFIG), model_state)
    tokenizer = CharTokenizer(string.ascii_letters[:CONFIG["vocab_size"] - 1])  # + EOS: the model's vocabulary
    ckpt.save_checkpoint(scratch, model, tokenizer, metadata={"step": step, "tokens_seen": step * ROWS * SEQ})
    shutil.copytree(scratch / ckpt.TOKENIZER_DIR, directory / ckpt.TOKENIZER_DIR)
    # config.json records the digest of every other file of the directory, dcp/'s included
    doc = json.loads((scratch / ckpt.CONFIG_FILE).read_text())
    del doc[ckpt.CHECKSUMS][ckpt.WEIGHTS_FILE]
    doc[ckpt.CHECKSUMS].update({p.relative_to(directory).as_posix(): sha256_file(p)
                                for p in sorted((directory / "dcp").iterdir())})
    (directory / ckpt.CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    shutil.rmtree(scratch)


def main(out: Path, one_process_ckpt: Path) -> None:
    from torch.distributed.fsdp import FSDPModule

    from simplegpt.training.fsdp import fsdp_unavailable, load_sharded, save_sharded, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    why = fsdp_unavailable(torch.device("cpu"))
    if why is not None:
        if rank == 0:
            (out / "result.json").write_text(json.dumps({"unavailable": why}))
        dist.destroy_process_group()
        return
    data = batches()
    result = {"world_size": dist.get_world_size()}

    model = shard_model(make_model(0))
    result["fully_sharded"] = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    result["tied"] = model.lm_head.weight is model.transformer.wte.weight
    optimizer = make_optimizer(model)
    losses = [train_step(model, optimizer, b) for b in data[:STEPS]]
    save_sharded(out / "sharded", model, optimizer)
    saved = full_state(model, optimizer)
    if rank == 0:
        write_other_files(out / "sharded", saved["model"], STEPS)
        torch.save(saved, out / "full_at_save.pt")
    result["losses"] = losses + [train_step(model, optimizer, b) for b in data[STEPS:]]

    for name, source, seed in (("resumed_2_from_2", out / "sharded", 1), ("resumed_2_from_1", one_process_ckpt, 2)):
        model = shard_model(make_model(seed))
        optimizer = make_optimizer(model)
        load_sharded(source, model, optimizer)
        loaded = full_state(model, optimizer)
        if rank == 0:
            torch.save(loaded, out / f"full_{name}.pt")
        result[name] = [train_step(model, optimizer, b) for b in data[STEPS:]]

    # bf16 compute (parameters cast for forward and backward, gradients reduced in float32)
    model = shard_model(make_model(0), mp_policy=torch.bfloat16)
    optimizer = make_optimizer(model)
    result["bf16_first_loss"] = train_step(model, optimizer, data[0])
    result["bf16_param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})

    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
