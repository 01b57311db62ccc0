"""One worker rank: its loaded shard, its KV cache and the data-plane loop that runs steps.

The gRPC service (control) and the tests both drive this class; the loop itself only
talks to the hub (ZeroMQ, and its lane where it has one).
"""

from __future__ import annotations

import gc
import logging
import threading

import torch

from worker.comm.collective import CollectiveError, StarRank
from worker.comm.wire import Kind, WireError
from worker.models import native_step
from worker.rank.head import logit_rows
from worker.rank.loader import Progress, RankSpec, load_rank
from worker.rank.step import SeqSpan, StepPlan

log = logging.getLogger(__name__)

__all__ = ["Progress", "RankSpec", "WorkerRank"]


def spans_from_tensor(spans: torch.Tensor) -> list[SeqSpan]:
    """(S, 3) int64 rows of (slot, start, length) -> spans."""
    if spans.dtype != torch.int64 or spans.dim() != 2 or spans.shape[1] != 3:
        raise WireError(f"step spans must be (S, 3) int64, got {tuple(spans.shape)} {spans.dtype}")
    return [SeqSpan(int(s), int(b), int(n)) for s, b, n in spans.tolist()]


def spans_to_tensor(spans: list[SeqSpan]) -> torch.Tensor:
    return torch.tensor([[s.slot, s.start, s.length] for s in spans], dtype=torch.int64).view(-1, 3)


def validate_step(spans: list[SeqSpan], hidden: torch.Tensor, hidden_size: int, max_batch: int,
                  max_context: int) -> None:
    """Refuse a step that would index outside the KV cache or has the wrong width."""
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise WireError(f"hidden states of shape {tuple(hidden.shape)}, expected (T, {hidden_size})")
    if sum(s.length for s in spans) != hidden.shape[0]:
        raise WireError("span lengths do not add up to the hidden rows")
    for s in spans:
        if not (0 <= s.slot < max_batch and s.start >= 0 and s.length > 0 and s.start + s.length <= max_context):
            raise WireError(f"span {s} outside the KV cache ({max_batch} slots x {max_context})")


class WorkerRank:
    """A loaded rank attached to the hub, serving steps until stopped."""

    def __init__(self, spec: RankSpec, hub_address: str, token: str, progress: Progress | None = None,
                 timeout_s: float = 30.0):
        self.spec = spec
        self.link = StarRank(spec.shard.rank, hub_address, token, timeout_s, sync_dtype=spec.sync_dtype)
        try:
            self.loaded = load_rank(spec, self.link.allreduce_, progress)
        except BaseException:
            self.link.close()
            raise
        self.model = self.loaded.model
        native_step.attach(self.model, self.link, f"rank {spec.shard.rank}")
        self.steps = 0
        self.tokens = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._close_lock = threading.Lock()
        self._closed = False

    def start(self, join_timeout_s: float = 30.0) -> None:
        self.link.wait_welcome(join_timeout_s)
        self._thread = threading.Thread(target=self._loop, name=f"rank-{self.spec.shard.rank}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def serving_a_live_hub(self) -> bool:
        """In the data plane, with its hub still connected (a dead coordinator's is not)."""
        return self.running and self.link.hub_connected()

    def _loop(self) -> None:
        try:
            self._serve_steps()
        finally:
            if self._stop.is_set():
                self._close()  # stop() left it to this thread: ZeroMQ sockets are not thread-safe

    def _serve_steps(self) -> None:
        hub_up = True  # it just welcomed us
        while not self._stop.is_set():
            try:
                if (msg := self.link.next_message(200)) is None:
                    if hub_up != (hub_up := self.link.hub_connected()):
                        # idle, a dead coordinator was otherwise noticed only by the next one's Configure
                        if hub_up:
                            log.info("rank %d: the hub is back", self.spec.shard.rank)
                        else:
                            log.warning("rank %d: lost the hub (the coordinator stopped or is unreachable); "
                                        "waiting for it or for a new coordinator", self.spec.shard.rank)
                    continue
                if msg.kind == Kind.STOP:
                    break
                if msg.kind == Kind.ABORT:
                    continue  # the step it aborts had already ended here
                if msg.kind != Kind.STEP or len(msg.tensors) != 2:
                    log.warning("ignoring %s outside a step", msg.kind.name)
                    continue
                spans_t, hidden = msg.tensors
                spans = spans_from_tensor(spans_t)
                validate_step(spans, hidden, self.spec.config.hidden_size, self.spec.max_batch,
                              self.spec.max_context)
                self.link.begin(msg)
                with torch.inference_mode():
                    final = self.model.forward(hidden.to(self.spec.dtype),
                                               StepPlan.build(spans, self.spec.config.sliding_window))
                    self._send_logits(final, spans)
                self.steps += 1
                self.tokens += hidden.shape[0]
            except (CollectiveError, WireError) as exc:
                # A broken step is abandoned; the hub notices and decides what to do.
                log.warning("rank %d: step abandoned: %s", self.spec.shard.rank, exc)
            except Exception:  # a bug must not silently kill the data plane
                log.exception("rank %d: step failed", self.spec.shard.rank)
        log.info("rank %d: data plane stopped", self.spec.shard.rank)

    def _send_logits(self, final: torch.Tensor, spans: list[SeqSpan]) -> None:
        """After the last layer: this rank's LM head rows applied to the rows the hub asked for
        (``StarHub.gather_logits`` puts them beside the other ranks')."""
        rows = logit_rows(final, spans, self.link.all_logits)  # (R, d)
        self.link.send_logits(self.loaded.head.logits(rows))  # (R, V_r)

    def stop(self) -> None:
        """Leave the data plane. A step waiting for the hub ends within ``CANCEL_POLL_MS``; one
        still computing after 5 s is left to finish, and its thread closes the socket and the
        shard when it does (closing them under it would crash it)."""
        self._stop.set()
        self.link.cancelled.set()
        if self._thread:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                log.warning("rank %d: a step is still running; it closes the link when it ends",
                            self.spec.shard.rank)
                return
        self._close()

    def _close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.link.close()
        self.loaded.close()

    def stats(self) -> dict[str, float]:
        return self.loaded.stats() | {"steps": self.steps, "tokens": self.tokens}


def freeze_loaded_objects() -> None:
    """Take every object alive once a process has loaded (modules, torch's, the model's) out of
    the garbage collector's view (``gc.freeze``), so that its full collections stop walking them.
    Measured on the coordinator's heap: validating a 2.5 MB request of token-id lists, which
    allocates 500k lists and so sets off full collections, took 1.9-2.1 s, then 0.7 s; a step's
    own allocations set them off too, as a pause of the step."""
    gc.collect()
    gc.freeze()
