"""The continuous batcher (simplegpt.generation.scheduler): requests that join and leave a running
batch give what Engine.generate gives each of them alone."""

import threading

import pytest
import torch

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer
from simplegpt.accel import cpu
from simplegpt.engine import Engine, SamplingParams
from simplegpt.generation.backend import Backend, Batch
from simplegpt.generation.sampling import seeded_generator
from simplegpt.generation.scheduler import ContinuousBatcher


class Collector:
    """A request's pieces and its outcome, gathered from the batcher's thread."""

    def __init__(self, rows: int):
        self.pieces = [[] for _ in range(rows)]
        self.outcome = None
        self.done = threading.Event()

    def piece(self, row: int, text: str, tokens: int) -> None:
        self.pieces[row].append(text)

    def finish(self, outcome) -> None:
        self.outcome = outcome
        self.done.set()


def requests():
    """Varied requests: greedy and seeded, stop strings, penalties, logprobs, different lengths,
    several past the 24-token window (they slide), one with two prompts."""
    out = []
    for i in range(12):
        kw = dict(max_new_tokens=5 + 4 * i, seed=100 + i, temperature=0.0 if i % 3 == 0 else 0.9)
        if i % 4 == 1:
            kw.update(top_k=5, repetition_penalty=1.3)
        if i % 5 == 2:
            kw.update(logprobs=2)
        prompts = [f"prompt {i}" * (1 + i % 3)]
        if i == 7:
            prompts.append("second")
        out.append((prompts, SamplingParams(**kw)))
    return out


@pytest.fixture(params=["native", "eager"])
def engine(request):
    tok = get_tokenizer("byte")
    model = make_tiny_gpt(seed=1, scale=4.0, vocab_size=tok.vocab_size, n_positions=24)
    if request.param == "eager":
        with cpu.disabled():
            return Engine(model, tok)
    return Engine(model, tok)


@pytest.mark.filterwarnings("ignore:prompt of")
def test_concurrent_requests_equal_each_alone(engine):
    reqs = requests()
    alone = [engine.generate(prompts, params) for prompts, params in reqs]
    # a stop string from a greedy text: the request ends there, as alone
    stop = alone[3][0].text[4:6]
    reqs.append((reqs[3][0], SamplingParams(max_new_tokens=26, temperature=0.0, stop=[stop])))
    alone.append(engine.generate(*reqs[-1]))
    assert alone[-1][0].finish_reason == "stop"
    batcher = ContinuousBatcher(engine, max_batch=5, prefill_tokens=8)  # fewer rows than requests: a queue
    try:
        got = [Collector(len(p)) for p, _ in reqs]
        for (prompts, params), c in zip(reqs, got):
            batcher.submit(prompts, params, c.piece, c.finish)
        for c in got:
            assert c.done.wait(60)
    finally:
        batcher.stop(10)
    for want, c in zip(alone, got):
        assert [r.token_ids for r in c.outcome] == [r.token_ids for r in want]
        assert [r.text for r in c.outcome] == [r.text for r in want] == ["".join(p) for p in c.pieces]
        assert [r.finish_reason for r in c.outcome] == [r.finish_reason for r in want]
        if want[0].logprobs is not None:
            assert [t.logprob for t in c.outcome[0].logprobs] == pytest.approx([t.logprob for t in want[0].logprobs],
                                                                              abs=1e-5)


def test_prompts_queued_together_are_prefilled_in_one_pass_and_stream_their_first_tokens_after_it(engine, monkeypatch):
    """Three requests queued at once are prefilled together in one forward pass (not one pass each),
    each one's first piece comes right after that pass, before any decode step, and they still
    equal each alone."""
    params = SamplingParams(max_new_tokens=3, temperature=0.0, stop_at_eos=False)
    prompts = ["one", "two two", "three"]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    batcher = ContinuousBatcher(engine, max_batch=4)
    events = []
    model = batcher.fill.model
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda idx, *a, **kw: events.append(("prefill", idx.size(0)))
                        or real(idx, *a, **kw))
    real_step = batcher.batch.decode_step
    monkeypatch.setattr(batcher.batch, "decode_step", lambda last: events.append("step") or real_step(last))
    try:
        got = [Collector(1) for _ in prompts]
        with batcher.cond:  # the batcher's thread sees all three at once
            for p, c in zip(prompts, got):
                def piece(row, text, tokens, c=c, name=p):
                    events.append(name) if tokens == 1 else None
                    c.piece(row, text, tokens)
                batcher.submit([p], params, piece, c.finish)
        for c in got:
            assert c.done.wait(60)
    finally:
        batcher.stop(10)
    assert events[0] == ("prefill", 3) and sorted(events[1:4]) == sorted(prompts) and events[4] == "step"
    assert [c.outcome[0].token_ids for c in got] == alone


@pytest.fixture(params=["gpt2", "qwen3"])
def chunk_engine(request, engine):
    """The engine fixture's GPT-2 engines, and a Qwen3-style one on the kernels (rotary positions
    from a chunk's offset, grouped-query attention over the cached chunks)."""
    if request.param == "gpt2":
        return engine
    from test_llama import QWEN3

    tok = get_tokenizer("byte")
    return Engine(make_tiny_gpt(seed=1, scale=4.0, vocab_size=tok.vocab_size, n_positions=24, **QWEN3), tok)


def test_chunked_prefill_gives_what_one_pass_gives(chunk_engine):
    """Prompts longer than a chunk (and rows that slide past the window and are re-encoded in
    chunks) give the same greedy tokens whatever the chunk, and what each gives alone."""
    engine = chunk_engine
    params = SamplingParams(max_new_tokens=14, temperature=0.0, stop_at_eos=False)
    prompts = [[65 + (7 * i + k) % 50 for k in range(n)] for i, n in enumerate([21, 5, 13, 24, 9, 17])]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    for chunk in (3, 10, 10_000):
        batcher = ContinuousBatcher(engine, max_batch=3, prefill_tokens=chunk)  # a queue, and mixed groups
        try:
            got = [Collector(1) for _ in prompts]
            for p, c in zip(prompts, got):
                batcher.submit([p], params, c.piece, c.finish)
            for c in got:
                assert c.done.wait(60)
        finally:
            batcher.stop(10)
        assert [c.outcome[0].token_ids for c in got] == alone, f"prefill_tokens={chunk}"


def test_a_long_prompts_prefill_holds_the_running_rows_back_one_chunk_at_a_time(engine, monkeypatch):
    """A 20-token prompt arriving while a row decodes is prefilled 4 token positions at a time
    (prefill_tokens=4), with a decode step of the running row between every two chunks: the running
    row waits for one chunk a step, not for the whole prompt. Steps are counted, not timed."""
    batcher = ContinuousBatcher(engine, max_batch=4, prefill_tokens=4)
    events = []
    model = engine.backend.model  # the view every batch of this engine runs
    real = model.hidden_states

    def hidden_states(idx, *args, kv_cache=None, **kw):
        if kv_cache is not batcher.batch.cache:  # a prefill (the eager decode step runs it too)
            events.append(("prefill", idx.numel()))
        return real(idx, *args, kv_cache=kv_cache, **kw)

    monkeypatch.setattr(model, "hidden_states", hidden_states)
    real_step = batcher.batch.decode_step
    monkeypatch.setattr(batcher.batch, "decode_step", lambda last: events.append(("step", len(last))) or real_step(last))
    run_params = SamplingParams(max_new_tokens=20, temperature=0.0, stop_at_eos=False)  # stays in the window
    long_prompt, long_params = [66 + k % 40 for k in range(20)], SamplingParams(max_new_tokens=3, temperature=0.0)
    running, long = Collector(1), Collector(1)

    def running_piece(row, text, tokens):
        running.piece(row, text, tokens)
        if tokens >= 2 and "long submitted" not in events:  # on the batcher's thread: its next iteration sees it
            events.append("long submitted")
            batcher.submit([long_prompt], long_params, long.piece, long.finish)

    try:
        batcher.submit(["A"], run_params, running_piece, running.finish)
        assert running.done.wait(60) and long.done.wait(60)
    finally:
        batcher.stop(10)
    after = events[events.index("long submitted") + 1:]
    chunks = [n for kind, n in (e for e in after if e[0] == "prefill")]
    assert sum(chunks) == 20 and max(chunks) <= 4 and len(chunks) == 5
    kinds = [e[0] for e in after]
    firsts = [k for k, e in enumerate(kinds) if e == "prefill"]
    assert all("step" in kinds[a:b] for a, b in zip(firsts, firsts[1:]))  # the running row decodes between chunks
    assert running.outcome[0].token_ids == engine.generate(["A"], run_params)[0].token_ids
    assert long.outcome[0].token_ids == engine.generate([long_prompt], long_params)[0].token_ids


def test_a_cancelled_request_leaves_and_its_slot_is_reused(engine):
    batcher = ContinuousBatcher(engine, max_batch=1)  # one row: the next request waits for its slot
    try:
        endless = Collector(1)
        ticket = batcher.submit(["A"], SamplingParams(max_new_tokens=1_000_000, stop_at_eos=False, seed=1),
                                endless.piece, endless.finish)
        params = SamplingParams(max_new_tokens=20, temperature=0.0)
        waiting = Collector(1)
        batcher.submit(["B"], params, waiting.piece, waiting.finish)
        assert not waiting.done.wait(0.5) and batcher.active_rows == 1
        ticket.cancel()
        assert endless.done.wait(30) and endless.outcome is None  # cancelled: no results
        assert waiting.done.wait(30)
        assert waiting.outcome[0].token_ids == engine.generate(["B"], params)[0].token_ids
        assert batcher.active_rows == 0 and batcher.queued_rows == 0
    finally:
        batcher.stop(10)


def test_bad_prompts_are_refused_at_submit(engine):
    batcher = ContinuousBatcher(engine)
    try:
        with pytest.raises(ValueError, match="out of range"):
            batcher.submit([[65, 9999]], SamplingParams(), lambda *a: None, lambda *a: None)
        assert batcher.queued_rows == 0
    finally:
        batcher.stop(10)


def test_the_servers_scoring_passes_the_queue_limit_the_deadline_and_the_client_check():
    """simplegpt.serve.scheduler.Scheduler.score, as /v1/completions runs echo with max_tokens 0: beyond
    --max-queue it is a 429; while it waits behind a busy batcher its deadline passes (RequestTimeout)
    or its client leaves (None), and then the engine never scores it."""
    pytest.importorskip("fastapi")
    import asyncio

    from simplegpt.serve.errors import APIError
    from simplegpt.serve.scheduler import RequestTimeout, Scheduler

    tok = get_tokenizer("byte")
    engine = Engine(make_tiny_gpt(seed=1, vocab_size=tok.vocab_size, n_positions=24), tok)
    scored = []
    engine_score = engine.score
    engine.score = lambda prompts, top=0: scored.append(len(prompts)) or engine_score(prompts, top)
    timeout = 3.0  # seconds: long enough for a loaded machine's first scoring
    scheduler = Scheduler(engine, max_batch=2, max_queue=4, timeout=timeout)
    busy = threading.Event()

    def hold() -> None:  # the batcher's thread stays busy until released
        busy.wait(30)

    async def never_gone() -> bool:
        return False

    async def gone() -> bool:
        return True

    async def main() -> None:
        assert await scheduler.score([[1, 2, 3]] * 4, 1, never_gone) is not None  # 4 rows fit
        with pytest.raises(APIError) as e:
            await scheduler.score([[1, 2, 3]] * 5, 1, never_gone)
        assert e.value.status == 429 and scored == [4]
        scheduler.batcher.call(hold, lambda _: None)
        late = asyncio.ensure_future(scheduler.score([[1, 2]] * 3, 0, never_gone))
        await asyncio.sleep(0)
        assert scheduler.queued == 3  # scoring rows wait in the queue, and count against it
        with pytest.raises(APIError) as e:
            await scheduler.score([[1, 2]] * 2, 0, never_gone)
        assert e.value.status == 429
        start = asyncio.get_running_loop().time()
        with pytest.raises(RequestTimeout):
            await late
        assert asyncio.get_running_loop().time() - start < timeout + 5  # not held until the batcher is free
        assert await scheduler.score([[1, 2]], 0, gone) is None
        busy.set()
        while scheduler.queued:  # the cancelled jobs run (as nothing) and leave the queue
            await asyncio.sleep(0.01)
        assert scored == [4]  # neither was scored
        assert await scheduler.score([[1, 2]] * 4, 0, never_gone) is not None

    try:
        asyncio.run(main())
    finally:
        busy.set()
        scheduler.close(timeout=10)
class Poisoned(Exception):
    pass


def test_a_failing_request_ends_alone_and_the_batch_goes_on(engine):
    """A request whose decoding raises (here its own piece callback) ends with
    that error; a long request beside it gives what it gives alone, and the batcher serves the next."""
    long_params = SamplingParams(max_new_tokens=60, seed=3, stop_at_eos=False)
    alone = engine.generate(["a long one"], long_params)[0]
    batcher = ContinuousBatcher(engine, max_batch=3)  # the third request waits in the queue
    try:
        long = Collector(1)
        batcher.submit(["a long one"], long_params, long.piece, long.finish)

        def bad_piece(row, text, tokens):
            raise Poisoned("a request's own failure")

        bad = Collector(2)
        batcher.submit(["x", "yz"], SamplingParams(max_new_tokens=50, seed=1), bad_piece, bad.finish)
        queued = Collector(1)  # submitted behind the failing one (queued while it runs, when it is slow enough)
        next_params = SamplingParams(max_new_tokens=5, temperature=0.0)
        batcher.submit(["next"], next_params, queued.piece, queued.finish)
        assert bad.done.wait(30) and isinstance(bad.outcome, Poisoned)
        assert long.done.wait(60) and queued.done.wait(60)
        assert long.outcome[0].token_ids == alone.token_ids and long.outcome[0].text == alone.text
        assert queued.outcome[0].token_ids == engine.generate(["next"], next_params)[0].token_ids
        assert batcher.active_rows == 0 and batcher.queued_rows == 0
    finally:
        batcher.stop(10)


class PinnedBatch(Batch):
    """A batch whose rows must stay in place (as a compiled backend's static batches)."""


class PinnedBackend(Backend):
    """The eager backend under another name, whose batches keep their rows in place."""

    name = "pinned"
    movable_rows = False

    def new_batch(self, batch_size: int) -> PinnedBatch:
        return PinnedBatch(self, batch_size)


def test_a_backend_whose_batches_keep_their_rows_in_place_runs_through_the_plain_batch():
    """The batcher asks the backend (movable_rows), not its name: rows come and go here, so such a
    backend's steps run through the plain Batch, and each request still gives what it gives alone."""
    tok = get_tokenizer("byte")
    model = make_tiny_gpt(seed=1, scale=4.0, vocab_size=tok.vocab_size, n_positions=24)
    with cpu.disabled():
        engine = Engine(model, tok)
    b = engine.backend
    engine.backend = PinnedBackend(b.model, b.device, b.window, b.window_shift, b.use_cache)
    compiled = Engine(model, tok, compile=True)  # never compiles here: the batcher runs it eagerly
    for e in (engine, compiled):
        assert not e.backend.movable_rows
        batcher = ContinuousBatcher(e, max_batch=4)
        try:
            assert type(batcher.batch) is Batch and type(batcher.fill) is Batch
            params = SamplingParams(max_new_tokens=30, seed=3, temperature=0.9)
            got = Collector(2)
            batcher.submit(["ROMEO:", "JULIET:"], params, got.piece, got.finish)
            assert got.done.wait(60)
        finally:
            batcher.stop(10)
        alone = engine.generate(["ROMEO:", "JULIET:"], params)
        assert [r.token_ids for r in got.outcome] == [r.token_ids for r in alone]


@pytest.mark.filterwarnings("ignore:prompt of")
def test_a_streams_rows_are_the_prompts_checked_cut_and_seeded(engine):
    """Stream.rows, which the batcher takes its rows from: one per prompt, cut to the window, row i
    drawing from seed + i."""
    stream = engine.stream_batch(["x" * 30, [65, 66]], SamplingParams(seed=7))
    rows = stream.rows
    stream.close()
    assert [r.tokens for r in rows] == [list(b"x" * 24), [65, 66]] and [r.prompt_len for r in rows] == [24, 2]
    assert all(torch.equal(r.generator.get_state(), seeded_generator(7 + i).get_state()) for i, r in enumerate(rows))
