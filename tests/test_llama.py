"""The Llama-style options of GPTConfig (rotary, RMSNorm, SwiGLU/ReLU², GQA, QK-norm, no bias, untied
head): every combination runs cached == uncached; chosen combinations train, save, resume bit-exactly
and generate through every engine backend; bad configs are one line."""

import itertools
import math

import pytest
import torch

from simplegpt.checkpoint import load_checkpoint, save_checkpoint
from simplegpt.config import TrainConfig, load_config, read_toml, to_toml
from simplegpt.engine import Engine, KVCache, SamplingParams
from simplegpt.errors import ConfigError
from simplegpt.learn import inspect_text
from simplegpt.learn.attention import attention_weights
from simplegpt.model import GPT, GPTConfig, preset_config
from simplegpt.quantize import quantize_int8
from simplegpt.tokenizer import get_tokenizer
from simplegpt.training.loop import train

from conftest import make_tiny_gpt
from test_engine import GREEDY, PROMPTS, reference_greedy
from test_engine_compile import needs_compile

WINDOW = 16
LLAMA = dict(positions="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False)
QWEN3 = dict(LLAMA, qk_norm=True, head_size=24, tie_word_embeddings=False)
NANOCHAT = dict(positions="rotary", norm="rmsnorm", norm_gain=False, mlp="relu2", n_kv_head=1, qk_norm=True,
                bias=False, tie_word_embeddings=False)
# Together these give every value of every option, and the pairs that meet in one code path
# (learned positions with RMSNorm, rotary with LayerNorm, GQA with biases, QK-norm without a gain).
COMBOS = {
    "llama": LLAMA,
    "qwen3": QWEN3,
    "nanochat": NANOCHAT,
    "learned-rmsnorm-relu2": dict(norm="rmsnorm", mlp="relu2", intermediate_size=48),
    "rotary-layernorm-nogain-untied": dict(positions="rotary", norm_gain=False, tie_word_embeddings=False),
    "learned-swiglu-gqa-bias-qknorm": dict(mlp="swiglu", n_kv_head=1, qk_norm=True, rope_theta=500.0),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: torch's ops on 2 threads of a busy 2-core machine wait for each other (30x slower here)
    torch.set_num_threads(1)


def tiny(options: dict, n_positions: int = WINDOW, seed: int = 0, scale: float | None = 4.0, jitter=0.05) -> GPT:
    """The suite's tiny model with these options, its weights scaled so that its tokens depend on the
    whole context (positions included) and jittered so no norm gain is exactly 1."""
    return make_tiny_gpt(seed, scale, jitter, vocab_size=257, n_positions=n_positions, **options).eval()


ALL = [dict(zip(("positions", "norm", "norm_gain", "mlp", "n_kv_head", "qk_norm", "bias", "tie_word_embeddings"), v))
       for v in itertools.product(("learned", "rotary"), ("layernorm", "rmsnorm"), (True, False),
                                  ("gelu", "swiglu", "relu2"), (None, 1), (False, True), (True, False), (True, False))]


def test_every_option_combination_caches_and_pads_like_the_full_forward():
    # 192 combinations: the cached forward (a prompt, then one token at a time) gives the full forward's
    # logits, and a left-padded row gives its unpadded logits
    idx = torch.randint(0, 257, (2, 9))
    for options in ALL:
        model = tiny(options, scale=1.0, jitter=0.1)
        with torch.no_grad():
            full, _ = model(idx)
            cache = KVCache(model.config, 2, WINDOW)
            first, _ = model(idx[:, :6], kv_cache=cache)
            steps = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(6, 9)]
            padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), idx[:, :6]], dim=1)
            mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], dim=1)
            left, _ = model(padded, attention_mask=mask)
        assert torch.allclose(torch.cat([first, *steps], dim=1), full, atol=1e-5), options
        assert torch.allclose(left[:, 3:], full[:, :6], atol=1e-5), options
        assert model.config.is_gpt2 == (options == ALL[0] or options == dict(ALL[0], bias=False)), options


def test_gqa_caches_only_the_key_value_heads():
    config = GPTConfig(vocab_size=257, n_positions=WINDOW, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, **{
        k: v for k, v in LLAMA.items() if k != "n_kv_head"})
    cache = KVCache(config, batch_size=3)
    assert cache.k.shape == (2, 3, 2, WINDOW, 8)
    assert GPT(config).transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * 2) * 8, 32)


@pytest.mark.parametrize("name", list(COMBOS))
def test_engine_greedy_equals_uncached_reference_left_padded_and_past_the_window(name):
    # rotary positions restart at 0 after the window slides and count real tokens only in a left-padded
    # batch: the cached engine (native linears on a CPU) gives the uncached reference's tokens
    model = tiny(COMBOS[name])
    engine = Engine(model, window_shift=5)
    expected = [reference_greedy(model, p, 40, 5) for p in PROMPTS]
    assert [r.token_ids for r in engine.generate(PROMPTS, GREEDY)] == expected
    uncached = Engine(model, use_cache=False, window_shift=5)
    assert [r.token_ids for r in uncached.generate(PROMPTS, GREEDY)] == expected


def test_int8_quantizes_every_new_linear_and_decodes_each_prompt_as_alone():
    model = tiny(QWEN3, n_positions=64, scale=None, jitter=None)
    ref = tiny(QWEN3, n_positions=64, scale=None, jitter=None)
    report = quantize_int8(model)
    assert report.layers == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj per block, and the untied head
    idx = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        a, _ = ref(idx)
        b, _ = model(idx)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop_at_eos=False)
    engine = Engine(model)
    batched = engine.generate(PROMPTS, params)
    assert [r.token_ids for r in batched] == [engine.generate([p], params)[0].token_ids for p in PROMPTS]


@needs_compile
def test_compiled_decode_of_a_rotary_gqa_model_equals_the_reference():
    model = tiny(QWEN3)
    engine = Engine(model, compile=True, window_shift=5)
    expected = [reference_greedy(model, p, 40, 5) for p in PROMPTS]
    assert [r.token_ids for r in engine.generate(PROMPTS, GREEDY)] == expected


def test_inspect_records_the_attention_a_gqa_rotary_model_uses():
    model = tiny(QWEN3)
    idx = torch.randint(0, 257, (1, 10))
    logits, weights = attention_weights(model, idx)
    with torch.no_grad():
        ref, _ = model(idx)
    assert torch.allclose(logits, ref, atol=1e-5)
    assert weights.shape == (2, 1, 2, 10, 10)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 1, 2, 10))
    assert torch.all(weights.triu(1) == 0)
    tok = get_tokenizer("byte")
    insp = inspect_text(make_tiny_gpt(vocab_size=tok.vocab_size, n_positions=WINDOW, **LLAMA), tok, "hello")
    assert insp.position_similarity.shape == (WINDOW, WINDOW)
    assert math.isclose(float(insp.position_similarity[3, 3]), 1.0, rel_tol=1e-5)


def test_presets_have_the_published_shapes():
    with torch.device("meta"):
        assert GPT(preset_config("smollm2-135m")).num_parameters() == 134_515_008
        qwen = GPT(preset_config("qwen3-0.6b"))
        assert qwen.num_parameters() == 596_049_920
        assert qwen.transformer.h[0].attn.c_attn.weight.shape == ((16 + 2 * 8) * 128, 1024)
        for size, llama_size in [("tiny", "llama-tiny"), ("mini", "llama-mini"), ("small", "llama-small"),
                                 ("gpt2", "llama"), ("gpt2-medium", "llama-medium"), ("gpt2-xl", "llama-xl")]:
            gpt2, llama = GPT(preset_config(size)), GPT(preset_config(llama_size))
            assert llama.config.n_layer == gpt2.config.n_layer and llama.config.n_embd == gpt2.config.n_embd
            assert not llama.config.is_gpt2


def test_a_config_file_and_the_command_line_take_the_options(tmp_path):
    cfg = TrainConfig(n_head=4, n_kv_head=2, positions="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=True,
                      tie_word_embeddings=False, head_dim=16, intermediate_size=96)
    assert (cfg.model.kv_heads, cfg.model.head_dim, cfg.model.ffn_size) == (2, 16, 96)
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert TrainConfig(**read_toml(tmp_path / "c.toml")).model == cfg.model
    assert TrainConfig(n_kv_head=0).model.n_kv_head is None  # 0: as many as n_head
    builtin = load_config("llama_shakespeare_char").model
    assert (builtin.positions, builtin.norm, builtin.mlp, builtin.kv_heads, builtin.bias) == (
        "rotary", "rmsnorm", "swiglu", 2, False)


@pytest.mark.parametrize("values, match", [
    (dict(n_head=4, n_kv_head=3), r"n_head \(4\) must be divisible by n_kv_head \(3\)"),
    (dict(mlp="geglu"), r"mlp must be one of \['gelu', 'swiglu', 'relu2'\]"),
    (dict(positions="alibi"), r"positions must be one of"),
    (dict(norm="rmsnorm", rms_norm_eps=0.0), r"rms_norm_eps must be"),
    (dict(positions="rotary", n_head=4, head_dim=5), r"even head size"),
    (dict(head_dim=-1), r"^head_dim must be a positive integer, got -1"),
])
def test_bad_options_are_one_line_config_errors(values, match):
    with pytest.raises(ConfigError, match=match) as e:
        TrainConfig(**values)
    # said in the keys as typed: no GPTConfig, nor its field head_size for the key head_dim
    assert "\n" not in str(e.value) and "GPTConfig" not in str(e.value) and "head_size" not in str(e.value)


def test_gpt2_checkpoints_without_the_new_keys_load_unchanged(tmp_path):
    model = make_tiny_gpt()
    save_checkpoint(tmp_path / "ck", model)
    cfg_file = tmp_path / "ck" / "config.json"
    import json
    doc = json.loads(cfg_file.read_text())
    doc["model"] = {k: doc["model"][k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                                                 "dropout", "bias", "layer_norm_epsilon")}
    cfg_file.write_text(json.dumps(doc))
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.config.is_gpt2 and loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))


@pytest.fixture
def corpus(tmp_path, shakespeare_path):
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare_path.read_text()[:30_000])
    return path


def run_config(tmp_path, corpus, options: dict, **kw) -> TrainConfig:
    names = {"head_size": "head_dim"}
    flat = {names.get(k, k): (0 if v is None else v) for k, v in options.items()}
    base = dict(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=2, n_head=2, n_embd=16, block_size=16,
                batch_size=4, max_iters=6, eval_interval=3, eval_iters=1, log_interval=1, warmup_iters=1,
                sample_tokens=4, dropout=0.1, num_threads=1, plot=False, tensorboard=False, peak_flops=1e12)
    return TrainConfig(**{**base, **flat, **kw})


@pytest.mark.parametrize("name", ["llama", "qwen3", "nanochat", "learned-rmsnorm-relu2"])
def test_options_train_save_resume_bit_exactly_and_generate(tmp_path, corpus, name):
    options = dict(COMBOS[name], head_size=16) if name == "qwen3" else COMBOS[name]
    full = train(run_config(tmp_path, corpus, options, out_dir=str(tmp_path / "full")), progress=False)
    cfg = run_config(tmp_path, corpus, options, out_dir=str(tmp_path / "part"))
    first = train(cfg, stop_at=3, progress=False)
    resumed = train(cfg, resume=tmp_path / "part" / "last", progress=False)
    assert first.losses + resumed.losses == full.losses
    a, b = load_checkpoint(tmp_path / "full" / "last"), load_checkpoint(tmp_path / "part" / "last")
    assert a.config == b.config and a.config.mlp == options["mlp"]
    assert a.model.state_dict().keys() == b.model.state_dict().keys()
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    tied = a.config.tie_word_embeddings
    assert (a.model.lm_head.weight is a.model.transformer.wte.weight) == tied
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_at_eos=False)
    cached = Engine(a.model, a.tokenizer).generate(["HAMLET:", "To be"], params)
    uncached = Engine(a.model, a.tokenizer, use_cache=False).generate(["HAMLET:", "To be"], params)
    assert [r.token_ids for r in cached] == [r.token_ids for r in uncached]


def test_resume_with_another_architecture_is_one_line(tmp_path, corpus):
    cfg = run_config(tmp_path, corpus, LLAMA, out_dir=str(tmp_path / "run"), max_iters=3, dropout=0.0)
    train(cfg, progress=False)
    for change, key in ((dict(mlp="relu2"), "mlp"), (dict(n_kv_head=2), "n_kv_head"),
                        (dict(positions="learned"), "positions"), (dict(tie_word_embeddings=False), "tie_word")):
        with pytest.raises(ConfigError, match=f"cannot resume .* with {key}") as e:
            train(cfg.replace(max_iters=6, **change), resume=tmp_path / "run" / "last", progress=False)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["qwen3", "nanochat"])
def test_the_forward_of_the_options_reads_no_tensor_value_with_checks_off(name):
    # rotary angles come from the position ids on their device: training, a padded forward and a decode
    # step stay free of host syncs, as GPT-2's
    from test_model import no_host_reads

    model = tiny(COMBOS[name])
    model.check_inputs = False
    idx = torch.randint(0, 257, (2, 8))
    with no_host_reads():
        _, loss = model.train()(idx, idx)
        loss.backward()
        with torch.no_grad():
            model.eval()(idx, attention_mask=torch.ones(2, 8, dtype=torch.long))
    cache = KVCache(model.config, 2, WINDOW)
    with torch.no_grad():
        model(idx, kv_cache=cache)
        with no_host_reads():
            step, _ = model(idx[:, -1:], position_ids=torch.full((2, 1), 8), kv_cache=cache)
    assert step.shape == (2, 1, 257)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_checkpoints_keep_the_options_and_an_untied_head(tmp_path, name):
    from simplegpt.checkpoint import describe_checkpoint

    model = tiny(COMBOS[name])
    save_checkpoint(tmp_path / "ck", model)
    info = describe_checkpoint(tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    assert info.config == loaded.config == model.config
    assert info.parameters == loaded.model.num_parameters() == model.num_parameters()
    assert (loaded.model.lm_head.weight is loaded.model.transformer.wte.weight) == model.config.tie_word_embeddings
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))


def test_resume_of_a_run_saved_before_the_options_refuses_them(tmp_path, corpus):
    # a train_config written before the Llama-style keys existed is GPT-2's: --mlp swiglu cannot resume it
    import json

    cfg = run_config(tmp_path, corpus, {}, out_dir=str(tmp_path / "run"), max_iters=3, dropout=0.0)
    train(cfg, progress=False)
    doc_file = tmp_path / "run" / "last" / "config.json"
    doc = json.loads(doc_file.read_text())
    doc["train_config"] = {k: v for k, v in doc["train_config"].items() if k not in (
        "n_kv_head", "head_dim", "positions", "rope_theta", "norm", "norm_gain", "rms_norm_eps", "mlp",
        "intermediate_size", "qk_norm", "tie_word_embeddings")}
    doc_file.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="cannot resume .* with mlp='swiglu': the checkpoint has mlp='gelu'"):
        train(cfg.replace(max_iters=6, mlp="swiglu"), resume=tmp_path / "run" / "last", progress=False)
    assert train(cfg.replace(max_iters=6), resume=tmp_path / "run" / "last", progress=False).step == 6


def _favouring_padded_ids(tok) -> GPT:
    """A model whose embedding has 43 rows past tok's ids, and which makes those ids the most likely
    at every position (the other ids all equally likely)."""
    model = make_tiny_gpt(vocab_size=tok.vocab_size + 43, n_positions=WINDOW, tie_word_embeddings=False).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # every position's final state is all ones
        model.lm_head.weight.fill_(-1.0)
        model.lm_head.weight[tok.vocab_size:] = 1.0  # the padded ids are the most likely
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_engine_never_draws_ids_past_the_tokenizer(temperature):
    # an imported model's embedding is often padded past its tokenizer (Qwen3: 151936 rows, 151669 tokens):
    # ids with no token are never drawn, even where the model favours them
    tok = get_tokenizer("byte")
    model = _favouring_padded_ids(tok)
    params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=1, stop_at_eos=False,
                            repetition_penalty=1.3)
    [r] = Engine(model, tok).generate(["hi"], params)
    assert len(r.token_ids) == 8 and max(r.token_ids) < tok.vocab_size


def test_scored_prompt_alternatives_leave_out_ids_past_the_tokenizer():
    # the server's echo logprobs: an alternative past the tokenizer (a padded embedding's row) has no text
    tok = get_tokenizer("byte")
    model = _favouring_padded_ids(tok)
    [(ids, scored)] = Engine(model, tok).score(["hello"], top=5)
    assert len(scored) == len(ids) - 1 and all(len(t.top) == 5 for t in scored)
    assert max(i for t in scored for i, _ in t.top) < tok.vocab_size
    # normalised over the tokenizer's ids, as generated tokens' logprobs are: here all equally likely
    assert all(t.logprob == pytest.approx(-math.log(tok.vocab_size)) for t in scored)


def test_cli_n_kv_head_not_dividing_n_head_is_one_line(tmp_path, capsys):
    from simplegpt.cli import main

    code = main(["train", "--n_head", "4", "--n_kv_head", "3", "--out_dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "n_head (4) must be divisible by n_kv_head (3)" in err and "GPTConfig" not in err
    assert not (tmp_path / "run").exists()


def test_cli_fine_tune_refuses_shape_options_its_weights_do_not_have(tmp_path, capsys):
    # a fine-tune trains its weights' shape: a shape option given with another value would go unused
    from simplegpt.cli import main

    (tmp_path / "c.txt").write_text("the cat sat on the mat. " * 200)
    save_checkpoint(tmp_path / "ck", tiny(QWEN3, n_positions=32), get_tokenizer("byte"))
    run = tmp_path / "run"
    common = ["train", "--init-from", str(tmp_path / "ck"), "--data", str(tmp_path / "c.txt"), "--data_dir",
              str(tmp_path / "data"), "--out_dir", str(run), "--quiet", "--max_iters", "1", "--eval_interval", "1",
              "--eval_iters", "1", "--batch_size", "2", "--block_size", "16", "--num_threads", "1",
              "--plot", "false", "--tensorboard", "false", "--sample_tokens", "0"]
    for option, value, has in [("--n_kv_head", "2", "the model has n_kv_head=1"),
                               ("--qk_norm", "false", "the model has qk_norm=True"),
                               ("--n_layer", "3", "the model has n_layer=2"),
                               ("--head_dim", "16", "the model has head_dim=24"),
                               ("--mlp", "gelu", "the model has mlp='swiglu'")]:
        code = main([*common, option, value])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"cannot fine-tune {tmp_path / 'ck'} with {option[2:]}=" in err and has in err, err
        assert not run.exists()
    # the model's own values (a whole config written out as options) pass, and block_size and dropout apply
    assert main([*common, "--n_layer", "2", "--n_kv_head", "1", "--head_dim", "24", "--qk_norm", "true",
                 "--mlp", "swiglu", "--dropout", "0.1"]) == 0
    ck = load_checkpoint(run / "last")
    assert ck.config.n_positions == 16 and ck.config.head_dim == 24 and ck.config.kv_heads == 1


def test_n_head_need_not_divide_n_embd_when_head_dim_is_set_as_the_help_says(capsys):
    from simplegpt.cli import main

    assert TrainConfig(n_head=5, n_embd=64, head_dim=16).model.head_dim == 16  # Qwen3-0.6B's shape is such
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "attention heads (must divide n_embd unless head_dim is set)" in help_text
