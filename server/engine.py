"""The generation engine: a thread that batches every running request into each step.

Between steps it admits waiting requests into free KV slots, so a new request joins the
running batch at once (its prompt is prefilled in the same step in which the others
decode one token). Events go back to each request's asyncio queue on the HTTP loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.executor import Executor
from server.sampler import SamplingParams, make_generator, sample
from server.tokenizer import IncrementalDecoder, StopMatcher, TextTokenizer
from worker.collective import CollectiveError
from worker.step import SeqSpan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """A piece of a request's output: new text and token, then a finish reason or error."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop" | "length"
    error: str | None = None


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    slot: int = -1
    position: int = 0  # tokens already in the KV cache
    output: list[int] = field(default_factory=list)
    finished: bool = False

    def emit(self, event: Event) -> None:
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


class _Running:
    """Engine-thread state of an admitted request."""

    def __init__(self, req: Request, tokenizer: TextTokenizer):
        self.req = req
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopMatcher(list(req.params.stop))
        self.generator = make_generator(req.params.seed)


class Engine:
    def __init__(self, executor: Executor, tokenizer: TextTokenizer, max_batch: int, max_context: int):
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_context = max_context
        self.error: str | None = None
        self.steps = 0
        self._ids = itertools.count(1)
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._running: list[_Running] = []
        self._free_slots = list(range(max_batch))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        """Queue a request (call from the event loop); read its events with ``stream()``."""
        if self.error:
            raise EngineError(self.error)
        req = Request(next(self._ids), list(prompt), params, asyncio.get_running_loop())
        self._waiting.put(req)
        self._wake.set()
        return req

    # --- engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drop_cancelled()
            self._admit()
            if not self._running:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as exc:  # a dead rank, a broken step: fail the batch, not the server
                if isinstance(exc, CollectiveError):
                    log.error("step failed: %s", exc)
                else:
                    log.exception("step failed")
                self.error = f"cluster step failed: {exc}"
                for run in list(self._running):
                    self._finish(run, Event(error=self.error))

    def _drop_cancelled(self) -> None:
        for run in [r for r in self._running if r.req.cancelled]:
            log.info("request %d cancelled", run.req.id)
            self._release(run)

    def _admit(self) -> None:
        while self._free_slots:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                return
            if req.cancelled:
                continue
            req.slot = self._free_slots.pop(0)
            self._running.append(_Running(req, self.tokenizer))

    def _step(self) -> None:
        spans, tokens = [], []
        for run in self._running:
            req = run.req
            new = req.prompt if req.position == 0 else [req.output[-1]]
            spans.append(SeqSpan(req.slot, req.position, len(new)))
            tokens.append(new)
        logits = self.executor.step(tokens, spans)  # (S, V)
        self.steps += 1
        for run, span, row in zip(list(self._running), spans, logits, strict=True):
            run.req.position += span.length
            self._accept(run, sample(row, run.req.params, run.generator))

    def _accept(self, run: _Running, token: int) -> None:
        req = run.req
        req.output.append(token)
        is_eos = token in self.tokenizer.eos_ids
        out_of_room = len(req.output) >= req.params.max_tokens or req.position + 1 >= self.max_context
        delta = run.decoder.push(token)
        if is_eos or out_of_room:
            delta += run.decoder.flush()
        text, hit_stop = run.stops.feed(delta)
        if hit_stop:
            self._finish(run, Event(text=text, token=token, finish_reason="stop"))
        elif is_eos or out_of_room:
            reason = "stop" if is_eos else "length"
            self._finish(run, Event(text=text + run.stops.flush(), token=token, finish_reason=reason))
        else:
            req.emit(Event(text=text, token=token))

    def _finish(self, run: _Running, event: Event) -> None:
        run.req.finished = True
        run.req.emit(event)
        self._release(run)

    def _release(self, run: _Running) -> None:
        if run in self._running:
            self._running.remove(run)
        self._free_slots.append(run.req.slot)
        self._free_slots.sort()
