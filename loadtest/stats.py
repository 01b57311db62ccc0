"""Aggregate request results into the report's numbers. Pure functions, no I/O."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loadtest.client import RequestResult

PERCENTILES = (50, 90, 99)
MS = 1000.0


@dataclass(frozen=True)
class SLO:
    """Latency targets in milliseconds; None means no target. A request meets the SLO when it
    succeeded and meets every target given: its TTFT, its mean inter-token latency, its end-to-end
    latency."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None

    def given(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile is in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def describe(values: Sequence[float], scale: float = 1.0) -> dict[str, Any]:
    """``n``, ``mean`` and the percentiles of ``values``, each multiplied by ``scale``; None when empty."""
    scaled = [v * scale for v in values]
    out: dict[str, Any] = {"n": len(scaled), "mean": _round(sum(scaled) / len(scaled)) if scaled else None}
    for q in PERCENTILES:
        out[f"p{q}"] = _round(percentile(scaled, q))
    return out


def meets_slo(r: RequestResult, slo: SLO) -> bool:
    if not r.ok:
        return False
    if slo.ttft_ms is not None and (r.ttft_s is None or r.ttft_s * MS > slo.ttft_ms):
        return False
    itl = r.mean_itl_s
    if slo.itl_ms is not None and itl is not None and itl * MS > slo.itl_ms:
        return False
    return not (slo.e2e_ms is not None and (r.e2e_s is None or r.e2e_s * MS > slo.e2e_ms))


def count_failures(results: Sequence[RequestResult]) -> dict[str, int]:
    """Failed requests by kind, kinds sorted."""
    counts = Counter(r.failure or "unknown" for r in results if not r.ok)
    return dict(sorted(counts.items()))


def _per_second(count: float, elapsed_s: float) -> float | None:
    return _round(count / elapsed_s) if elapsed_s > 0 else None


def summarize(results: Sequence[RequestResult], elapsed_s: float, slo: SLO = SLO()) -> dict[str, Any]:
    """The report of one measured phase. Latencies are over succeeded requests; the inter-token
    latencies of all requests are pooled; rates divide by ``elapsed_s``."""
    ok = [r for r in results if r.ok]
    out_tokens = [r.output_tokens for r in ok]
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok and r.failure and r.failure not in examples:
            examples[r.failure] = r.error or ""
    good = sum(meets_slo(r, slo) for r in results) if slo.given() else None
    return {
        "requests": {"sent": len(results), "succeeded": len(ok), "failed": len(results) - len(ok)},
        "elapsed_s": _round(elapsed_s),
        "requests_per_s": _per_second(len(ok), elapsed_s),
        "output_tokens_per_s": _per_second(sum(out_tokens), elapsed_s),
        "goodput_requests_per_s": None if good is None else _per_second(good, elapsed_s),
        "slo_attainment": None if good is None or not results else _round(good / len(results), 4),
        "slo": slo.given(),
        "output_tokens": {"total": sum(out_tokens), **describe(out_tokens),
                          "from_usage": sum(r.usage_output_tokens is not None for r in ok)},
        "prompt_tokens": {"total": sum(prompt_tokens), **describe(prompt_tokens)},
        "ttft_ms": describe([r.ttft_s for r in ok if r.ttft_s is not None], MS),
        "itl_ms": describe([gap for r in ok for gap in r.itl_s], MS),
        "tpot_ms": describe([t for r in ok if (t := r.tpot_s) is not None], MS),
        "e2e_ms": describe([r.e2e_s for r in ok if r.e2e_s is not None], MS),
        "failures": count_failures(results),
        "failure_examples": examples,
    }


def request_record(r: RequestResult) -> dict[str, Any]:
    """One request in the JSON report (its inter-token gaps summarized, not listed)."""
    tpot = r.tpot_s
    return {
        "index": r.index, "ok": r.ok, "failure": r.failure, "start_s": _round(r.start_s, 4),
        "input_len": r.input_len, "prompt_tokens": r.prompt_tokens,
        "requested_output_tokens": r.output_len, "output_tokens": r.output_tokens,
        "output_tokens_from": "usage" if r.usage_output_tokens is not None else "chunks",
        "chunks": r.chunks, "finish_reason": r.finish_reason,
        "ttft_ms": _round(None if r.ttft_s is None else r.ttft_s * MS),
        "e2e_ms": _round(None if r.e2e_s is None else r.e2e_s * MS),
        "tpot_ms": _round(None if tpot is None else tpot * MS),
        "itl_max_ms": _round(max(r.itl_s) * MS if r.itl_s else None),
    }
