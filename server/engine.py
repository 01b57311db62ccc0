"""The generation engine: continuous batching over the cluster, in one thread.

Between two steps the engine drops cancelled and timed-out requests, admits waiting ones into
free KV slots, and builds the next step: one token for every decoding sequence plus at most
``prefill_chunk`` prompt tokens of the sequences being prefilled, so a long prompt never
stalls the running streams for long. A slot is freed on every rank simply by being reused
(the next sequence writes its KV from position 0). Events go back to each request's asyncio
queue on the HTTP loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from server.metrics import Metrics
from server.sampler import (
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    finite_rows,
    make_generator,
    sample,
    token_logprob,
)
from server.tokenizer import IncrementalDecoder, StopMatcher, TextTokenizer
from worker.comm.collective import CollectiveError
from worker.rank.executor import Executor
from worker.rank.step import SeqSpan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """A piece of a request's output: new text and token, then a finish reason or an error."""

    text: str = ""
    token: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" | "length"
    error: str | None = None
    error_code: str | None = None  # "cluster_unavailable" | "timeout"


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() after which the request is abandoned
    arrival: float = field(default_factory=time.monotonic)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    finished: bool = False
    slot: int = -1
    position: int = 0  # tokens already in the KV cache
    output: list[int] = field(default_factory=list)

    def emit(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the HTTP loop has closed (the server is exiting)
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def stream(self) -> AsyncIterator[Event]:
        """Events until (and including) the final one."""
        while True:
            event = await self.events.get()
            yield event
            if event.finish_reason or event.error:
                return


class EngineError(RuntimeError):
    pass


class QueueFull(EngineError):
    """Admission refused: the waiting queue is at its request or token limit."""


MAX_REPLAYS = 2  # repairs in a row, without a step that works, before the running requests fail


@dataclass(frozen=True)
class EngineLimits:
    max_batch: int = 8
    max_context: int = 2048
    prefill_chunk: int = 256  # prompt tokens per step, over all prefilling sequences
    max_waiting: int = 64  # queued requests
    max_waiting_tokens: int = 65536  # queued prompt tokens
    request_timeout_s: float | None = None
    recovery_wait_s: float = 30.0  # how long running requests wait for a failed rank to come back


class _Running:
    """Engine-thread state of an admitted request."""

    def __init__(self, req: Request, tokenizer: TextTokenizer):
        self.req = req
        self.decoder = IncrementalDecoder(tokenizer, req.prompt)
        self.stops = StopMatcher(list(req.params.stop))
        self.generator = make_generator(req.params.seed)
        self.counts: Counter[int] = Counter()
        self.last_token_time: float | None = None
        self.context = req.prompt  # tokens to (re)build the KV cache from

    @property
    def prefilling(self) -> bool:
        return self.req.position < len(self.context)

    def rewind(self) -> None:
        """Rebuild this sequence's KV cache from scratch (after a rank was replaced): replay the
        prompt and every generated token but the last, which the next decode step feeds."""
        self.context = self.req.prompt + self.req.output[:-1]
        self.req.position = 0


class Engine:
    def __init__(self, executor: Executor, tokenizer: TextTokenizer, limits: EngineLimits,
                 metrics: Metrics | None = None, recover: Callable[[float], bool] | None = None,
                 missing_ranks: Callable[[], set[int]] | None = None):
        self.executor = executor
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics or Metrics()
        self.error: str | None = None  # set while the cluster is broken: new requests get 503
        self._recover = recover
        self._missing_ranks = missing_ranks or set
        self._next_repair = 0.0
        self._replays = 0  # repairs since the last step that worked
        self.steps = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _waiting and _waiting_tokens
        self._waiting: deque[Request] = deque()
        self._waiting_tokens = 0
        self._running: list[_Running] = []
        self._free_slots = list(range(limits.max_batch))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closing = False  # begin_shutdown: end every request, repair nothing
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def begin_shutdown(self) -> None:
        """The server is exiting (safe from a signal handler): running and queued requests end now
        with a ``shutting_down`` error, so streams close cleanly instead of being cut off, and a
        rank that goes away meanwhile (Ctrl-C reaches local workers too) is not repaired."""
        self._closing = True
        self.error = "the server is shutting down"
        self._wake.set()

    def health_problem(self) -> str | None:
        """Why the server cannot serve right now (None: it can)."""
        if self.error:
            return self.error
        if missing := self._missing_ranks():
            return f"rank(s) {sorted(missing)} missing; the cluster is recovering"
        return None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        """Queue a request (call from the event loop); read its events with ``stream()``.

        Raises QueueFull at once when the queue is at a limit: the caller answers 503.
        """
        if self.error:
            raise EngineError(self.error)
        timeout = self.limits.request_timeout_s
        req = Request(next(self._ids), list(prompt), params, asyncio.get_running_loop(),
                      deadline=time.monotonic() + timeout if timeout else None)
        with self._lock:
            self._forget_cancelled_waiting()
            if len(self._waiting) >= self.limits.max_waiting:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(f"the queue is full ({self.limits.max_waiting} requests waiting)")
            if self._waiting_tokens + len(prompt) > self.limits.max_waiting_tokens:
                self.metrics.rejected.labels("queue_tokens").inc()
                raise QueueFull(f"the queue is full ({self._waiting_tokens} prompt tokens waiting)")
            self._waiting.append(req)
            self._waiting_tokens += len(prompt)
            self.metrics.waiting.set(len(self._waiting))
        self._wake.set()
        return req

    # --- engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception:  # a bug outside the step: fail what runs, keep serving, never hang a client
                log.exception("engine: unexpected error; failing the running requests")
                self._fail_running(Event(error="internal error in the engine", error_code="internal_error"), "error")
                self._wake.wait(0.05)  # no busy loop if it repeats
        self.metrics.running.set(0)

    def _iteration(self) -> None:
        """Admit, step, or wait a little: one turn of the engine thread's loop."""
        if self._closing:
            self._fail_all(Event(error="the server is shutting down", error_code="shutting_down"), "cancelled")
            self._wake.wait(0.2)
            return
        if not self._running and not self._waiting and not self.error and (missing := self._missing_ranks()):
            # idle: repair before the next request (/health's detail names the rank, as docs/cluster.md says)
            self.error = f"rank(s) {sorted(missing)} missing; the cluster is recovering"
            self._count_workers_up(len(missing))
        # Requests queued before the heartbeat saw the rank go are admitted below: the check before
        # the step then sends them through the step-failure path (wait for the rank, or end cleanly).
        if self.error and not self._repair_in_background():
            self._fail_waiting()  # only a request that raced past submit()'s check can be here
            self._wake.wait(0.2)
            return
        self._drop_finished_early()
        self._admit()
        self.metrics.running.set(len(self._running))
        if not self._running:
            self._wake.wait(0.05)
            self._wake.clear()
            return
        try:
            if missing := self._missing_ranks():  # the heartbeat saw a rank go: don't wait for a timeout
                raise CollectiveError(f"rank(s) {sorted(missing)} stopped answering heartbeats")
            self._step()
        except Exception as exc:  # a dead rank, a broken step: repair, replay, or fail cleanly
            self._on_step_failure(exc)

    def _fail_running(self, event: Event, reason: str) -> None:
        for run in list(self._running):
            self._finish(run, event, reason)

    def _fail_all(self, event: Event, reason: str) -> None:
        self._fail_running(event, reason)
        self._fail_waiting(event)

    def _on_step_failure(self, exc: Exception) -> None:
        if self._closing:
            return  # the next turn ends every request
        if isinstance(exc, CollectiveError):
            log.error("step failed: %s", exc)
        else:
            log.exception("step failed")
        self.error = f"a rank failed ({exc}); the cluster is recovering"
        self._count_workers_up(max(1, len(self._missing_ranks())))  # the failed step's rank, at least
        deadline = time.monotonic() + self.limits.recovery_wait_s
        if self._recover is not None and self._try_recover(deadline):
            self._replays += 1
            if self._replays > MAX_REPLAYS:  # the cluster is whole, yet this step fails: not a rank's fault
                log.error("the step failed again after %d repairs; failing its requests", MAX_REPLAYS)
                self._fail_running(Event(error=f"the step keeps failing: {exc}", error_code="internal_error"), "error")
                self._replays = 0
                return
            for run in self._running:
                run.rewind()
            log.info("cluster repaired; replaying %d running sequences", len(self._running))
            return
        self.error = f"a rank failed and did not come back within {self.limits.recovery_wait_s:.0f} s: {exc}"
        self._fail_all(Event(error=self.error, error_code="cluster_unavailable"), "error")

    def _count_workers_up(self, missing: int) -> None:
        """``edgellm_workers_up`` with ``missing`` workers down (once, a decrement per failed step
        could count one dead rank several times; an idle rank's loss did not count at all)."""
        self.metrics.workers_up.set(max(0, self.executor.hub.world_size - 1 - missing))

    def _fail_waiting(self, event: Event | None = None) -> None:
        """End every queued request with ``event`` (default: the cluster's error; a clean 503,
        never a hang)."""
        event = event or Event(error=self.error or "the cluster is unavailable", error_code="cluster_unavailable")
        with self._lock:
            waiting, self._waiting, self._waiting_tokens = list(self._waiting), deque(), 0
            self.metrics.waiting.set(0)
        for req in waiting:
            req.emit(event)
            self.metrics.requests.labels("error").inc()

    def _try_recover(self, deadline: float) -> bool:
        assert self._recover is not None
        try:
            repaired = self._recover(deadline)
        except Exception:
            log.exception("repair failed")
            repaired = False
        if repaired:
            self.error = None
            self.metrics.workers_up.set(self.executor.hub.world_size - 1)
        return repaired

    def _repair_in_background(self) -> bool:
        """While broken with nothing running, retry the repair every few seconds."""
        if self._recover is None or time.monotonic() < self._next_repair:
            return False
        self._next_repair = time.monotonic() + 2.0
        return self._try_recover(time.monotonic() + 5.0)

    def _forget_cancelled_waiting(self) -> None:
        """Drop queued requests whose client went away (caller holds ``_lock``): they held a
        queue place and counted in the waiting gauge until they would have reached a slot, so
        clients that timed out and retried were refused with queue_full by their own ghosts."""
        if not any(req.cancelled for req in self._waiting):
            return
        kept = deque(req for req in self._waiting if not req.cancelled)
        self.metrics.requests.labels("cancelled").inc(len(self._waiting) - len(kept))
        self._waiting, self._waiting_tokens = kept, sum(len(req.prompt) for req in kept)
        self.metrics.waiting.set(len(kept))

    def _drop_finished_early(self) -> None:
        with self._lock:
            self._forget_cancelled_waiting()
        now = time.monotonic()
        for run in list(self._running):
            req = run.req
            if req.cancelled:
                log.info("request %d cancelled by its client", req.id)
                self._finish(run, Event(error="cancelled", error_code="cancelled"), "cancelled")
            elif req.deadline is not None and now > req.deadline:
                self._finish(run, Event(error="request timed out", error_code="timeout"), "timeout")

    def _admit(self) -> None:
        now = time.monotonic()
        while self._free_slots:
            with self._lock:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
                self._waiting_tokens -= len(req.prompt)
                self.metrics.waiting.set(len(self._waiting))
            if req.cancelled:
                self.metrics.requests.labels("cancelled").inc()
                continue
            if req.deadline is not None and now > req.deadline:
                req.emit(Event(error="request timed out in the queue", error_code="timeout"))
                self.metrics.requests.labels("timeout").inc()
                continue
            try:
                run = _Running(req, self.tokenizer)
            except Exception as exc:  # e.g. a seed the generator refuses: this request fails, not the engine
                log.exception("request %d could not start", req.id)
                req.emit(Event(error=f"the request could not start: {exc}", error_code="internal_error"))
                self.metrics.requests.labels("error").inc()
                continue
            req.slot = self._free_slots.pop(0)
            self.metrics.queue_time.observe(now - req.arrival)
            self._running.append(run)

    def _step(self) -> None:
        spans, tokens, sampled = [], [], []
        prefill_budget = self.limits.prefill_chunk
        for run in self._running:
            req = run.req
            if run.prefilling:
                if prefill_budget <= 0:
                    continue
                new = run.context[req.position:req.position + prefill_budget]
                prefill_budget -= len(new)
            else:
                new = [req.output[-1]]
            spans.append(SeqSpan(req.slot, req.position, len(new)))
            tokens.append(new)
            sampled.append(run)
        start = time.perf_counter()
        logits = self.executor.step(tokens, spans)  # (S, V)
        self.metrics.step_time.observe(time.perf_counter() - start)
        self.metrics.step_tokens.observe(sum(s.length for s in spans))
        for seconds in self.executor.allreduce_seconds:
            self.metrics.allreduce_time.observe(seconds)
        self.steps += 1
        self._replays = 0
        finite = finite_rows(logits)  # one check per step; sampling NaN fails or picks garbage
        for run, span, row, ok in zip(sampled, spans, logits, finite, strict=True):
            req = run.req
            was_prefill = run.prefilling
            req.position += span.length
            if was_prefill:
                self.metrics.prompt_tokens.inc(span.length)
                if run.prefilling or req.output:
                    continue  # more prompt to come, or a replay: its next token is already known
            if not ok:
                self._finish(run, Event(error="the model produced NaN or infinite logits (are its weights "
                                              "corrupted?)", error_code="internal_error"), "error")
                continue
            try:
                self._accept(run, row)
            except Exception:  # a sampling bug fails its request, not the cluster (no repair, no replay)
                log.exception("request %d: sampling failed", req.id)
                self._finish(run, Event(error="sampling failed", error_code="internal_error"), "error")

    def _accept(self, run: _Running, logits_row: torch.Tensor) -> None:
        req, params = run.req, run.req.params
        scores = apply_penalties(logits_row, params, req.prompt, run.counts) if params.penalized else logits_row
        token = sample(scores, params, run.generator)
        logprob = token_logprob(logits_row, token, params.logprobs) if params.logprobs is not None else None
        req.output.append(token)
        run.counts[token] += 1
        self._record_token_time(run)
        is_eos = token in self.tokenizer.eos_ids and not params.ignore_eos
        out_of_room = len(req.output) >= params.max_tokens or req.position + 1 >= self.limits.max_context
        delta = run.decoder.push(token)
        if is_eos or out_of_room:
            delta += run.decoder.flush()
        text, hit_stop = run.stops.feed(delta)
        if hit_stop:
            self._finish(run, Event(text=text, token=token, logprob=logprob, finish_reason="stop"), "stop")
        elif is_eos or out_of_room:
            reason = "stop" if is_eos else "length"
            self._finish(run, Event(text=text + run.stops.flush(), token=token, logprob=logprob,
                                    finish_reason=reason), reason)
        else:
            req.emit(Event(text=text, token=token, logprob=logprob))

    def _record_token_time(self, run: _Running) -> None:
        now = time.monotonic()
        if run.last_token_time is None:
            self.metrics.ttft.observe(now - run.req.arrival)
        else:
            self.metrics.itl.observe(now - run.last_token_time)
        run.last_token_time = now
        self.metrics.generation_tokens.inc()

    def _finish(self, run: _Running, event: Event, reason: str) -> None:
        req = run.req
        req.finished = True
        if not req.cancelled:
            req.emit(event)
        self.metrics.requests.labels(reason).inc()
        if reason in ("stop", "length"):
            self.metrics.e2e.observe(time.monotonic() - req.arrival)
        if run in self._running:
            self._running.remove(run)
            self.metrics.running.set(len(self._running))  # also when the engine stops stepping (a failed repair)
        self._free_slots.append(req.slot)
        self._free_slots.sort()
