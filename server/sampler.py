"""Next-token choice from logits: penalties, then greedy or temperature / top-k / top-p / min-p
sampling, plus the log-probabilities clients ask for.

Penalties follow the usual definitions: presence and frequency penalties (OpenAI) count
generated tokens; the repetition penalty (CTRL, as in transformers) covers prompt and output.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's plus the top k
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first


def seed_bits(seed: int) -> int:
    """The 32 bits torch's CPU generator (a Mersenne twister) keeps of a 64-bit ``seed``: it
    ignored the high half, so 0, 2**32 and 2**62 sampled alike. The high half is mixed into the
    low one (seeds below 2**32 keep their meaning)."""
    bits = seed & 0xFFFF_FFFF_FFFF_FFFF  # an int64 seed as its two's-complement bits
    high = bits >> 32  # murmur3's 32-bit finalizer: a bijection with 0 -> 0
    high = ((high ^ (high >> 16)) * 0x85EB_CA6B) & 0xFFFF_FFFF
    high = ((high ^ (high >> 13)) * 0xC2B2_AE35) & 0xFFFF_FFFF
    return (bits & 0xFFFF_FFFF) ^ high ^ (high >> 16)


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed_bits(seed))
    return gen


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int],
                    output_counts: Counter[int]) -> torch.Tensor:
    """Penalized copy of ``logits`` (V,)."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output_counts)), dtype=torch.long)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                   picked * params.repetition_penalty)
    if output_counts and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(list(output_counts), dtype=torch.long)
        counts = torch.tensor(list(output_counts.values()), dtype=logits.dtype)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    # A tiny repetition_penalty (any > 0 is valid) divides a logit past float32's range: inf
    # would make softmax NaN and the request fail.
    big = torch.finfo(logits.dtype).max
    return logits.clamp_(-big, big)


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row of ``logits`` (S, V) is free of NaN and infinities, as
    ``torch.isfinite(logits).all(dim=-1)`` says, computed by numpy on the same memory: once per
    step, after the step's weights have pushed torch's dispatch out of the caches, torch's three
    calls took 140-185 µs of the engine thread at V = 8000, numpy's about 50 (``bench/token_profile.py``)."""
    if (array := _numpy(logits)) is None:
        return torch.isfinite(logits).all(dim=-1).tolist()
    return np.isfinite(array).all(axis=-1).tolist()


def _numpy(t: torch.Tensor) -> np.ndarray | None:
    """``t``'s memory as a numpy array where numpy computes as torch does (float32, no autograd)."""
    return t.numpy() if t.dtype == torch.float32 and not t.requires_grad and t.device.type == "cpu" else None


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick one token from ``logits`` (V,) float32 (penalties already applied)."""
    if params.greedy:
        # numpy's argmax, like torch's, returns the first of equal maxima: the same token, in
        # 35 µs instead of 55 after a step (see ``finite_rows``)
        return int(torch.argmax(logits)) if (array := _numpy(logits)) is None else int(array.argmax())
    # Shifted so that the largest is 0 before dividing: a tiny temperature (1e-38 is valid) then
    # gives 0 and -inf, i.e. greedy, where logits / temperature overflowed to inf and NaN. One
    # under float32's smallest normal (1e-300) would round to 0 in float32 and give 0/0 = NaN for
    # the largest: it divides by that smallest normal instead, the same greedy draw (ties stay fair).
    logits = (logits - logits.max()) / max(params.temperature, torch.finfo(torch.float32).tiny)
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p * sorted_probs.sum()
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Log-probability of ``token`` and the ``top`` most likely tokens, under the model's
    unmodified distribution (before penalties and temperature), as vLLM reports them."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top > 0 else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), pairs)
