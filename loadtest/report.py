"""Presenting a run: the short human summary, and the PNG of a rate sweep."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:.1f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def _latency_line(name: str, d: dict[str, Any]) -> str:
    return (f"  {name:<5} mean {_fmt(d['mean'])}  p50 {_fmt(d['p50'])}  p90 {_fmt(d['p90'])}  "
            f"p99 {_fmt(d['p99'])} ms  (n={d['n']})")


def human_summary(run: dict[str, Any]) -> str:
    """A few lines for the terminal: load, throughput, latencies, failures."""
    cfg, s = run["config"], run["summary"]
    load = f"concurrency {cfg['concurrency']}" if cfg["mode"] == "closed" else f"rate {cfg['rate']}/s"
    req = s["requests"]
    lines = [
        f"{cfg['mode']} loop, {load}, {cfg['endpoint']} on {cfg['url']} ({cfg['model']})",
        f"  requests {req['succeeded']}/{req['sent']} ok in {_fmt(s['elapsed_s'])} s "
        f"(stopped by {s['stopped_by']}); {_fmt(s['requests_per_s'])} req/s, "
        f"{_fmt(s['output_tokens_per_s'])} output tok/s",
        _latency_line("TTFT", s["ttft_ms"]),
        _latency_line("ITL", s["itl_ms"]),
        _latency_line("TPOT", s["tpot_ms"]),
        _latency_line("E2E", s["e2e_ms"]),
    ]
    if s["slo"]:
        targets = ", ".join(f"{k} {v:g}" for k, v in s["slo"].items())
        share = None if s["slo_attainment"] is None else 100 * s["slo_attainment"]
        lines.append(f"  goodput {_fmt(s['goodput_requests_per_s'])} req/s meeting {targets} "
                     f"({_fmt(share, '%')} of requests)")
    if s["failures"]:
        lines.append("  failures " + ", ".join(f"{k}: {v}" for k, v in s["failures"].items()))
        for kind, message in s["failure_examples"].items():
            lines.append(f"    {kind}: {message[:160]}")
    return "\n".join(lines) + "\n"


def _series(runs: Sequence[dict[str, Any]], metric: str, stat: str, scale: float = 1.0) -> list[float]:
    out = []
    for run in runs:
        value = run["summary"][metric][stat] if stat else run["summary"][metric]
        out.append(math.nan if value is None else value * scale)
    return out


def plot_sweep(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Latency (TTFT, ITL, end-to-end) and throughput against the offered request rate, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; writes files only
    import matplotlib.pyplot as plt

    rates = [run["config"]["rate"] for run in runs]
    fig, (ax_tok, ax_e2e, ax_tput) = plt.subplots(1, 3, figsize=(15, 4.5))
    for metric, label, style in (("ttft_ms", "TTFT", "o"), ("itl_ms", "ITL", "s")):
        ax_tok.plot(rates, _series(runs, metric, "p50"), f"-{style}", label=f"{label} p50")
        ax_tok.plot(rates, _series(runs, metric, "p99"), f"--{style}", label=f"{label} p99")
    ax_tok.set(title="time to first token, inter-token latency", xlabel="offered load (requests/s)",
               ylabel="ms")
    ax_e2e.plot(rates, _series(runs, "e2e_ms", "p50", 1e-3), "-o", label="E2E p50")
    ax_e2e.plot(rates, _series(runs, "e2e_ms", "p99", 1e-3), "--o", label="E2E p99")
    ax_e2e.set(title="end-to-end latency", xlabel="offered load (requests/s)", ylabel="s")
    ax_tput.plot(rates, _series(runs, "output_tokens_per_s", ""), "-o", color="C2", label="output tok/s")
    ax_tput.set(title="throughput", xlabel="offered load (requests/s)", ylabel="output tokens/s")
    ax_req = ax_tput.twinx()
    ax_req.plot(rates, _series(runs, "requests_per_s", ""), "--s", color="C3", label="requests/s")
    if any(run["summary"]["goodput_requests_per_s"] is not None for run in runs):
        ax_req.plot(rates, _series(runs, "goodput_requests_per_s", ""), ":^", color="C4", label="goodput req/s")
    ax_req.set_ylabel("requests/s")
    for ax in (ax_tok, ax_e2e):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax_tput.grid(alpha=0.3)
    handles = ax_tput.get_legend_handles_labels()[0] + ax_req.get_legend_handles_labels()[0]
    ax_tput.legend(handles, [str(h.get_label()) for h in handles], fontsize="small", loc="upper left")
    first = runs[0]["config"] if runs else {}
    fig.suptitle(f"{first.get('model', '')} at {first.get('url', '')} ({first.get('endpoint', '')}, "
                 f"input {first.get('input_len', '')}, output {first.get('output_len', '')} tokens)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
