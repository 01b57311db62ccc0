"""Mixture-of-experts layers for one tensor-parallel rank (shared by Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE, whose MoE math is the same up to the fields their weights carry).

The router's weights are replicated, so every rank routes the full hidden state to the same
experts; each expert is split like a dense MLP (gate/up rows, down columns), so each rank's
routed sum is a partial of the exact output and the block's one allreduce adds them: MoE
adds no communication. Follows transformers' ``*SparseMoeBlock`` (eager experts): softmax
in fp32, top-k, optional renormalization, weights applied after ``down``.

Routed experts come from the rank's ``ExpertCache``. Right after layer ``l``'s routing, the
experts the next MoE layer will need are predicted and prefetched on the I/O thread while
layer ``l`` computes. Predictors (``PREDICTORS``, see ``Predictor``): ``router``, the next
layer's router applied to the current hidden state (EdgeMoE's), ``temporal``, the experts that
layer used at the previous step, ``adaptive``, per layer whichever of the two has been right more
often, and ``union``, both. bench/moe_cache.py measures them on a random and on a trained
Mixtral (scripts/train_tiny_moe.py). ``adaptive`` is the default (RankSpec.expert_predictor):
on the trained 4-layer model its recall is 0.64 against 0.61 (router) and 0.52 (temporal) for
the same number of reads, because the router guesses the later layers well (0.87-0.89) and the
first ones badly (0.35-0.41, the residual stream is still close to the token embedding), where
the previous step's experts do better (0.45-0.51). ``union`` reaches 0.77 for 1.5x the reads.
On random routers (no structure) temporal is best (0.83) and adaptive close behind (0.78).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.config import ModelConfig
from worker.expert_cache import ExpertCache
from worker.kv_cache import KVCache
from worker.models.llama import AllReduce, RankModel, gated_mlp, rms_norm
from worker.sharding import RankShard
from worker.weight_store import WeightStore
from worker.weights import Fields, MoeWeights, from_fields


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
    the layer has run once). ``adaptive``: both guesses are made and scored against what each
    layer then uses; each layer follows the one that has scored better there so far (the router
    on a tie). On a trained model the router is right far more often in the later layers and
    the temporal guess in the first ones, where the residual stream is still close to the token
    embedding. ``union``: both guesses together (more reads, higher recall).
    """

    def __init__(self, routers: dict[int, torch.Tensor], norms: dict[int, torch.Tensor], eps: float, top_k: int,
                 mode: str = "temporal"):
        if mode not in PREDICTORS:
            raise ValueError(f"unknown expert predictor {mode!r}; choose from {PREDICTORS}")
        self.routers, self.norms, self.eps, self.top_k, self.mode = routers, norms, eps, top_k, mode
        self.moe_layers = sorted(routers)
        self.last_used: dict[int, set[int]] = {}  # layer -> experts it routed to at the last step
        self._guesses: dict[int, dict[str, set[int]]] = {}  # layer -> source -> its pending guess
        # layer -> source -> right minus wrong experts of its guesses so far (adaptive's record)
        self.scores: dict[int, dict[str, int]] = {}

    def observe(self, layer: int, used: set[int]) -> None:
        for source, guess in self._guesses.pop(layer, {}).items():
            score = self.scores.setdefault(layer, {"router": 0, "temporal": 0})
            score[source] += len(guess & used) - len(guess - used)
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
        routed = self._route(layer, hidden)
        if self.mode in ("temporal", "router") or previous is None:
            return routed
        if self.mode == "union":
            return routed | previous
        self._guesses[layer] = {"router": routed, "temporal": previous}
        score = self.scores.get(layer, {})
        return previous if score.get("temporal", 0) > score.get("router", 0) else routed

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.routers.values(), *self.norms.values()])


class MoeRankModel(RankModel):
    def __init__(self, config: ModelConfig, shard: RankShard, store: WeightStore, kv_cache: KVCache,
                 allreduce: AllReduce, experts: ExpertCache, predictor: Predictor | None):
        super().__init__(config, shard, store, kv_cache, allreduce)
        self.experts = experts
        self.predictor = predictor
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for it

    def _feed_forward(self, layer: int, fields: Fields, hidden: torch.Tensor) -> torch.Tensor:
        if not self.config.is_moe_layer(layer):
            return super()._feed_forward(layer, fields, hidden)
        cfg = self.config
        w = from_fields(MoeWeights, fields)
        x = rms_norm(hidden, w.norm, cfg.rms_norm_eps)  # (T, d)
        weights, ids = route(x, w.router, cfg.experts_per_token, cfg.norm_topk_prob)  # (T, k) each
        needed = ids.unique().tolist()
        if layer in self._predicted:
            self.experts.record_prediction(self._predicted.pop(layer), set(needed))
        self.experts.begin_layer(layer, needed)
        if self.predictor is not None:
            self.predictor.observe(layer, set(needed))
        if self.predictor is not None and (following := self.predictor.next_layer(layer)) is not None:
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
