"""bench/tables.py: the performance page is rendered from a run's JSON, each figure beside its peer
and under the machine, versions and commit it was measured with; bench/environment.py records them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ENVIRONMENT = {"date_utc": "2026-12-05 17:17", "cpu_model": "AMD EPYC", "cpus": 2, "memory_gib": 23.4,
               "os": "Linux 6.1", "python": "3.11.2", "torch": "2.13.0", "transformers": "4.99.0",
               "pyzmq": "27.0.0", "commit": "0123456789ab", "load_average_start": [6.5, 2.9, 1.2],
               "load_average_end": [9.1, 8.0, 6.0], "command": "bench/run_all.py --quick", "quick": True}


def _series(p50: float, p99: float) -> dict:
    return {"p50_us": p50, "p99_us": p99, "samples": 100}


RESULTS = {
    "decode_and_allreduce": {"ok": True, "seconds": 80.0, "result": {
        "machine": {"cpus": 2, "threads": 2},
        "decode_batch1_fp32": {"shape": {"hidden_size": 512, "num_hidden_layers": 8}, "tokens": 16,
                               "transformers_tok_s": 63.0, "edgellm_1rank_tok_s": 83.2, "ratio": 1.32},
        "allreduce_fp32": {"numel": 4096,
                           "2_ranks": {"star": _series(444, 1494), "gloo": _series(754, 7709),
                                       "star_two_hop": _series(565, 1200), "p50_ratio_star_over_gloo": 0.59,
                                       "p50_ratio_paired_rounds": [0.6, 0.5], "p50_ratio_paired_median": 0.55},
                           "4_ranks": {"star": _series(1213, 2365), "gloo": _series(7001, 15752),
                                       "p50_ratio_star_over_gloo": 0.17, "p50_ratio_paired_rounds": [0.2, 0.18],
                                       "p50_ratio_paired_median": 0.15000000000000002}}}},
    "quant": {"ok": True, "seconds": 200.0, "result": {
        "machine": {"threads": 2},
        "error_default_model": {"int8": {"max_abs_logit_diff": 0.133, "top1_agreement": 1.0, "greedy_prefix": 51,
                                         "shard_bytes": 2 * 2**20}, "fp32_logit_range": 20.0, "positions": 51},
        "speed_512": {"shape": {"hidden_size": 512, "num_hidden_layers": 8}, "tokens": 32, "repeats": 1,
                      "transformers_fp32_tok_s": 52.2,
                      "int8": {"tok_s": 321.5, "vs_transformers_fp32": 6.16}}}},
    "streaming": {"ok": False, "seconds": 300, "error": "timed out after 300 s", "command": []},
}


def _render(tmp_path: Path) -> str:
    run = tmp_path / "20261205-171716"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(RESULTS))
    (run / "environment.json").write_text(json.dumps(ENVIRONMENT))
    out = tmp_path / "docs" / "latest.md"
    subprocess.run([sys.executable, str(ROOT / "bench" / "tables.py"), str(run), "--out", str(out)], check=True,
                   timeout=60)
    assert (run / "tables.md").read_text() == out.read_text()
    return out.read_text()


def test_tables_show_each_figure_beside_its_peer_and_the_run_they_come_from(tmp_path: Path) -> None:
    text = _render(tmp_path)
    for expected in ("AMD EPYC, 2 CPUs", "torch 2.13.0", "`0123456789ab`", "quick: smaller sizes",
                     "**a busy machine**",  # load 6.5 on 2 CPUs
                     "| 83.2 tok/s (1 rank) | transformers `generate`: 63.0 tok/s | 1.32x |",
                     "exchange: 444 / 1494 (two-hop star: 565 / 1200) | gloo: 754 / 7709 | star / gloo p50: 0.55 (",
                     "star: 1213 / 2365 | gloo: 7001 / 15752 | star / gloo p50: 0.15 (",
                     "| transformers fp32 (`generate`) | 52.20 | 1.00x |", "| edgellm int8 | 321.50 | 6.16x |",
                     "| int8 | 0.1330 | 100.0% | 51 | 2.0 |", "(51 positions, prompt included)",
                     "## streaming", "FAILED: `timed out after 300 s`"):
        assert expected in text, expected
    assert "Expert cache" not in text  # a benchmark that did not run leaves its table out


def test_environment_names_the_commit_it_ran(tmp_path: Path) -> None:
    described = json.loads(subprocess.run([sys.executable, str(ROOT / "bench" / "environment.py")], check=True,
                                          capture_output=True, text=True, timeout=60).stdout)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert described["commit"].split("+")[0] == head
    assert described["cpus"] >= 1 and described["cpu_model"]
    assert described["python"].count(".") == 2 and described["torch"] != "-"
