"""Continuous batching: one thread owns an Engine and runs decode steps over every active request.

    batcher = ContinuousBatcher(engine, max_batch=16)
    ticket = batcher.submit(["Once upon a time"], SamplingParams(max_new_tokens=50),
                            on_piece=lambda row, piece, tokens: ..., on_done=lambda results_or_error: ...)
    ticket.cancel()  # leaves at the next step; its slot is reused

A request (a Ticket: one or more prompts sharing SamplingParams) waits in a queue until the batch
has room, is prefilled (below) and joins the running batch; a finished or cancelled row leaves at
once; a request whose sampling or callbacks raise ends with that error alone (on_done(error)), and
a prefill chunk that raises ends the requests it was encoding, while the others go on. Each row keeps its own parameters,
generator, stop strings, max_new_tokens and logprobs, so a request gives what Engine.generate gives
for it alone.

The cache is one KVCache of max_batch rows over a shared timeline (the slot `cache.length` that
every row's next token is written to). A row's cached tokens are the `cached[j]` slots just
before it, right-aligned; the slots before them are padding (mask 0), which the attention skips.
When the timeline reaches the window every row is moved to the right of a shorter one
(`_repack`: a copy, the numbers unchanged).

New rows are prefilled in chunks between decode steps (`Filling`): the rows waiting when no
prefill is under way are encoded together, in a KVCache of their own, each from slot 0 (no
padding: positions as alone), at most `prefill_tokens` token positions of all of them between
two decode steps. So a long prompt holds the running rows back by one chunk a step, not by its
whole prefill, and a burst of short prompts is one batched forward pass instead of one pass each.
A row whose prompt ends in a chunk joins the running batch at once (its keys and values copied
in) and samples (and streams) its first token right after that chunk, while longer prompts of
its group go on. A row whose own context fills the window slides as it would alone: its oldest
`window_shift` tokens dropped, it leaves the running batch and is re-encoded the same way, ahead
of the queue.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .backend import Batch
from .engine import Engine
from .sampling import SamplingParams, sample_next_token, token_logprobs
from .text import Result, Row

PieceCallback = Callable[[int, str, int], None]  # (row of the request, text piece, tokens generated so far)
DoneCallback = Callable[[list[Result] | BaseException | None], None]  # results, an error, or None if cancelled


@dataclass(eq=False)
class Ticket:
    """One submitted request: its rows (one per prompt), their parameters and the callbacks, which
    run on the scheduler's thread (hand their arguments on; do not block)."""

    rows: list[Row]
    params: SamplingParams
    on_piece: PieceCallback
    on_done: DoneCallback
    waiting: collections.deque = field(default_factory=collections.deque)  # row indices not yet admitted
    live: int = 0  # rows admitted and not finished
    cancelled: bool = False
    done: bool = False  # on_done has been called
    seen: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> (V,) bool, for repetition_penalty

    def cancel(self) -> None:
        """Stop generating: the rows leave the batch (or the queue) at the next step; on_done(None)."""
        self.cancelled = True

    def finish(self, outcome: list[Result] | BaseException | None) -> None:
        if not self.done:
            self.done = True
            self.on_done(outcome)


class ContinuousBatcher:
    """Runs every submitted request's rows in one batch of up to max_batch rows (see the module
    docstring), on a thread of its own started here. prefill_tokens: token positions prefilled
    between two decode steps (rows x positions of a chunk; one position at least). Raises
    ValueError for an engine without a KV cache or a max_batch below 1."""

    def __init__(self, engine: Engine, max_batch: int = 16, prefill_tokens: int = 512):
        if not engine.use_cache:
            raise ValueError("continuous batching needs the KV cache (an Engine with use_cache=True)")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.engine, self.max_batch, self.prefill_tokens = engine, max_batch, max(1, prefill_tokens)
        backend = engine.backend
        # Here rows come and go: a backend whose batches keep their rows in place (the compiled
        # backend's static batches) runs its steps eagerly through the plain Batch.
        make = backend.new_batch if backend.movable_rows else (lambda n: Batch(backend, n))
        # the running rows, and the rows being prefilled (their pages are touched only as they fill)
        self.batch, self.fill = make(max_batch), make(max_batch)
        cache = self.batch.cache
        cache.k.zero_()  # padding slots are skipped or weighted 0, and 0 * NaN would be NaN
        cache.v.zero_()
        self.batch.mask = torch.zeros(max_batch, engine.window, dtype=torch.long, device=engine.device)
        self.slots: list[tuple[Ticket, int]] = []  # (ticket, row) of cache row j
        self.cached: list[int] = []  # tokens cached for cache row j (right-aligned before cache.length)
        # (ticket, row) of fill cache row b, longest context first: the rows still encoding are the first ones
        self.filling: list[tuple[Ticket, int]] = []
        self.refill: collections.deque[tuple[Ticket, int]] = collections.deque()  # slid rows, re-encoded first
        self.queue: collections.deque[Ticket] = collections.deque()
        self.jobs: collections.deque = collections.deque()  # (fn, done) run between steps
        self.queued_rows = 0
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="simplegpt-batcher", daemon=True)
        self.thread.start()

    @property
    def active_rows(self) -> int:
        """Rows admitted now: running, being prefilled, or waiting to be re-encoded after a slide."""
        return len(self.slots) + len(self.filling) + len(self.refill)

    def submit(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams,
               on_piece: PieceCallback, on_done: DoneCallback) -> Ticket:
        """Queues a request. Its prompts are checked and seeded here, as Engine.stream_batch does it
        (ValueError/TypeError for a prompt the engine cannot take), before anything waits."""
        stream = self.engine.stream_batch(prompts, params)
        rows = stream.rows  # the engine's own rows: its checks, truncation and per-row seeds
        stream.close()
        ticket = Ticket(rows, params, on_piece, on_done, collections.deque(range(len(rows))))
        with self.cond:
            if self.stopping:
                raise RuntimeError("the batcher has stopped")
            self.queue.append(ticket)
            self.queued_rows += len(rows)
            self.cond.notify()
        return ticket

    def call(self, fn: Callable[[], object], done: Callable[[object], None]) -> None:
        """Runs fn() on the scheduler's thread between two steps (work that needs the engine, such
        as Engine.score; one such job between two steps) and hands done its return value or the
        exception it raised."""
        with self.cond:
            self.jobs.append((fn, done))
            self.cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Cancels what is queued and running and ends the thread (waiting up to timeout seconds)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.stopping or self.queue or self.jobs or self.active_rows):
                    self.cond.wait()
                if self.stopping:
                    break
                # one job between two steps: a burst of jobs (a scoring flood) delays the running rows'
                # decode by one job a step, as a burst of prompts delays it by one prefill chunk
                jobs = [self.jobs.popleft()] if self.jobs else []
            for fn, done in jobs:
                try:
                    out = fn()
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    out = e
                done(out)
            try:
                self._iteration()
                # Let waiting threads (the server's event loop) take the GIL between steps: a small
                # model's steps are mostly Python and would otherwise hold it nearly all the time.
                time.sleep(0)
            except Exception as e:  # noqa: BLE001 - a bug in the batch's own step: every request is told
                traceback.print_exc()
                self._fail_all(e)
        self._fail_all(None)

    def _fail_all(self, error: BaseException | None) -> None:
        tickets = {t for t, _ in [*self.slots, *self.filling, *self.refill]}
        with self.cond:
            tickets |= set(self.queue)
            self.queue.clear()
            self.queued_rows = 0
        self.slots, self.cached, self.filling = [], [], []
        self.refill.clear()
        self.batch.cache.reset()
        self.fill.cache.reset()
        for t in tickets:
            t.finish(error)

    def _iteration(self) -> None:
        """Cancelled rows leave; one decode step for the running rows (rows that slide leave for
        re-encoding); then prefill chunks within the budget, each row sampling its first token
        right after the chunk its context ends in."""
        self._drop_cancelled()
        logits = self._step() if self.slots else None
        if logits is not None:
            self._sample(list(range(len(self.slots))), logits)
        budget = self.prefill_tokens
        while budget > 0 and (self.filling or self._start_filling()):
            budget -= self._fill_chunk(budget)

    def _drop_cancelled(self) -> None:
        with self.cond:
            for t in [t for t in self.queue if t.cancelled]:
                self.queue.remove(t)
                self.queued_rows -= len(t.waiting)
                t.finish(None)
        gone = {t for t, _ in [*self.slots, *self.filling, *self.refill] if t.cancelled}
        for t in gone:
            t.waiting.clear()
        for j in reversed(range(len(self.slots))):
            if self.slots[j][0].cancelled:
                self._leave(j)
        self._unfill(lambda t: t.cancelled)
        for t in gone:
            t.finish(None)

    def _step(self) -> torch.Tensor | None:
        """Logits (n, V) for every running row's next token, in cache-row order (None when none is
        left). A row whose own context fills the window slides first, as alone: it leaves the batch,
        its oldest tokens dropped, to be re-encoded like a new prompt (its next token comes then)."""
        window, cache, batch = self.engine.window, self.batch.cache, self.batch
        for j in reversed(range(len(self.slots))):
            if self.cached[j] == window:
                ticket, i = self.slots[j]
                row = ticket.rows[i]
                if len(row.tokens) - row.start > window:
                    row.start += self.engine.window_shift
                self._leave(j)
                self.refill.append((ticket, i))
        if not self.slots:
            return None
        if cache.length == window:
            self._repack(max(self.cached))
        batch.next_pos = torch.tensor([[c] for c in self.cached], device=self.engine.device)
        logits = batch.decode_step([t.rows[i].tokens[-1] for t, i in self.slots])
        self.cached = [c + 1 for c in self.cached]
        return logits

    def _start_filling(self) -> bool:
        """Takes the rows to prefill next, as many as the batch has room for: the slid rows, then the
        queue's. False when there are none."""
        free = self.max_batch - len(self.slots) - len(self.refill)
        rows = list(self.refill)
        self.refill.clear()
        with self.cond:
            while free > 0 and self.queue:
                ticket = self.queue[0]
                i = ticket.waiting.popleft()
                self.queued_rows -= 1
                if not ticket.waiting:
                    self.queue.popleft()
                ticket.live += 1
                free -= 1
                rows.append((ticket, i))
                if ticket.params.repetition_penalty != 1.0 and i not in ticket.seen:
                    row = ticket.rows[i]
                    seen = torch.zeros(self.engine.vocab, dtype=torch.bool, device=self.engine.device)
                    seen[[t for t in row.tokens if t < self.engine.vocab]] = True
                    ticket.seen[i] = seen
        rows.sort(key=lambda r: -self._context_len(r))
        self.filling = rows
        self.fill.cache.reset()
        return bool(rows)

    @staticmethod
    def _context_len(entry: tuple[Ticket, int]) -> int:
        row = entry[0].rows[entry[1]]
        return len(row.tokens) - row.start

    def _fill_chunk(self, budget: int) -> int:
        """Encodes the next positions of every row being prefilled (as many as budget allows over
        their number, one at least), each row from slot 0 of its fill cache row as alone; the rows
        whose context ends here join the running batch and sample their first tokens. Returns the
        token positions computed. A chunk that raises ends the requests of its rows (_fail)."""
        cache, model = self.fill.cache, self.fill.model
        pos, P = cache.length, len(self.filling)
        lengths = [self._context_len(r) for r in self.filling]  # longest first
        C = max(1, min(lengths[0] - pos, budget // P))
        idx = torch.zeros(P, C, dtype=torch.long)  # (P, C); a row that ends inside the chunk is padded after
        for b, (ticket, i) in enumerate(self.filling):
            row = ticket.rows[i]
            part = row.tokens[row.start + pos:row.start + min(lengths[b], pos + C)]
            idx[b, :len(part)] = torch.tensor(part)
        ending = [b for b in range(P) if lengths[b] <= pos + C]  # the last rows (longest first)
        try:
            with torch.inference_mode(), self.fill.kernels(P * C):
                # positions pos.. after the cached ones, causal: a padded tail is never attended to
                h = model.hidden_states(idx.to(self.engine.device), kv_cache=cache)  # (P, C, n_embd)
                logits = None
                if ending:
                    last = torch.tensor([lengths[b] - 1 - pos for b in ending], device=self.engine.device)
                    logits = model.lm_head(h[ending, last])  # (E, V)
        except Exception as e:  # noqa: BLE001 - these requests' failure, told to them alone
            failed = {t: e for t, _ in self.filling}
            for t, _ in self.filling:
                t.live -= 1
            self.filling = []
            cache.reset()
            self._fail(failed)
            return P * C
        if ending:
            js = []
            for b in ending:
                self.slots.append(self.filling[b])
                self.cached.append(0)
                js.append(len(self.slots) - 1)
                self._place(js[-1], b, lengths[b])
            del self.filling[ending[0]:]
            if not self.filling:
                cache.reset()
            self._sample(js, logits)
        return P * C

    @torch.inference_mode()
    def _place(self, j: int, b: int, n: int) -> None:
        """Copies the n keys and values of fill cache row b to cache row j, right-aligned at the timeline."""
        cache, mask, fill = self.batch.cache, self.batch.mask, self.fill.cache
        if cache.length < n:
            self._repack(max([n, *(c for k, c in enumerate(self.cached) if k != j)]))
        end = cache.length
        cache.k[:, j, :, end - n:end] = fill.k[:, b, :, :n]
        cache.v[:, j, :, end - n:end] = fill.v[:, b, :, :n]
        mask[j].zero_()
        mask[j, end - n:end] = 1
        self.cached[j] = n

    @torch.inference_mode()
    def _unfill(self, leaves: Callable[[Ticket], bool]) -> None:
        """Rows being prefilled or waiting to be re-encoded whose ticket `leaves` go; the fill cache
        rows after a leaving one move up, so the rows still encoding stay the first ones."""
        self.refill = collections.deque(r for r in self.refill if not leaves(r[0]))
        fill, pos = self.fill.cache, self.fill.cache.length
        for b in reversed(range(len(self.filling))):
            if leaves(self.filling[b][0]):
                n = len(self.filling)
                if b < n - 1:
                    fill.k[:, b:n - 1, :, :pos] = fill.k[:, b + 1:n, :, :pos].clone()
                    fill.v[:, b:n - 1, :, :pos] = fill.v[:, b + 1:n, :, :pos].clone()
                self.filling[b][0].live -= 1
                del self.filling[b]
        if not self.filling:
            fill.reset()

    @torch.inference_mode()
    def _repack(self, length: int) -> None:
        """Moves every cache row's cached tokens to end at slot `length` (>= each row's count)."""
        cache, mask, end = self.batch.cache, self.batch.mask, self.batch.cache.length
        for j, c in enumerate(self.cached):
            if c and length != end:
                cache.k[:, j, :, length - c:length] = cache.k[:, j, :, end - c:end].clone()
                cache.v[:, j, :, length - c:length] = cache.v[:, j, :, end - c:end].clone()
            mask[j].zero_()
            mask[j, length - c:length] = 1
        cache.length = length

    @torch.inference_mode()
    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        cache, mask = self.batch.cache, self.batch.mask
        for t in (cache.k, cache.v):
            t[:, [a, b]] = t[:, [b, a]]
        mask[[a, b]] = mask[[b, a]]
        self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
        self.cached[a], self.cached[b] = self.cached[b], self.cached[a]

    def _leave(self, j: int) -> None:
        """Cache row j leaves; the last row takes its place."""
        self._swap(j, len(self.slots) - 1)
        self.slots.pop()
        self.cached.pop()
        if not self.slots:
            self.batch.cache.reset()

    def _fail(self, failed: dict[Ticket, BaseException]) -> None:
        """Ends each failed request with its error: its rows leave the batch and the queue; the others
        go on."""
        if not failed:
            return
        for e in {id(e): e for e in failed.values()}.values():  # a chunk's error is its requests' one
            traceback.print_exception(e)  # a bug in decoding that request: its trace for the log
        for j in reversed(range(len(self.slots))):
            if self.slots[j][0] in failed:
                self.slots[j][0].live -= 1
                self._leave(j)
        self._unfill(lambda t: t in failed)
        with self.cond:
            for t in failed:
                if t in self.queue:
                    self.queue.remove(t)
                    self.queued_rows -= len(t.waiting)
                t.waiting.clear()
        for t, e in failed.items():
            t.finish(e)

    def _sample(self, js: list[int], logits: torch.Tensor) -> None:
        """Each cache row js[k] draws its next token from logits[k] with its request's parameters;
        pieces are handed out, and rows that finish leave. A request whose sampling or callback
        raises ends with that error alone (_fail)."""
        groups: dict[Ticket, list[int]] = {}
        for k, j in enumerate(js):
            groups.setdefault(self.slots[j][0], []).append(k)
        engine = self.engine
        stop_eos_id = engine.eos_id
        if engine.vocab < logits.size(-1):
            # only ids with a token are drawn, as the engine's own loop does (Engine.vocab): an
            # embedding padded past its tokenizer has rows with no text
            logits = logits[:, :engine.vocab]  # (N, V) -> (N, tokens)
        finished, failed = [], {}
        with torch.inference_mode(), engine.backend.sampling():
            drawn = {}
            for ticket, ks in groups.items():
                p = ticket.params
                rows = [self.slots[js[k]][1] for k in ks]
                lg = logits[ks] if len(ks) != len(js) else logits
                try:
                    seen = torch.stack([ticket.seen[i] for i in rows]) if ticket.seen else None
                    tok = sample_next_token(lg, p, [ticket.rows[i].generator for i in rows], seen)
                    lps = None if p.logprobs is None else token_logprobs(lg, tok, p.logprobs)
                    drawn[ticket] = (rows, tok.tolist(), lps, ks)
                except Exception as e:  # noqa: BLE001 - this request's failure, told to it alone
                    failed[ticket] = e
        decode_bytes = engine.tokenizer.decode_bytes if engine.tokenizer is not None else None
        for ticket, (rows, toks, lps, ks) in drawn.items():
            p = ticket.params
            eos_id = stop_eos_id if p.stop_at_eos else None
            done = []
            try:
                for n, (i, tok) in enumerate(zip(rows, toks)):
                    row = ticket.rows[i]
                    for piece in row.accept(tok, None if lps is None else lps[n], eos_id, p.max_new_tokens,
                                            decode_bytes):
                        ticket.on_piece(i, piece, len(row.generated))
                    if row.finish_reason is not None:
                        done.append(js[ks[n]])
                    elif i in ticket.seen:
                        ticket.seen[i][tok] = True
            except Exception as e:  # noqa: BLE001 - this request's failure, told to it alone
                failed[ticket] = e
            else:
                finished += done
        for j in sorted(finished, reverse=True):
            ticket, _ = self.slots[j]
            self._leave(j)
            ticket.live -= 1
            if not ticket.live and not ticket.waiting:
                ticket.finish([r.result() for r in ticket.rows])
        self._fail(failed)
