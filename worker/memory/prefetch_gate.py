"""Whether to read a layer's predicted experts ahead at all, and how many: decided per layer
from what the expert cache measures, so that prefetching never costs more than it saves.

A prefetch reads only while the disk would otherwise idle (``worker.memory.expert_reads``), so what a
guess costs and gains is bounded:

- a right guess saves at most the demand wait of its expert, and no more than the disk time
  left before its layer starts (``available``: the layer's measured lead time, less the demand
  reads already queued in front of it, less the time since the lead started);
- a wrong guess delays a demand read by at most the one piece it has in flight when the demand
  comes (and, when its buffer had to be taken, the cached expert it displaced: one needed later
  than the guess, or, for a guess at least ``KEEP_PRECISION`` sure, the one its layer's own first
  miss would take; see ``ExpertCache``).

A guess that has started but not landed when its layer routes is not wasted: a right one becomes
a demand read where it stands, its bytes already read are not read again, so it saved their time.
(An earlier rule stopped a layer whose guesses mostly landed late, at a time when every read was a
page-cache copy that competed with compute; with ``O_DIRECT`` reads it only kept read-ahead off:
gated runs on the trained tiny MoE read 0.04-0.42 MB ahead per token with 0-1 of 8 layers open.)
Whether a guess can land in time is what ``available`` measures: none is read where no disk time is
left before its layer starts.

With ``p`` the layer's recent precision (right guesses / guesses, an exponential average), a
layer prefetches when ``p * min(available, expert_s) > (1 - p) * piece_s``, and only as many
guesses as can land: ``ceil(available / expert_s)``. No lead time left (the disk is busy with
demand reads past the layer's start: the I/O queue is the bottleneck) means no prefetch. The
predictor is still scored on the layers that do not prefetch, so a layer whose guesses become
good starts again.

Last, the gate checks the result rather than the model, and a layer reads ahead only where it has
measured a win. Per layer, the time from its first prediction of a step to the end of its experts
(``observe_span``: its guesses' reads, the compute they compete with, and its waits for experts)
is averaged separately over steps that read ahead and steps that did not. A layer starts closed:
its first ``MIN_SPANS`` steps read nothing ahead (the predictor is scored meanwhile), then up to
``MIN_SPANS`` steps read ahead as a probe, where the tests above let them. It stays open only while
reading ahead measures faster by more than ``WIN_MARGIN`` (``winning``), with one step in
``PROBE_EVERY`` closed to keep the other side current; otherwise it is closed but for one probe step
in ``REPROBE_EVERY``. Exploring open (the previous gate started open and needed 4 closed probes, one
in 8 steps, before it could judge: 32 steps of prefetch per layer) cost the trained tiny MoE
0.88-0.99x of on-demand; a predictor that is always wrong now never reads a byte ahead (its
precision is 0 before the first probe).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PRIOR_PRECISION = 0.5  # before a layer has been scored: try, and let the record decide
DECAY = 0.8  # weight of the past in the exponential averages (about the last 5 steps count)
PROBE_EVERY = 8  # a layer where reading ahead wins skips it one step in this many, to keep measuring
MIN_SPANS = 4  # steps of each kind (read ahead or not) before the gate judges a layer by its time
WIN_MARGIN = 0.05  # reading ahead must measure this much faster than not for a layer to keep it (noise)
REPROBE_EVERY = 32  # a layer judged closed reads ahead one step in this many, to see if that changed
# weight of the past in the guess counts behind ``sure`` (about the last 20 steps): the 5 steps of
# ``precision`` made a random MoE's layers (right 60% of the time) look 70% sure a fifth of the time
SURE_DECAY = 0.95


class PrefetchGate:
    def __init__(self) -> None:
        self.precision: dict[int, float] = {}  # layer -> EMA of right / guessed
        # layer -> guesses of experts not cached when guessed, decayed by SURE_DECAY a step, and of
        # those the right ones (``sure``)
        self.guessed: dict[int, float] = {}
        self.right: dict[int, float] = {}
        self.lead: dict[int, float] = {}  # layer -> EMA of seconds from its first prediction to its start
        self.skipped = 0  # guesses not read ahead because of this gate
        self.open: dict[int, bool] = {}  # layer -> whether its last plan read anything ahead
        self.span: dict[tuple[int, bool], float] = {}  # (layer, read ahead) -> EMA of its span's seconds
        self.spans: dict[tuple[int, bool], int] = {}  # (layer, read ahead) -> spans observed
        self._arm: dict[int, bool] = {}  # layer -> whether any plan of its current step read ahead
        self._judged: dict[int, int] = {}  # layer -> plans since its time was last probed

    def observe_prediction(self, layer: int, guessed: int, right: int) -> None:
        if guessed:
            rate = right / guessed
            old = self.precision.get(layer)
            self.precision[layer] = rate if old is None else DECAY * old + (1 - DECAY) * rate

    def observe_uncached(self, layer: int, guessed: int, right: int) -> None:
        """Of ``layer``'s guesses this step, ``guessed`` named experts not cached, ``right`` of them
        were used: the guesses that cost a read, and an eviction where they take a buffer."""
        self.guessed[layer] = SURE_DECAY * self.guessed.get(layer, 0.0) + guessed
        self.right[layer] = SURE_DECAY * self.right.get(layer, 0.0) + right

    def sure(self, layer: int) -> float:
        """How often ``layer``'s guesses of experts not cached are right at the least, as far as
        the record shows (``observe_uncached``; guesses of cached experts are easy: the
        ``temporal`` guess on the random MoE is right 75% of the time, but where it names an
        expert no longer cached, much less, and evicting for those made prefetch need 11% more
        bytes per token than on demand with a 25% cache): the rate over about the last 20 steps
        (with one right and one wrong guess more, so that a short perfect record is not taken for
        certainty) less one standard error. The cache
        lets a guess cost an eviction (``ExpertCache._victim_for_next``, ``keep``) only where this
        is at least ``KEEP_PRECISION``: judged by the 5-step ``precision``, the random MoE's
        layers passed by chance and prefetch needed up to 10% more bytes per token than on demand."""
        n = self.guessed.get(layer, 0.0) + 2
        p = (self.right.get(layer, 0.0) + 1) / n
        return p - math.sqrt(p * (1 - p) / n)

    def observe_lead(self, layer: int, seconds: float) -> None:
        old = self.lead.get(layer)
        self.lead[layer] = seconds if old is None else DECAY * old + (1 - DECAY) * seconds

    def observe_span(self, layer: int, seconds: float) -> None:
        """``layer``'s step took ``seconds`` from its first prediction to the end of its experts;
        scored as a step that read ahead or not (not at all where no plan ran: nothing to guess)."""
        arm = self._arm.pop(layer, None)
        if arm is None:
            return
        key = (layer, arm)
        old = self.span.get(key)
        self.span[key] = seconds if old is None else DECAY * old + (1 - DECAY) * seconds
        self.spans[key] = self.spans.get(key, 0) + 1

    def _measured(self, layer: int) -> bool:
        return min(self.spans.get((layer, True), 0), self.spans.get((layer, False), 0)) >= MIN_SPANS

    def winning(self, layer: int) -> bool:
        """Whether reading ahead has measured faster than not at ``layer``, by ``WIN_MARGIN``."""
        return self._measured(layer) and self.span[(layer, True)] < (1 - WIN_MARGIN) * self.span[(layer, False)]

    def losing(self, layer: int) -> bool:
        """Whether ``layer`` is measured and reading ahead did not win there (it stays closed)."""
        return self._measured(layer) and not self.winning(layer)

    def _judged_off(self, layer: int) -> bool:
        """Whether ``layer`` skips reading ahead this step on its measured time: closed until its
        steps without reading ahead are measured, then open for the probe steps that measure the
        other side, then open only where reading ahead wins (but for one closed probe in
        ``PROBE_EVERY``), else closed but for one probe in ``REPROBE_EVERY``."""
        calls = self._judged[layer] = self._judged.get(layer, 0) + 1
        if self.spans.get((layer, False), 0) < MIN_SPANS:
            return True
        if self.spans.get((layer, True), 0) < MIN_SPANS:
            return False
        if self.winning(layer):
            return calls % PROBE_EVERY == 0
        return calls % REPROBE_EVERY != 0

    def available(self, layer: int, elapsed: float, backlog_s: float, expert_s: float) -> float:
        """Disk seconds left to read ahead before ``layer`` starts; one expert's read time while
        the layer's lead is not measured yet."""
        lead = self.lead.get(layer)
        return (expert_s if lead is None else lead - elapsed) - backlog_s

    def plan(self, layer: int, guesses: Sequence[int], available: float, expert_s: float,
             piece_s: float) -> list[int]:
        """The guesses to read ahead, most likely first (``guesses`` come in that order)."""
        if not guesses:
            return []
        p = self.precision.get(layer, PRIOR_PRECISION)
        if (available <= 0 or expert_s <= 0 or p * min(available, expert_s) <= (1 - p) * piece_s
                or self._judged_off(layer)):
            self.skipped += len(guesses)
            self.open[layer] = False
            self._arm.setdefault(layer, False)
            return []
        self.open[layer] = self._arm[layer] = True
        count = max(1, math.ceil(available / expert_s))
        self.skipped += max(0, len(guesses) - count)
        return list(guesses[:count])
