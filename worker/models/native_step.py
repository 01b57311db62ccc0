"""A rank's decode step in one native call (``worker/kernels/step.c``): all its dense Llama-family
layers, the two allreduces per layer included, with no Python between them.

Why: at two ranks each allreduce waits for the slower rank, and a rank running its layers in
Python spends about 12 interpreter-dispatched kernel calls per layer between allreduces; the
step in C composes the same kernels, called as ``worker.models.llama`` calls them, so its output
is the same bits.

Python builds the per-layer descriptors once (``attach``: weight, scale, bias and KV-cache
addresses, dims) and keeps every step the native step does not cover: prefill chunks, models
with hooks (q/k norms, MoE), streamed weights (the sliding window), bf16 caches, steps whose
allreduces are not one C call (ZeroMQ, fp16/bf16 sync). On lanes with fp32 or int8 sync every
rank runs it: the 2-rank exchange (``lane_allreduce_f32`` / ``_q8``), a star's workers (the same
call, answered by a REDUCED) and a star's hub (``lane_hub_allreduce_f32`` / ``_q8``: every
worker's partial at once, summed in rank order). int8 payloads are quantized and summed in C with
the float operations of ``worker.comm.wire``, so a rank in C and a rank in Python agree to the
bit. The log says which path a rank takes, and why, once per reason. ``EDGELLM_NATIVE_STEP=0``
turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import Protocol

import torch

from worker.kernels import native
from worker.kernels.quant import Weight
from worker.memory.weight_store import ResidentStore
from worker.models.llama import RankModel
from worker.rank.step import StepPlan
from worker.shards.weights import AttentionWeights, MlpWeights

log = logging.getLogger(__name__)

DISABLE_ENV = "EDGELLM_NATIVE_STEP"  # "0": every step runs layer by layer from Python
_P, _I32 = ctypes.c_void_p, ctypes.c_int32
_F32, _INT8, _INT4 = 0, 1, 2  # step.c's WEIGHT_* kinds
# RankModel's methods a family may override; one that does computes something step.c does not
_HOOKS = ("forward", "_layer_start", "_qkv_hook", "_attention", "_mlp_class", "_feed_forward")


class StepMatrix(ctypes.Structure):
    _fields_ = [("w", _P), ("scales", _P), ("bias", _P), ("kind", _I32), ("group", _I32), ("n", _I32), ("k", _I32)]


class StepLayer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), ("qkv", StepMatrix), ("o", StepMatrix),
                ("gate_up", StepMatrix), ("down", StepMatrix), ("k_cache", _P), ("v_cache", _P)]


class StepModel(ctypes.Structure):
    _fields_ = [("layers", _P), ("num_layers", _I32), ("d", _I32), ("qh", _I32), ("kh", _I32), ("hd", _I32),
                ("ffn", _I32), ("max_len", _I32), ("window", _I32), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("cos", _P), ("signed_sin", _P), ("allreduce", _P), ("allreduce_ctx", _P)]


class NativeLink(Protocol):
    """What a step needs of its data plane (``StarRank`` and ``StarHub`` have it)."""

    def native_allreduce(self, width: int) -> tuple[int, int] | None: ...
    def native_seqs(self, count: int) -> int: ...
    def native_failed(self, rc: int, partial: torch.Tensor, seq: int) -> None: ...


class Unsupported(ValueError):
    """A model, weight or step the native step does not compute."""


def _matrix(w: Weight, bias: torch.Tensor | None, keep: list[torch.Tensor]) -> StepMatrix:
    """The descriptor of one weight as ``quant.linear`` would compute it natively."""
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise Unsupported(f"a {bias.dtype} bias")
    if isinstance(w, torch.Tensor):
        if w.dtype != torch.float32 or not w.is_contiguous():
            raise Unsupported(f"{w.dtype} weights")
        tensors, kind, group, scales = [w], _F32, 0, None
    elif w.torch_layout or w.tail is not None or w.scales.dtype != torch.bfloat16 or not w.weight.is_contiguous() \
            or not w.scales.is_contiguous():
        raise Unsupported("int4 weights in torch's layout")
    else:
        tensors, kind, group, scales = [w.weight, w.scales], _INT4 if w.group_size else _INT8, w.group_size, w.scales
    keep.extend(t for t in (*tensors, bias) if t is not None)
    n, k = w.shape
    return StepMatrix(tensors[0].data_ptr(), scales.data_ptr() if scales is not None else None,
                      bias.data_ptr() if bias is not None else None, kind, group, n, k)


def _layer(model: RankModel, layer: int, keep: list[torch.Tensor]) -> StepLayer:
    with model.store.attention(layer) as a, model.store.mlp(layer, MlpWeights) as m:
        attn: AttentionWeights = a
        if attn.q_norm is not None or attn.k_norm is not None:
            raise Unsupported("q/k norms")
        for norm in (attn.norm, m.norm):
            if norm.dtype != torch.float32 or not norm.is_contiguous():
                raise Unsupported(f"{norm.dtype} norms")
            keep.append(norm)
        k_cache, v_cache = model.kv.k[layer], model.kv.v[layer]  # (slots, kh, max_len, hd) each
        return StepLayer(attn.norm.data_ptr(), m.norm.data_ptr(), _matrix(attn.wqkv, attn.bqkv, keep),
                         _matrix(attn.wo, attn.bo, keep), _matrix(m.w_gate_up, m.b_gate_up, keep),
                         _matrix(m.w_down, m.b_down, keep), k_cache.data_ptr(), v_cache.data_ptr())


def _check_model(model: RankModel) -> None:
    if overridden := [h for h in _HOOKS if getattr(type(model), h) is not getattr(RankModel, h)]:
        raise Unsupported(f"{type(model).__name__} overrides {', '.join(overridden)} (MoE, q/k norms)")
    if not isinstance(model.store, ResidentStore):
        raise Unsupported("the weights are streamed (sliding window): each block is held only while it computes")
    if model._token_attention is None:
        raise Unsupported("no native token attention (a non-fp32 KV cache or no native kernels)")
    if not (model.kv.k.is_contiguous() and model.kv.v.is_contiguous()):
        raise Unsupported("a non-contiguous KV cache")


class NativeStep:
    """The descriptors of one rank's layers, and the call that runs a decode step on them."""

    def __init__(self, kernel: native.StepKernel, model: RankModel, link: NativeLink, who: str,
                 on_allreduces: Callable[[list[float]], None] | None):
        self._kernel, self._model, self._link, self._who = kernel, model, link, who
        self._on_allreduces = on_allreduces
        self._keep: list[torch.Tensor] = [model.rope_cos, model.rope_sin]  # what the descriptors point into
        config, shard = model.config, model.shard
        self._layers = (StepLayer * config.num_layers)(*(_layer(model, i, self._keep)
                                                         for i in range(config.num_layers)))
        ffn = self._layers[0].down.k if config.num_layers else 0
        self._struct = StepModel(ctypes.addressof(self._layers), config.num_layers, config.hidden_size,
                                 shard.num_q_heads, shard.num_kv_heads, config.head_dim, ffn, model.kv.max_len,
                                 config.sliding_window or 0, config.rms_norm_eps, model.scale,
                                 model.rope_cos.data_ptr(), model.rope_sin.data_ptr(), None, None)
        self._said: set[str] = set()
        self.steps = 0  # decode steps run natively
        self.resumed = 0  # allreduces that returned to Python (a wait past the C call's slice) and went on

    def _python(self, why: str) -> torch.Tensor | None:
        """None (the step runs in Python), saying why the first time."""
        if why not in self._said:
            self._said.add(why)
            log.info("%s: some steps run layer by layer in Python: %s", self._who, why)
        return None

    def run(self, hidden: torch.Tensor, plan: StepPlan) -> torch.Tensor | None:
        """The final hidden states (B, d) of a decode step on ``hidden`` (B, d), or None where
        this step is not one the native step computes (the caller runs it in Python)."""
        batch = hidden.shape[0]
        if plan.token_slots is None or hidden.dtype != torch.float32 or hidden.dim() != 2:
            return self._python("prefill steps (the native step takes one new fp32 token per sequence)")
        if batch > native.F32_MAX_ROWS or not self._model._attends_tokens_natively(plan):
            return self._python(f"batches over {native.F32_MAX_ROWS} rows or outside the KV cache")
        if (allreduce := self._link.native_allreduce(self._struct.d)) is None:
            return self._python("steps whose allreduces are not one C call (ZeroMQ, fp16/bf16 sync)")
        return self._run(hidden, plan, batch, allreduce)

    def _run(self, hidden: torch.Tensor, plan: StepPlan, batch: int, allreduce: tuple[int, int]) -> torch.Tensor:
        self._struct.allreduce, self._struct.allreduce_ctx = allreduce
        stages = 2 * self._struct.num_layers
        out = hidden.clone(memory_format=torch.contiguous_format)  # (B, d), summed into in place
        scratch = torch.empty(self._kernel.scratch_floats(ctypes.byref(self._struct), batch))
        partial = scratch[:out.numel()].view_as(out)  # (B, d): a failed allreduce's own partial
        waited = torch.zeros(stages, dtype=torch.int64)  # ns in each allreduce
        seq = self._link.native_seqs(stages) if allreduce[0] else 0
        slots, positions = plan.token_slots, plan.positions  # (B,) int64 each
        assert slots is not None
        failed, first = ctypes.c_int(0), 0
        threads = torch.get_num_threads()
        while rc := self._kernel.run(ctypes.byref(self._struct), out.data_ptr(), batch, slots.data_ptr(),
                                     positions.data_ptr(), scratch.data_ptr(), first, seq, threads,
                                     ctypes.byref(failed), waited.data_ptr()):
            self._link.native_failed(rc, partial, seq + failed.value)  # raises, or sums into partial
            out += partial
            first = failed.value + 1
            self.resumed += 1
        self.steps += 1
        if self._on_allreduces is not None and allreduce[0]:
            self._on_allreduces([ns * 1e-9 for ns in waited.tolist()])
        return out


def attach(model: RankModel, link: NativeLink, who: str,
           on_allreduces: Callable[[list[float]], None] | None = None) -> None:
    """Give ``model`` a native decode step where it can have one (``model.native_step``); log
    which path its decode steps take. ``on_allreduces`` gets the seconds of each allreduce."""
    try:
        if os.environ.get(DISABLE_ENV, "1") == "0":
            raise Unsupported(f"{DISABLE_ENV}=0")
        if (kernel := native.decode_step()) is None:
            raise Unsupported("no native kernels on this machine")
        _check_model(model)
        model.native_step = NativeStep(kernel, model, link, who, on_allreduces)
    except Unsupported as exc:
        model.native_step = None
        log.info("%s: decode steps run layer by layer in Python: %s", who, exc)
        return
    log.info("%s: decode steps run natively, all layers in one call (kernels/step.c)", who)
