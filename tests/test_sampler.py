"""Sampling decisions are pure functions of logits, parameters and a seeded generator."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from server.sampler import SamplingParams, apply_penalties, finite_rows, make_generator, sample, token_logprob

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])


def _draws(params: SamplingParams, n: int = 400, seed: int = 0) -> Counter[int]:
    gen = make_generator(seed)
    return Counter(sample(LOGITS, params, gen) for _ in range(n))


def test_greedy_is_argmax() -> None:
    assert sample(LOGITS, SamplingParams(temperature=0.0), make_generator(0)) == 0


@pytest.mark.parametrize(("params", "allowed"), [
    (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
    (SamplingParams(temperature=1.0, top_p=0.5), {0}),  # p(0) ≈ 0.57 already covers 0.5
    (SamplingParams(temperature=1.0, top_p=0.8), {0, 1}),
    (SamplingParams(temperature=1.0, min_p=0.3), {0, 1}),  # p(1)/p(0) = e^-1 ≈ 0.37, p(2)/p(0) ≈ 0.22
])
def test_cuts_keep_only_allowed_tokens(params: SamplingParams, allowed: set[int]) -> None:
    drawn = _draws(params)
    assert set(drawn) == allowed


def test_seed_reproduces_and_temperature_flattens() -> None:
    params = SamplingParams(temperature=1.0)
    assert _draws(params, seed=3) == _draws(params, seed=3)
    hot = _draws(SamplingParams(temperature=2.0), n=2000)
    cold = _draws(SamplingParams(temperature=0.3), n=2000)
    assert hot[0] < cold[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    out = apply_penalties(LOGITS, SamplingParams(repetition_penalty=2.0), prompt=[0], output_counts=Counter({3: 1}))
    assert out.tolist() == [1.0, 1.0, 0.5, -2.0, -3.0]


def test_presence_and_frequency_penalties_count_output_tokens() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(LOGITS, params, prompt=[1], output_counts=Counter({0: 2, 2: 1}))
    assert out.tolist() == [2.0 - 0.5 - 0.5, 1.0, 0.5 - 0.5 - 0.25, -1.0, -3.0]
    assert torch.equal(LOGITS, torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])), "input must not be modified"


def test_logprobs_are_the_model_distribution() -> None:
    entry = token_logprob(LOGITS, token=2, top=2)
    expected = torch.log_softmax(LOGITS, -1)
    assert entry.logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in entry.top] == [0, 1]
    assert token_logprob(LOGITS, token=1, top=0).top == []


def test_every_bit_of_a_64_bit_seed_counts() -> None:
    """torch's CPU generator keeps 32 bits of a seed: 0, 2**32, 2**62 and -2**62 drew alike."""
    seeds = [0, 2**32, 2**62, -2**62, -2**63, 2**63 - 1, -1]
    draws = [tuple(torch.rand(8, generator=make_generator(s)).tolist()) for s in seeds]
    assert len(set(draws)) == len(seeds)
    # seeds below 2**32 draw as they always did
    assert torch.equal(torch.rand(8, generator=make_generator(12345)),
                       torch.rand(8, generator=torch.Generator().manual_seed(12345)))


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-30, 1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy_not_a_nan(temperature: float) -> None:
    """logits / 1e-38 overflowed to inf, softmax gave NaN and the request failed with a 500."""
    assert set(_draws(SamplingParams(temperature=temperature), n=20)) == {0}
    tied = torch.tensor([3.0, 3.0, -1.0])  # a tie stays a fair draw between the tied tokens
    gen = make_generator(0)
    assert {sample(tied, SamplingParams(temperature=temperature), gen) for _ in range(64)} == {0, 1}


def test_a_tiny_repetition_penalty_keeps_the_logits_finite() -> None:
    """2.0 / 1e-45 is inf in float32; softmax of inf is NaN."""
    out = apply_penalties(LOGITS, SamplingParams(repetition_penalty=1e-45), prompt=[0, 4], output_counts=Counter())
    assert out.isfinite().all() and int(out.argmax()) == 0
    assert set(_draws_from(out, SamplingParams(temperature=1.0, repetition_penalty=1e-45))) == {0}


def _draws_from(logits: torch.Tensor, params: SamplingParams, n: int = 50) -> Counter[int]:
    gen = make_generator(0)
    return Counter(sample(logits, params, gen) for _ in range(n))


def test_finite_rows_is_the_elementwise_check() -> None:
    rows = torch.randn(8, 8000)
    rows[1, 17] = float("nan")
    rows[2, 0] = float("inf")
    rows[3, 7999] = float("-inf")
    rows[4] = 3e38  # finite logits whose sum overflows to inf
    rows[5, ::2], rows[5, 1::2] = 3e38, -3e38  # ... or to inf - inf = NaN
    rows[6, 5], rows[6, 6] = float("inf"), float("-inf")
    expected = torch.isfinite(rows).all(dim=-1).tolist()
    assert expected == [True, False, False, False, True, True, False, True]
    assert finite_rows(rows) == expected
    assert finite_rows(rows[[0, 7]]) == [True, True]  # the sums alone decide


def test_greedy_picks_the_first_of_equal_maxima_as_torch_argmax_does() -> None:
    gen = make_generator(0)
    with torch.inference_mode():  # as the engine's logits are
        rows = torch.randint(-3, 4, (64, 50)).float()  # many ties
    for row in rows:
        assert sample(row, SamplingParams(temperature=0.0), gen) == int(torch.argmax(row))
    assert sample(torch.tensor([1.0, 5.0, 5.0, 2.0]), SamplingParams(temperature=0.0), gen) == 1
