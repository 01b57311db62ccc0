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
layer used at the previous step, ``union``, both, and ``adaptive``, per layer whichever of the
two has been right more often, or both where neither is often right. bench/moe_cache.py measures them on a random and on a trained
Mixtral (scripts/train_tiny_moe.py). ``adaptive`` is the default (RankSpec.expert_predictor):
on trained models the router guesses the later layers well (0.87-0.97 recall) and the first ones
badly (0.27-0.50), where the previous step's experts do a little better and both together best.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from worker.config import ModelConfig
from worker.expert_cache import ExpertCache
from worker.kv_cache import KVCache
from worker.models.llama import AllReduce, RankModel, gated_mlp, rms_norm
from worker.sharding import RankShard
from worker.weight_store import WeightStore
from worker.weights import MlpWeights, MoeWeights


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (T, k) and expert ids (T, k) of ``x`` (T, d) under ``router`` (E, d)."""
    probs = F.softmax(F.linear(x, router).float(), dim=-1)  # (T, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (T, k) each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


PREDICTORS = ("temporal", "router", "adaptive", "union")


class Predictor:
    """Which experts an MoE layer will need, predicted one layer ahead.

    ``router``: layer ``l+1``'s router on layer ``l``'s residual stream (normed with ``l+1``'s
    MLP norm); routers and norms are tiny and stay resident even when their blocks stream.
    ``temporal``: the experts layer ``l+1`` used at the previous step (the router's guess until
    the layer has run once). ``union``: both guesses together. ``adaptive``: both guesses are
    made and scored against what each layer then uses; each layer follows the one that has been
    right more often there (the router on a tie), or takes both while even the better one is
    right less than ``unsure_below`` of the time. On a trained model the router is right far
    more often in the later layers, and neither is good in the first ones, where the residual
    stream is still close to the token embedding.
    """

    unsure_below = 0.7  # adaptive: a layer whose better guess is right less often reads both

    def __init__(self, routers: dict[int, torch.Tensor], norms: dict[int, torch.Tensor], eps: float, top_k: int,
                 mode: str = "temporal"):
        if mode not in PREDICTORS:
            raise ValueError(f"unknown expert predictor {mode!r}; choose from {PREDICTORS}")
        self.routers, self.norms, self.eps, self.top_k, self.mode = routers, norms, eps, top_k, mode
        self.moe_layers = sorted(routers)
        self.last_used: dict[int, set[int]] = {}  # layer -> experts it routed to at the last step
        self._guesses: dict[int, dict[str, set[int]]] = {}  # layer -> source -> its pending guess
        # adaptive's record: layer -> source -> [experts guessed right, experts guessed]
        self.record: dict[int, dict[str, list[int]]] = {}

    def observe(self, layer: int, used: set[int]) -> None:
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
        return set(experts.unique().tolist())

    def predict(self, layer: int, hidden: torch.Tensor) -> set[int]:
        previous = self.last_used.get(layer)
        if self.mode == "temporal" and previous is not None:
            return previous
        guesses = {"router": self._route(layer, hidden)} | ({"temporal": previous} if previous is not None else {})
        if self.mode == "adaptive":
            self._guesses[layer] = guesses
            return self._choose(layer, guesses)
        if self.mode == "union":
            return set().union(*guesses.values())
        return guesses["router"]  # router, or temporal before the layer has run

    def _choose(self, layer: int, guesses: dict[str, set[int]]) -> set[int]:
        rates = {source: right / guessed for source, (right, guessed) in self.record.get(layer, {}).items()
                 if guessed and source in guesses}
        if not rates:
            return guesses["router"]
        best = max(rates, key=lambda source: (rates[source], source == "router"))
        if rates[best] < self.unsure_below:
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

    def _feed_forward(self, layer: int, w: Any, hidden: torch.Tensor) -> torch.Tensor:
        if not isinstance(w, MoeWeights):
            return super()._feed_forward(layer, w, hidden)
        cfg = self.config
        x = rms_norm(hidden, w.norm, cfg.rms_norm_eps)  # (T, d)
        weights, ids = route(x, w.router, cfg.experts_per_token, cfg.norm_topk_prob)  # (T, k) each
        needed = ids.unique().tolist()
        used = set(needed)
        if layer in self._predicted:
            self.experts.record_prediction(self._predicted.pop(layer), used)
        self.experts.begin_layer(layer, needed)
        if self.predictor is not None:
            self.predictor.observe(layer, used)
            if (following := self.predictor.next_layer(layer)) is not None:
                self._predicted[following] = self.predictor.predict(following, hidden)
                self.experts.prefetch(following, sorted(self._predicted[following]))
        out = torch.zeros_like(x)  # (T, d) partial
        try:
            for expert in needed:
                tokens, slot = torch.where(ids == expert)  # (n,) each
                with self.experts.get(layer, expert) as e:
                    y = gated_mlp(x[tokens], e.w_gate_up, e.w_down)  # (n, d) partial
                out.index_add_(0, tokens, y * weights[tokens, slot, None])
        finally:
            self.experts.end_layer()
        if w.shared_gate_up is not None and w.shared_down is not None and w.shared_gate is not None:
            shared = gated_mlp(x, w.shared_gate_up, w.shared_down)  # (T, d) partial
            out = out + torch.sigmoid(F.linear(x, w.shared_gate)) * shared  # gate (T, 1) is replicated
        return out
