"""What to send and when: prompts of a given length, sampled lengths, Poisson arrival times.

Everything here is a pure function of its arguments and a seeded ``random.Random``, so the
same seed sends the same prompts, lengths and arrival times to every server being compared.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Common English words that are one token each (with their leading space) in the usual BPE
# vocabularies (Llama 2/3, Mistral, Qwen2, GPT-2). A prompt of N words is then about N tokens
# on those models; `fit_prompt` makes it exact when the tokenizer is at hand.
_WORD_TEXT = """
the of and to in is that for it as was with be by on not he this are or his from at which but
have an had they you were their one all we can her has there been if more when will would who so
no time people year way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number
night point home water room mother area money story fact month lot right study book eye job word
business issue side kind head house service friend father power hour game line end member law car
city community name president team minute idea kid body information back parent face others level
office door health person art war history party result change morning reason research girl guy
moment air teacher force education light river music tree bird dog cat horse garden table window
road street bridge train ship plane letter paper color sound voice song dance picture field farm
market store price bank plan rule court king queen army church center land sea sky sun moon star
rain snow wind fire stone wood gold iron glass bread milk food meal dinner heart mind love fear
hope dream truth fact idea speed size shape weight age height west east north south summer winter
spring fall cold warm hot long short small large great old new young early late good bad high low
open close quick slow simple hard easy clear full empty free safe
"""
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))


@dataclass(frozen=True)
class LengthSpec:
    """Token lengths drawn uniformly from the half-open range ``[low, high)``; ``high == low + 1`` is fixed."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high <= self.low:
            raise ValueError(f"a length range needs 1 <= low < high, got [{self.low}, {self.high})")

    @classmethod
    def fixed(cls, n: int) -> LengthSpec:
        return cls(n, n + 1)

    @classmethod
    def parse_range(cls, text: str) -> LengthSpec:
        """``"32:256"`` is ``[32, 256)``: 32 to 255 tokens."""
        low, sep, high = text.partition(":")
        if not sep:
            raise ValueError(f"a length range is LOW:HIGH (half-open), got {text!r}")
        return cls(int(low), int(high))

    def describe(self) -> str:
        return str(self.low) if self.high == self.low + 1 else f"[{self.low}, {self.high})"


@dataclass(frozen=True)
class RequestSpec:
    """One request of the workload: its prompt and the lengths it asks for."""

    index: int
    prompt: str
    input_len: int  # the requested prompt length in tokens (approximate without a tokenizer)
    output_len: int  # sent as max_tokens


def sample_lengths(spec: LengthSpec, n: int, rng: random.Random) -> list[int]:
    """``n`` lengths uniform in ``[spec.low, spec.high)``."""
    return [rng.randrange(spec.low, spec.high) for _ in range(n)]


def poisson_arrivals(rate: float, n: int, rng: random.Random) -> list[float]:
    """Send times in seconds of ``n`` requests of a Poisson process of ``rate`` per second.

    The first request is sent at 0; the gaps between requests are exponential with mean
    ``1 / rate``, so over many requests ``(n - 1) / arrivals[-1]`` tends to ``rate``.
    """
    if rate <= 0:
        raise ValueError(f"the rate must be positive, got {rate}")
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(rate)
    return arrivals


def random_words(n: int, rng: random.Random) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def fit_prompt(words: Sequence[str], target: int, count_tokens: Callable[[str], int]) -> str:
    """The longest prefix of ``words`` (joined by spaces) with at most ``target`` tokens.

    ``count_tokens`` is assumed non-decreasing in the number of words (true of BPE tokenizers
    on space-separated words). A binary search calls it about ``log2(len(words))`` times.
    """
    lo, hi = 0, len(words)  # invariant: words[:lo] fits; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(words[:mid])) <= target:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def build_prompt(n_tokens: int, rng: random.Random, count_tokens: Callable[[str], int] | None = None) -> str:
    """A prompt of random real words: ``n_tokens`` words, or exactly ``n_tokens`` tokens if a counter is given."""
    if count_tokens is None:
        return " ".join(random_words(n_tokens, rng))
    words = random_words(n_tokens, rng)
    for _ in range(8):  # a tokenizer that packs several words per token needs more words
        if count_tokens(" ".join(words)) >= n_tokens:
            break
        words += random_words(len(words), rng)
    return fit_prompt(words, n_tokens, count_tokens)


def make_workload(n: int, input_len: LengthSpec, output_len: LengthSpec, seed: int,
                  count_tokens: Callable[[str], int] | None = None, first_index: int = 0,
                  stream: str = "measured") -> list[RequestSpec]:
    """``n`` requests with lengths and prompts drawn from ``seed``.

    Lengths and prompts use separate random streams (so changing a length range keeps the words),
    and ``stream`` names another pair of streams (the warm-up requests use their own).
    """
    length_rng = random.Random(f"{stream}-lengths-{seed}")
    prompt_rng = random.Random(f"{stream}-prompts-{seed}")
    ins = sample_lengths(input_len, n, length_rng)
    outs = sample_lengths(output_len, n, length_rng)
    return [RequestSpec(first_index + i, build_prompt(ins[i], prompt_rng, count_tokens), ins[i], outs[i])
            for i in range(n)]


def tokenizer_counter(path: str) -> Callable[[str], int]:
    """A token counter from a Hugging Face ``tokenizer.json`` (or a directory holding one)."""
    from pathlib import Path

    from tokenizers import Tokenizer

    p = Path(path)
    tok = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
