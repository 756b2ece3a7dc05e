"""The generation engine: KV cache == reference, batching, streaming, stops, sampling, bad input."""

import contextlib
import itertools
import math

import pytest
import torch

from simplegpt import GPT, generate_text, get_tokenizer, save_checkpoint
from simplegpt.accel import cpu
from simplegpt.generation.sampling import MIN_TEMPERATURE
from simplegpt.engine import (Engine, KVCache, SamplingParams, apply_repetition_penalty, generate_ids,
                              sample_next_token, sampling_probs, use_gemv_layout)
from simplegpt.quantize import Int8Linear, quantize_int8
from simplegpt.views import module_view

from conftest import make_tiny_gpt

WINDOW = 16


def tiny(vocab_size=257, n_positions=WINDOW, seed=0, scale=8.0) -> GPT:
    """The suite's tiny model (conftest.make_tiny_gpt), in eval mode. With GPT-2's init an untrained
    model with tied embeddings just repeats its last token, so greedy tests could not tell contexts
    apart; 8x larger weights make its output depend on the whole context (positions included)."""
    return make_tiny_gpt(seed, scale, vocab_size=vocab_size, n_positions=n_positions).eval()


def reference_greedy(model: GPT, prompt: list[int], n: int, shift: int) -> list[int]:
    """Independent uncached loop: full forward over the context; when it outgrows the window,
    its oldest `shift` tokens are dropped (the engine's documented sliding-window rule)."""
    tokens, start, out = list(prompt), 0, []
    for _ in range(n):
        if len(tokens) - start > model.config.n_positions:
            start += shift
        with torch.no_grad():
            logits, _ = model(torch.tensor([tokens[start:]]))
        out.append(int(logits[0, -1].argmax()))
        tokens.append(out[-1])
    return out


GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, stop_at_eos=False)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [3], list(range(40, 55))]


@pytest.mark.parametrize("shift", [1, 5, None])
def test_cached_greedy_equals_uncached_reference_past_the_window(shift):
    model = tiny()
    engine = Engine(model, window_shift=shift)
    expected = [reference_greedy(model, p, 40, engine.window_shift) for p in PROMPTS]
    single = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    batched = [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]
    assert single == expected
    assert batched == expected
    uncached = Engine(model, use_cache=False, window_shift=shift)
    assert [r.token_ids for r in uncached.generate(PROMPTS, GREEDY)] == expected


def test_cached_forward_matches_full_forward_logits():
    model = tiny(n_positions=32)
    idx = torch.randint(0, 257, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # row 1 is left-padded
    with torch.no_grad():
        full, _ = model(idx, attention_mask=mask)
        cache = KVCache(model.config, batch_size=2)
        parts = [model(idx[:, :5], attention_mask=mask[:, :5], kv_cache=cache)[0]]
        for t in range(5, 12):
            parts.append(model(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache)[0])
    assert cache.length == 12
    real = mask.bool()
    assert torch.allclose(torch.cat(parts, 1)[real], full[real], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # several new tokens after cached ones need (and get) a causal mask
        cache.reset()
        a, _ = model(idx[:1, :5], kv_cache=cache)
        b, _ = model(idx[:1, 5:], kv_cache=cache)
        ref, _ = model(idx[:1])
    assert torch.allclose(torch.cat([a, b], 1), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="KV cache overflow"), torch.no_grad():
        model(idx[:1, :10], kv_cache=KVCache(model.config, batch_size=1, max_len=8))


def test_batched_sampling_equals_one_by_one():
    model = tiny()
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_at_eos=False)
    batched = Engine(model).generate(PROMPTS, params)
    for i, p in enumerate(PROMPTS):
        alone = Engine(model).generate([p], SamplingParams(**{**params.__dict__, "seed": 7 + i}))[0]
        assert batched[i].token_ids == alone.token_ids


def test_interleaved_streams_of_one_engine_do_not_interfere():
    tok = get_tokenizer("byte")
    engine = Engine(tiny(), tok)
    params = SamplingParams(max_new_tokens=30, temperature=0.0, stop_at_eos=False)
    alone = [engine.generate([p], params)[0].text for p in ("ab", "hello world")]
    s1, s2 = engine.stream("ab", params), engine.stream("hello world", params)
    pieces1, pieces2 = [], []
    for a, b in zip(s1, s2):
        pieces1.append(a)
        pieces2.append(b)
    pieces1 += list(s1)
    pieces2 += list(s2)
    assert ["".join(pieces1), "".join(pieces2)] == alone


def test_seeds_reproduce_and_differ():
    engine = Engine(tiny())
    run = lambda seed: engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=30, seed=seed))[0].token_ids
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_equals_greedy():
    engine = Engine(tiny())
    greedy = engine.generate(PROMPTS, GREEDY)
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=40, temperature=1.5, top_k=1, seed=3,
                                                   stop_at_eos=False))
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.25, 0.2]])
    logits = probs.log()
    # Cumulative mass in rank order: 0.4, 0.65, 0.85, 0.95, 1.0 (p values stay off the float boundaries).
    for p, kept in [(0.1, {1}), (0.399, {1}), (0.401, {1, 3}), (0.649, {1, 3}), (0.651, {1, 3, 4}),
                    (0.849, {1, 3, 4}), (0.851, {1, 2, 3, 4}), (0.96, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        out = sampling_probs(logits, SamplingParams(top_p=p))
        assert set(out[0].nonzero().flatten().tolist()) == kept, p
        assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-6)
        assert torch.allclose(out[0, sorted(kept)], probs[0, sorted(kept)] / probs[0, sorted(kept)].sum())


def kept_by_top_p(probs: list[float], p: float, temperature: float = 1.0) -> list[int]:
    logits = torch.tensor([probs], dtype=torch.float64).log().float()
    out = sampling_probs(logits, SamplingParams(top_p=p, temperature=temperature))
    assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-6)
    return out[0].nonzero().flatten().tolist()


@pytest.mark.parametrize("probs, p, kept", [
    ([0.3, 0.1, 0.1, 0.5], 0.8, [0, 3]),          # issue 16: a running sum minus its own token kept 3
    ([0.7, 0.2, 0.1], 0.9, [0, 1]),
    ([0.7, 0.2, 0.1], 0.7, [0]),
    ([0.5, 0.25, 0.125, 0.125], 0.75, [0, 1]),
    ([0.5, 0.25, 0.125, 0.125], 0.875, [0, 1, 2]),
    ([0.05, 0.15, 0.6, 0.2], 0.95, [1, 2, 3]),
    ([0.1] * 10, 0.3, [0, 1, 2]),                 # ties: the lower token ids stay, and no more than needed
    ([0.1] * 10, 0.7, [0, 1, 2, 3, 4, 5, 6]),
    ([0.4, 0.2, 0.2, 0.2], 0.6, [0, 1]),
    ([0.2, 0.2, 0.4, 0.2], 0.8, [0, 1, 2]),
    ([0.25] * 4, 0.5, [0, 1]),
])
def test_top_p_at_exact_boundaries_keeps_the_smallest_set(probs, p, kept):
    """The kept tokens' mass is exactly p: that set reaches p, so no further token joins it."""
    assert kept_by_top_p(probs, p) == kept
    assert kept_by_top_p(probs, p + 1e-4) == sorted(kept + [next(i for i in sorted(
        range(len(probs)), key=lambda i: -probs[i]) if i not in kept)])


def test_top_p_at_exact_boundaries_of_random_distributions():
    """Integer weights w / W: for every k, top_p = (mass of the k most likely) keeps exactly those k
    (ties broken toward the lower id), at a temperature that changes the logits, too."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        weights = torch.randint(1, 12, (int(torch.randint(2, 40, (1,), generator=gen)),), generator=gen).tolist()
        total = sum(weights)
        order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
        for k in range(1, len(weights)):
            p = sum(weights[i] for i in order[:k]) / total
            assert kept_by_top_p([w / total for w in weights], p) == sorted(order[:k]), (weights, k)
            hot = [w ** 0.5 for w in weights]  # the distribution that temperature 2 makes of w
            hot_p = sum(hot[i] for i in order[:k]) / sum(hot)
            assert kept_by_top_p([w / total for w in weights], hot_p, temperature=2.0) == sorted(order[:k])


def test_top_p_keeps_the_most_likely_token_for_any_p():
    assert kept_by_top_p([0.2, 0.5, 0.3], 1e-9) == [1]
    assert kept_by_top_p([0.5, 0.5], 1e-9) == [0]


def test_min_p_top_k_temperature_and_repetition_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)
    min_p = sampling_probs(logits, SamplingParams(min_p=0.3))
    assert (min_p[0] > 0).tolist() == (probs[0] >= 0.3 * probs[0].max()).tolist()
    assert (sampling_probs(logits, SamplingParams(top_k=2))[0] > 0).tolist() == [True, True, False, False]
    hot = sampling_probs(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(hot, torch.softmax(logits / 2, -1))
    seen = torch.tensor([[True, False, False, True]])
    assert apply_repetition_penalty(logits, 2.0, seen).tolist() == [[1.0, 1.0, 0.0, -2.0]]
    assert sample_next_token(logits, SamplingParams(temperature=0, repetition_penalty=3.0), seen=seen).item() == 1


EXTREMES = [5e-324, 1e-45, 1e-40, 1e-38, 1e-30, 1e-6, 9.99e-6, 1e-5, 0.01, 1.0, 2.0, 1e30, 1e308]


@pytest.mark.parametrize("temperature", EXTREMES)
def test_sampling_is_a_distribution_for_every_accepted_value(temperature):
    """Every temperature and repetition penalty SamplingParams accepts (subnormal to 1e308), with the
    filters at their extremes: probabilities without NaN that sum to 1, and a token drawn. A temperature
    of 1e-38 used to overflow logits / temperature, and the softmax gave NaN."""
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(2, 40, generator=g) * 30, torch.full((1, 40), -5.0), torch.full((1, 40), 7.0)])
    logits[0, :3] = 1e4  # a tie at the top, far above the rest
    seen = torch.rand(4, 40, generator=g) < 0.5
    seen[2:] = True  # every token seen: all-negative and all-positive rows penalized whole
    for penalty, extra in itertools.product([5e-324, 1e-40, 0.5, 1.0, 3.0, 1e30, 1e308],
                                            [{}, dict(top_k=1), dict(top_k=39), dict(top_p=5e-324), dict(top_p=0.999),
                                             dict(min_p=0.999999), dict(min_p=1e-300)]):
        params = SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=1, **extra)
        probs = sampling_probs(logits, params, seen)
        assert torch.isfinite(probs).all() and (probs >= 0).all(), (params, probs)
        assert torch.allclose(probs.sum(-1), torch.ones(4)), params
        drawn = sample_next_token(logits, params, [torch.Generator().manual_seed(i) for i in range(4)], seen)
        assert (probs.gather(-1, drawn.view(-1, 1)) > 0).all()


@pytest.mark.parametrize("temperature", [5e-324, 1e-45, 1e-38, 9.99e-6])
def test_a_temperature_below_the_threshold_is_greedy(temperature):
    assert MIN_TEMPERATURE == 1e-5
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    assert sample_next_token(logits, params).tolist() == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy


def scripted_model(tokenizer, script: list[int]) -> GPT:
    """A model whose logits ignore the input: script[0] highest, then script[1], ... all others far lower.
    Greedy decoding with a strong repetition penalty then emits exactly `script` in order."""
    model = tiny(vocab_size=tokenizer.vocab_size, n_positions=64)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0  # every final hidden state is e_0: logits = wte[:, 0]
        model.transformer.wte.weight[:, 0] = -10.0
        for i, t in enumerate(script):
            model.transformer.wte.weight[t, 0] = 10.0 - 0.1 * i
    return model


MULTIBYTE = "naïve café 世界 🙂 ok"


def scripted_params(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, repetition_penalty=1000.0, stop_at_eos=False, **kw)


def test_stream_concatenation_equals_text_with_split_multibyte_characters():
    tok = get_tokenizer("gpt2")
    script = tok.encode(MULTIBYTE)
    # The GPT-2 tokens split characters, so decoding token by token would break them.
    assert any("\ufffd" in tok.decode([t]) for t in script)
    engine = Engine(scripted_model(tok, script), tok)
    stream = engine.stream("x", scripted_params(len(script)))
    pieces = list(stream)
    assert stream.result.token_ids == script
    assert "".join(pieces) == stream.result.text == MULTIBYTE
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3
    [full] = engine.generate(["x"], scripted_params(len(script)))
    assert full.text == MULTIBYTE and full.finish_reason == "length"


def test_stream_concatenation_equals_decode_for_random_tokens():
    tok = get_tokenizer("gpt2")
    engine = Engine(tiny(vocab_size=tok.vocab_size, n_positions=32), tok)
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=5, stop_at_eos=False)
    stream = engine.stream("Hello", params)
    text = "".join(stream)
    assert text == stream.result.text == tok.decode(stream.result.token_ids)
    assert engine.generate(["Hello"], params)[0].text == text


def test_stop_string_ends_generation_and_is_not_returned():
    tok = get_tokenizer("gpt2")
    script = tok.encode(MULTIBYTE)
    engine = Engine(scripted_model(tok, script), tok)
    for stop, before in [("界", "naïve café 世"), (" 🙂", "naïve café 世界"), ("café", "naïve ")]:
        params = scripted_params(len(script), stop=["never", stop])
        [r] = engine.generate(["x"], params)
        assert (r.text, r.finish_reason, r.stop_reason) == (before, "stop", stop)
        stream = engine.stream("x", params)
        assert "".join(stream) == before
        assert stream.result.finish_reason == "stop"
    [r] = engine.generate(["x"], scripted_params(5, stop="never"))
    assert r.finish_reason == "length" and len(r.token_ids) == 5


def test_eos_ends_generation_with_stop_reason():
    model, tok = tiny(), get_tokenizer("byte")
    free = Engine(model, tok).generate([[1, 2, 3]], GREEDY)[0].token_ids
    eos = free[6]
    first = free.index(eos)
    [r] = Engine(model, tok, eos_id=eos).generate([[1, 2, 3]], SamplingParams(max_new_tokens=40, temperature=0))
    assert (r.token_ids, r.finish_reason, r.stop_reason) == (free[:first], "stop", eos)
    assert generate_ids(model, [1, 2, 3], 40, eos_id=eos) == free[:first + 1]
    [ignored] = Engine(model, tok, eos_id=eos).generate([[1, 2, 3]], GREEDY)
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_empty_prompt_starts_from_eos_or_fails_clearly():
    model, tok = tiny(), get_tokenizer("byte")
    [r] = Engine(model, tok).generate([""], GREEDY)
    assert r.token_ids == reference_greedy(model, [tok.eos_id], 40, Engine(model).window_shift)
    with pytest.raises(ValueError, match="prompt is empty"):
        Engine(model).generate([[]], GREEDY)


def test_long_prompt_is_truncated_from_the_left_with_a_warning():
    model = tiny()
    prompt = list(range(1, 41))
    with pytest.warns(UserWarning, match="keeping its last 16 tokens"):
        [r] = Engine(model).generate([prompt], GREEDY)
    assert r.prompt_tokens == WINDOW
    assert r.token_ids == reference_greedy(model, prompt[-WINDOW:], 40, Engine(model).window_shift)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-1), "top_k"), (dict(min_p=1.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(stop=[""]), "stop"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=21), "logprobs"), (dict(logprobs=True), "logprobs"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_generate_text_uses_engine_and_survives_past_window():
    tok = get_tokenizer("byte")
    model = tiny()
    out = generate_text(model, tok, "Once upon a time", max_length=40, device="cpu")
    ids = tok.encode("Once upon a time")
    expected = reference_greedy(model, ids, 40, Engine(model).window_shift)
    if tok.eos_id in expected:
        expected = expected[:expected.index(tok.eos_id)]
    assert out == tok.decode(ids + expected)


def test_int8_quantization_is_close_to_fp32():
    model = tiny(n_positions=64, scale=1.0)  # GPT-2's init: the weight scale of a trained model
    ref = tiny(n_positions=64, scale=1.0)
    report = quantize_int8(model)
    assert report.layers == 2 * 4 + 1 and 3.0 < report.ratio <= 4.0
    idx = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        a, _ = ref(idx)
        b, _ = model(idx)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    [r] = Engine(model).generate([[1, 2, 3]], GREEDY)
    assert len(r.token_ids) == 40


@pytest.mark.parametrize("kernels", [True, False], ids=["native", "SIMPLEGPT_NATIVE=0"])
def test_int8_batch_decodes_each_prompt_as_alone(kernels):
    # each activation row is rounded to int8 with its own scale, so a row's output does not depend on the
    # rows beside it (one scale for the whole batch's activations made a batch's tokens differ from alone's)
    if kernels and not cpu.enabled():
        pytest.skip(f"the CPU kernels are off: {cpu.unavailable_reason()}")
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [3], list(range(40, 55)), [200] * 9]
    torch.set_num_threads(1)  # PyTorch's small int8 ops on 2 threads of a busy 2-core machine wait for each other
    with contextlib.nullcontext() if kernels else cpu.disabled():
        model = tiny(n_positions=64)  # room for every prompt and its tokens: no window slides
        quantize_int8(model)
        engine = Engine(model)
        assert (engine.backend.name == "native") == kernels
        for params in (SamplingParams(max_new_tokens=30, temperature=0.0, stop_at_eos=False),
                       SamplingParams(max_new_tokens=30, temperature=1.0, top_k=50, seed=7, stop_at_eos=False)):
            batched = engine.generate(prompts, params)
            for i, p in enumerate(prompts):
                alone = engine.generate([p], SamplingParams(**{**params.__dict__, "seed": 7 + i}))[0]
                assert batched[i].token_ids == alone.token_ids, (params, i)


def test_int8_linear_rounds_each_row_with_its_own_scale():
    # rows 1e-3 to 1e3 in scale: each row's output equals the row's alone (bit for bit) and is as close to
    # the float product as 8 bits allow; in the native decode step's kernel too
    from simplegpt.generation.native import NativeInt8Linear, decode_step

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(40, 64) * torch.logspace(-3, 3, 40)[:, None]  # (40, 64): more rows than the kernel's 16
    want = linear(x).detach()
    layers = [Int8Linear(linear)]
    if cpu.enabled():  # the native backend's view of the layer
        layers.append(module_view(layers[0], lambda m: NativeInt8Linear))
    for layer in layers:
        with torch.no_grad(), decode_step():  # NativeInt8Linear's kernel runs in decode steps
            got = layer(x)
            assert all(torch.equal(layer(x[i:i + 1]), got[i:i + 1]) for i in range(len(x)))
            assert torch.equal(layer(x.view(2, 20, 64)).view(40, -1), got)
        error = (got - want).abs().amax(dim=1) / want.abs().amax(dim=1)  # each row's, against its own scale
        assert error.max() < 0.05, (type(layer).__name__, error.max())


def test_gemv_layout_changes_memory_layout_only(tmp_path):
    model, plain = tiny(), tiny()
    use_gemv_layout(model)
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert not fc.is_contiguous() and fc.t().is_contiguous()  # stored (in, out)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    idx = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], plain(idx)[0], atol=1e-5)
    checkpoint = save_checkpoint(tmp_path / "plain", plain)
    with cpu.disabled():  # the layout is the fallback of the native kernel
        owned = Engine.from_checkpoint(checkpoint)  # the engine applies the layout to a CPU model it loaded
    assert owned.model.transformer.h[0].mlp.c_fc.weight.t().is_contiguous()
    # Still trainable: a step moves the weights and keeps the tie.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = fc.detach().clone()
    model(idx, targets=idx)[1].backward()
    opt.step()
    assert not torch.equal(before, fc) and model.lm_head.weight is model.transformer.wte.weight


def test_logprobs_are_the_models_log_softmax_at_each_generated_token():
    """With logprobs=k every generated token carries its log-probability under the model's raw
    logits (teacher-forced forward of prompt + output) and the k most likely tokens, in order; a
    sampled batch carries them per row; without logprobs there are none."""
    model = tiny()
    engine = Engine(model)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9]]
    params = SamplingParams(max_new_tokens=12, temperature=1.3, top_k=50, seed=4, stop_at_eos=False, logprobs=3)
    results = engine.generate(prompts, params)
    for prompt, r in zip(prompts, results):
        assert [t.token_id for t in r.logprobs] == r.token_ids
        with torch.no_grad():
            logits, _ = model(torch.tensor([prompt + r.token_ids[:-1]]))
        lp = torch.log_softmax(logits[0, len(prompt) - 1:], dim=-1)  # (12, V): the step that drew each token
        want = lp.gather(-1, torch.tensor(r.token_ids).view(-1, 1)).view(-1)
        assert torch.allclose(torch.tensor([t.logprob for t in r.logprobs]), want, atol=1e-4)
        top_v, top_i = lp.topk(3, dim=-1)
        assert [[i for i, _ in t.top] for t in r.logprobs] == top_i.tolist()
        assert torch.allclose(torch.tensor([[v for _, v in t.top] for t in r.logprobs]), top_v, atol=1e-4)
    # the same tokens as without logprobs (they are only reported)
    assert [r.token_ids for r in engine.generate(prompts, SamplingParams(
        max_new_tokens=12, temperature=1.3, top_k=50, seed=4, stop_at_eos=False))] == [r.token_ids for r in results]
    assert engine.generate([[1]], SamplingParams(max_new_tokens=2))[0].logprobs is None
    [zero] = engine.generate([[1]], SamplingParams(max_new_tokens=2, logprobs=0))
    assert len(zero.logprobs) == 2 and all(t.top == [] for t in zero.logprobs)


def test_score_is_the_teacher_forced_log_likelihood_of_each_prompt():
    model = tiny()
    engine = Engine(model)
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    scored = engine.score(prompts, top=2)
    for prompt, (ids, lps) in zip(prompts, scored):
        assert ids == prompt and [t.token_id for t in lps] == prompt[1:]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt]))[0][0, :-1], dim=-1)
        want = lp.gather(-1, torch.tensor(prompt[1:]).view(-1, 1)).view(-1)
        assert torch.allclose(torch.tensor([t.logprob for t in lps]), want, atol=1e-4)
        assert [[i for i, _ in t.top] for t in lps] == lp.topk(2, dim=-1).indices.tolist()
    # a generated continuation scores as generation reported it
    r = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=6, temperature=0.0, stop_at_eos=False,
                                                    logprobs=0))[0]
    [(_, lps)] = engine.score([[1, 2, 3] + r.token_ids])
    assert [t.logprob for t in lps[2:]] == pytest.approx([t.logprob for t in r.logprobs], abs=1e-4)
    with pytest.raises(ValueError, match="top"):
        engine.score([[1, 2]], top=21)


def test_from_checkpoint_loads_owns_and_prepares_its_model(tmp_path):
    tok = get_tokenizer("byte")
    model = tiny(n_positions=64, scale=1.0)
    checkpoint = save_checkpoint(tmp_path / "ck", model, tok)
    engine = Engine.from_checkpoint(checkpoint, device="cpu")
    assert engine.tokenizer is not None and engine.quant_report is None and engine.model is not model
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    assert engine.generate(["ab"], params)[0].token_ids == Engine(model, tok).generate(["ab"], params)[0].token_ids
    int8 = Engine.from_checkpoint(checkpoint, quantize="int8")  # auto device: the CPU for int8
    assert int8.device.type == "cpu" and int8.quant_report.layers == 2 * 4 + 1
    assert len(int8.generate(["ab"], params)[0].token_ids) == 12
    with pytest.raises(ValueError, match="quantize"):
        Engine.from_checkpoint(checkpoint, quantize="int4")
    with pytest.raises(ValueError, match="does not support int8"):
        Engine.from_checkpoint(checkpoint, quantize="int8", compile=True)
