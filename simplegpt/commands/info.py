"""simplegpt info: what a checkpoint holds."""

from __future__ import annotations

import argparse
import json

from ..cli import add_checkpoint_argument
from ..console import count
from ..errors import file_access_errors

HELP = "show a checkpoint's model config, parameter count, tokenizer and metadata"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p, "checkpoint directory", unless="system")
    p.add_argument("--system", action="store_true",
                   help="print which CPU kernels this machine uses and why (no checkpoint needed)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import describe_checkpoint

    if args.system:
        from ..accel.cpu.lib import report

        print(report())
        if args.checkpoint is None:
            return 0

    with file_access_errors():
        ck = describe_checkpoint(args.checkpoint)  # config, shapes and tokenizer: no model is built
    info = {
        "path": str(ck.path),
        "model": ck.config.to_dict(),
        "parameters": ck.parameters,
        "tokenizer": ck.tokenizer,
        "chat_template": ck.chat_template,
        **{k: v for k, v in ck.metadata.items() if k in ("step", "metrics", "tokens_seen")},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = ck.config
    lines = {
        "path": info["path"],
        "model": f"{count(c.n_layer, 'layer')}, {count(c.n_head, 'head')}, {c.n_embd} wide, context {c.n_positions}, "
                 f"vocab {c.vocab_size}, dropout {c.dropout}, bias {c.bias}",
        "architecture": architecture(c),
        "parameters": f"{info['parameters']:,}",
        "tokenizer": info["tokenizer"] or "none",
        "chat template": "stored (chat, serve and export-hf prompt with it)" if ck.chat_template
                         else "none (chat and serve use the plain 'User: ... / Assistant:' prompt)",
    }
    if "step" in info:
        lines["step"] = f"{info['step']:,}"
    if "tokens_seen" in info:
        lines["tokens seen"] = f"{info['tokens_seen']:,}"
    for name, value in (info.get("metrics") or {}).items():
        if isinstance(value, float):
            lines[name.replace("_", " ")] = f"{value:.4f}"
    for k, v in lines.items():
        print(f"{k:>13}: {v}")
    return 0


def architecture(c) -> str:
    """The options of GPTConfig c beyond its sizes: 'GPT-2' when they are all GPT-2's, else each one
    (positions and rope_theta, norm, MLP, key/value heads, head width, QK-norm, the head's tying)."""
    if c.is_gpt2:
        return "GPT-2 (learned positions, LayerNorm, GELU MLP, tied head)"
    positions = f"rotary positions (rope_theta {c.rope_theta:g})" if c.positions == "rotary" else "learned positions"
    eps = c.rms_norm_eps if c.norm == "rmsnorm" else c.layer_norm_epsilon
    norm = f"{c.norm} (eps {eps:g}{'' if c.norm_gain else ', no gain'})"
    return ", ".join([positions, norm, f"MLP {c.mlp} (intermediate_size {c.ffn_size})",
                      f"n_kv_head {c.kv_heads} of {c.n_head} heads", f"head_dim {c.head_dim}",
                      f"qk_norm {str(c.qk_norm).lower()}",
                      f"tie_word_embeddings {str(c.tie_word_embeddings).lower()}"])
