"""Mixture-of-experts layers for one tensor-parallel rank (shared by Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE, whose MoE math is the same up to the fields their weights carry).

The router's weights are replicated, so every rank routes the full hidden state to the same
experts; each expert is split like a dense MLP (gate/up rows, down columns), so each rank's
routed sum is a partial of the exact output and the block's one allreduce adds them: MoE
adds no communication. Follows transformers' ``*SparseMoeBlock`` (eager experts): softmax
in fp32, top-k, optional renormalization, weights applied after ``down``.

Routed experts come from the rank's ``ExpertCache``. Right after layer ``l``'s routing, the
experts the next MoE layer will need are predicted and prefetched (read ahead) while layer
``l`` computes. Predictors (``PREDICTORS``, see ``Predictor``): ``router``, the next
layer's router applied to the current hidden state (EdgeMoE's), ``temporal``, the experts that
layer used at the previous step, ``input``, the layer's router on its own input when it starts
(one attention block ahead), ``union``, the first two, and ``adaptive``, per layer whichever
has been right most often (waiting for ``input`` only where it is clearly surer), or several
where none is often right. bench/moe_cache.py measures them on a random and on a trained
Mixtral (scripts/train_tiny_moe.py); bench/expert_predictors.py scores them offline.
``adaptive`` is the default (RankSpec.expert_predictor): on trained models the router guesses
the later layers well from a block ahead (0.92-0.96 recall@2) and layers 0 and 1 badly
(0.26-0.48); from layer 1's own input it guesses 0.95.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from worker.config import ModelConfig
from worker.memory.expert_cache import ExpertCache
from worker.memory.kv_cache import KVCache
from worker.memory.weight_store import WeightStore
from worker.models.llama import AllReduce, RankModel, gated_mlp, rms_norm
from worker.shards.sharding import RankShard
from worker.shards.weights import MlpWeights, MoeWeights


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (T, k) and expert ids (T, k) of ``x`` (T, d) under ``router`` (E, d)."""
    probs = F.softmax(F.linear(x, router).float(), dim=-1)  # (T, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (T, k) each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


PREDICTORS = ("temporal", "router", "input", "adaptive", "union")


class Predictor:
    """Which experts an MoE layer will need, guessed ahead from three sources.

    Two guesses are made for layer ``n`` while the MoE layer before it routes, a whole block
    ahead: ``router``, layer ``n``'s router on that layer's residual stream (normed with ``n``'s
    MLP norm; routers and norms are tiny and stay resident even when their blocks stream), and
    ``temporal``, the experts layer ``n`` used at the previous step (the router's guess until
    the layer has run once). ``input`` is guessed later, when layer ``n`` starts: its router on
    the layer's own input, one attention block ahead. It is the surest of the three on a trained
    model (offline on the trained 8-layer Mixtral in bench/results: recall@2 0.91 against
    0.80 for ``router`` and 0.50 for ``temporal``; layer 1 is 0.95 against 0.48, because layer
    0's MoE output moves the residual stream a long way), but leaves the least time to read.

    Modes: ``router``, ``temporal`` and ``input`` use one source; ``union`` reads both early
    guesses. ``adaptive`` makes every guess and scores each against what the layer then uses;
    each layer follows the early source that has been right more often there (the router on a
    tie). Only where that source is unsure (right less than ``unsure_below`` of the time) and
    ``input`` has been right ``late_margin`` more often does the layer wait for ``input``. A layer
    whose chosen source is unsure also reads the other guesses available at that moment.

    A block of lead time is worth more than a few points of precision: on the trained tiny MoE
    (router 0.81, input 0.91), waiting for ``input`` wherever it was 0.1 surer left reads a
    block's compute less to hide under, and ungated ``router`` guesses decoded 1.29-1.47x on
    demand (2x cache) where ungated ``adaptive`` then did 0.95-0.98x (bench/moe_cache.py).
    """

    unsure_below = 0.7  # adaptive: a layer whose chosen guess is right less often reads the others too
    late_margin = 0.1  # adaptive: how much surer ``input`` must be than an unsure early guess to wait for it

    def __init__(self, routers: dict[int, torch.Tensor], norms: dict[int, torch.Tensor], eps: float, top_k: int,
                 mode: str = "temporal"):
        if mode not in PREDICTORS:
            raise ValueError(f"unknown expert predictor {mode!r}; choose from {PREDICTORS}")
        self.routers, self.norms, self.eps, self.top_k, self.mode = routers, norms, eps, top_k, mode
        self.moe_layers = sorted(routers)
        self.last_used: dict[int, set[int]] = {}  # layer -> experts it routed to at the last step
        self._guesses: dict[int, dict[str, set[int]]] = {}  # layer -> source -> its pending guess
        self._deferred: set[int] = set()  # adaptive: layers whose guess waits for their input
        # adaptive: layer -> its input (T, d), routed for the record only in ``observe``, once the
        # layer's misses are reading (routed at the layer's start, it kept the disk idle 1.6 ms a token)
        self._inputs: dict[int, torch.Tensor] = {}
        # adaptive's record: layer -> source -> [experts guessed right, experts guessed]
        self.record: dict[int, dict[str, list[int]]] = {}

    def observe(self, layer: int, used: set[int]) -> None:
        if (hidden := self._inputs.pop(layer, None)) is not None:  # the input guess, scored though not read
            self._guesses.setdefault(layer, {})["input"] = self._route(layer, hidden)
        for source, guess in self._guesses.pop(layer, {}).items():
            tally = self.record.setdefault(layer, {}).setdefault(source, [0, 0])
            tally[0] += len(guess & used)
            tally[1] += len(guess)
        self.last_used[layer] = used

    def next_layer(self, layer: int) -> int | None:
        """The MoE layer after ``layer``, wrapping to the first at the end (the next step)."""
        later = [m for m in self.moe_layers if m > layer]
        return later[0] if later else (self.moe_layers[0] if self.moe_layers else None)

    def _route(self, layer: int, hidden: torch.Tensor) -> set[int]:
        x = rms_norm(hidden, self.norms[layer], self.eps)
        _, experts = route(x, self.routers[layer], self.top_k, renormalize=False)
        return set(experts.flatten().tolist())  # a set of a list: torch.unique costs ~20 µs on a (T, k) tensor

    def predict(self, layer: int, hidden: torch.Tensor) -> set[int]:
        """The experts to read ahead now for ``layer``, from the residual stream ``hidden`` (T, d)
        of the MoE layer before it (a block ahead); empty when ``layer`` waits for its input."""
        if self.mode == "input":
            return set()
        previous = self.last_used.get(layer)
        if self.mode == "temporal" and previous is not None:
            return previous
        guesses = {"router": self._route(layer, hidden)} | ({"temporal": previous} if previous is not None else {})
        if self.mode == "adaptive":
            self._guesses[layer] = guesses
            return self._choose_early(layer, guesses)
        if self.mode == "union":
            return set().union(*guesses.values())
        return guesses["router"]  # router, or temporal before the layer has run

    def predict_at_input(self, layer: int, hidden: torch.Tensor) -> set[int]:
        """The experts to read ahead now for ``layer`` as it starts, from its input ``hidden``
        (T, d), beyond what ``predict`` named: the ``input`` guess where the mode or the layer's
        record says to wait for it, else nothing."""
        if self.mode not in ("input", "adaptive"):
            return set()
        if self.mode == "input":
            return self._route(layer, hidden)
        if layer not in self._deferred:  # nothing to read now: routed for the record later (``observe``)
            self._inputs[layer] = hidden
            return set()
        self._deferred.discard(layer)
        guess = self._guesses.setdefault(layer, {})["input"] = self._route(layer, hidden)
        if self._rate(layer, "input") < self.unsure_below:
            others = [g for source, g in self._guesses[layer].items() if source != "input"]
            return guess.union(*others)
        return guess

    def _rate(self, layer: int, source: str) -> float:
        right, guessed = self.record.get(layer, {}).get(source, (0, 0))
        return right / guessed if guessed else 0.0

    def _choose_early(self, layer: int, guesses: dict[str, set[int]]) -> set[int]:
        """adaptive, a block ahead: the early guess to read now, or nothing if ``layer`` waits."""
        scored = {source for source, (_, guessed) in self.record.get(layer, {}).items() if guessed}
        early = [source for source in guesses if source in scored]
        if not early:
            return guesses["router"]
        best = max(early, key=lambda source: (self._rate(layer, source), source == "router"))
        if ("input" in scored and self._rate(layer, best) < self.unsure_below
                and self._rate(layer, "input") > self._rate(layer, best) + self.late_margin):
            self._deferred.add(layer)
            return set()
        if self._rate(layer, best) < self.unsure_below:
            return set().union(*guesses.values())
        return guesses[best]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.routers.values(), *self.norms.values()])


class MoeRankModel(RankModel):
    def __init__(self, config: ModelConfig, shard: RankShard, store: WeightStore, kv_cache: KVCache,
                 allreduce: AllReduce, experts: ExpertCache, predictor: Predictor | None):
        super().__init__(config, shard, store, kv_cache, allreduce)
        self.experts = experts
        self.predictor = predictor
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for it

    def _mlp_class(self, layer: int) -> type[Any]:
        return MoeWeights if self.config.is_moe_layer(layer) else MlpWeights

    def _layer_start(self, layer: int, hidden: torch.Tensor) -> None:
        """Read ahead the experts the predictor guesses from this layer's input, one attention
        block before its MoE routes (``Predictor.predict_at_input``), and the earlier guesses for
        it that found no buffer then (``ExpertCache.prefetch_starved``)."""
        if self.predictor is None or not self.config.is_moe_layer(layer):
            return
        if late := self.predictor.predict_at_input(layer, hidden):
            self._predicted[layer] = self._predicted.get(layer, set()) | late
            self.experts.prefetch(layer, sorted(late))
        self.experts.prefetch_starved(layer)

    def _feed_forward(self, layer: int, w: Any, hidden: torch.Tensor) -> torch.Tensor:
        if not isinstance(w, MoeWeights):
            return super()._feed_forward(layer, w, hidden)
        cfg = self.config
        x = rms_norm(hidden, w.norm, cfg.rms_norm_eps)  # (T, d)
        weights, ids = route(x, w.router, cfg.experts_per_token, cfg.norm_topk_prob)  # (T, k) each
        needed = sorted(set(ids.flatten().tolist()))  # torch.unique's sorted order, without its ~20 µs
        early = not self.experts.evicts_next_layer_last  # the guess must be kept before the misses evict
        following = self._predict_next(layer, hidden, set(needed)) if early else None
        order = self.experts.begin_layer(layer, needed)  # this layer's misses start reading
        if not early:  # the guess's compute under the misses' reads, not before them (the disk idle meanwhile)
            following = self._predict_next(layer, hidden, set(needed))
        if following is not None:
            self.experts.prefetch(following, sorted(self._predicted[following]))  # behind the misses
        if x.shape[0] == 1:
            out = self._one_token_experts(layer, x, weights, ids, order, needed)
        else:
            out = self._experts(layer, x, weights, ids, order, needed)
        if w.shared_gate_up is not None and w.shared_down is not None and w.shared_gate is not None:
            shared = gated_mlp(x, w.shared_gate_up, w.shared_down)  # (T, d) partial
            out = out + torch.sigmoid(F.linear(x, w.shared_gate)) * shared  # gate (T, 1) is replicated
        return out

    def _predict_next(self, layer: int, hidden: torch.Tensor, used: set[int]) -> int | None:
        """Score the guesses for ``layer`` against ``used``, guess for the MoE layer that routes
        next from ``hidden`` (T, d) and keep its cached guessed experts (``ExpertCache.keep``).
        Returns that layer, or None without a predictor."""
        if layer in self._predicted:
            self.experts.record_prediction(layer, self._predicted.pop(layer), used)
        if self.predictor is None:
            return None
        self.predictor.observe(layer, used)
        if (following := self.predictor.next_layer(layer)) is not None:
            self._predicted[following] = self.predictor.predict(following, hidden)
            self.experts.keep(following, self._predicted[following])
        return following

    def _experts(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, order: list[int],
                 needed: list[int]) -> torch.Tensor:
        """The routed experts' weighted sum (T, d) for ``x`` (T, d), computed in ``order`` (as they
        land) and summed in ``needed``'s order whatever the cache held: the same bits in every run."""
        partial: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # expert -> (tokens (n,), weighted output (n, d))
        try:
            for expert in order:  # as they land
                tokens, slot = torch.where(ids == expert)  # (n,) each
                with self.experts.get(layer, expert) as e:
                    y = gated_mlp(x[tokens], e.w_gate_up, e.w_down)  # (n, d) partial
                partial[expert] = (tokens, y * weights[tokens, slot, None])
        finally:
            self.experts.end_layer()
        out = torch.zeros_like(x)  # (T, d) partial
        for expert in needed:
            out.index_add_(0, *partial[expert])
        return out

    def _one_token_experts(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                           order: list[int], needed: list[int]) -> torch.Tensor:
        """``_experts`` for one token (a decode step), with the same products and sums in the same
        order, so the same bits, without its per-expert token lookup (``torch.where``, gathers and
        ``index_add_``): about 0.15 ms of small tensor ops per layer on the trained tiny MoE, a
        tenth of a streamed token's compute there (bench/moe_breakdown.py)."""
        slots = ids[0].tolist()  # expert -> its slot among the token's k
        partial: dict[int, torch.Tensor] = {}  # expert -> weighted output (1, d)
        try:
            for expert in order:
                with self.experts.get(layer, expert) as e:
                    y = gated_mlp(x, e.w_gate_up, e.w_down)  # (1, d) partial
                partial[expert] = y * weights[:, slots.index(expert), None]  # (1, d) * (1, 1)
        finally:
            self.experts.end_layer()
        out = torch.zeros_like(x)  # (1, d) partial
        for expert in needed:
            out.add_(partial[expert])
        return out
