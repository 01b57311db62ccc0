"""Run every benchmark of bench/ with modest sizes and collect their JSON, a markdown summary and plots.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME,...]      (make bench-all, make bench-quick)

Each script runs as a subprocess with ``--out FILE`` (all of them print JSON and accept it);
a script that fails or times out is recorded with its error and the rest still run. Output:
``bench/results/<timestamp>/results.json``, ``environment.json`` (machine, versions, commit, load),
``summary.md``, ``tables.md`` and PNG plots (matplotlib, headless); the tables also go to
``docs/benchmarks/latest.md`` (``--tables``), the page docs/benchmarks.md links.
About 10 minutes on 2 quiet cores (quant and latency each write a 4.4 GB 1.1B-shape checkpoint;
``--quick`` or --only skip them); numbers of one run compare with each other, not across runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from environment import describe, load_average  # bench/ is sys.path[0] when run as a script
from tables import write_tables

BENCH = Path(__file__).resolve().parent
log = logging.getLogger("bench.run_all")

# script -> arguments sized so the whole suite stays within ~10 minutes on 2 cores
SUITE: dict[str, list[str]] = {
    "decode_and_allreduce": ["--tokens", "32", "--iters", "200"],
    "allreduce": ["--worlds", "2,4", "--sizes-kb", "16,1024", "--seconds", "1"],
    "planner_check": ["--tokens", "32", "--rounds", "4", "--passes", "3"],
    "streaming": ["--tokens", "16"],
    "moe_cache": ["--tokens", "8", "--prompts", "2", "--repeats", "1",  # random Mixtral (no trained one here)
                  "--runs", "on_demand_distance,prefetch_adaptive_distance,prefetch_adaptive_ungated_distance,"
                            "on_demand_frequency,all_resident"],
    "expert_predictors": ["--tokens", "100"],  # the same random Mixtral, offline: recall of each predictor
    "quant": ["--agree-tokens", "100", "--tokens", "8"],  # writes and runs the 1.1B shape: ~5 min
    "sync_error": ["--tokens", "100"],
    "latency": ["--prompts", "32,256,1024", "--tokens", "16", "--big"],  # --big: the 1.1B bandwidth bound
}
# --quick: the same benchmarks, smaller: no 1.1B-shape checkpoint, one planner pass, shorter series.
# Not timed on a quiet machine: 40 min on the shared 2-core VM at load average 13-22. Its numbers are
# noisier and say "quick" in the tables.
QUICK: dict[str, list[str]] = {
    "decode_and_allreduce": ["--tokens", "16", "--iters", "100", "--rounds", "2"],
    "allreduce": ["--worlds", "2,4", "--sizes-kb", "16,1024", "--dtypes", "fp32,fp16,int8", "--methods",
                  "star,gloo,ring", "--seconds", "0.5", "--rounds", "2"],
    "planner_check": ["--tokens", "16", "--rounds", "2", "--passes", "1"],
    "streaming": ["--tokens", "8"],
    "moe_cache": ["--tokens", "8", "--prompts", "2", "--repeats", "1"],
    "expert_predictors": ["--tokens", "50", "--prompts", "3"],
    "quant": ["--agree-tokens", "24", "--shapes", "small", "--small-tokens", "16"],  # 50/32: > 900 s busy
    "sync_error": ["--tokens", "50"],
    "latency": ["--prompts", "32,256", "--tokens", "8"],
}
TIMEOUT_S = 300
# the scripts that build the 4.4 GB 1.1B checkpoint, and the two that start 2- and 4-rank process
# groups again and again (300 s was too short for them on a busy 2-core machine)
LONG_TIMEOUT_S = {"quant": 900, "latency": 900, "decode_and_allreduce": 600, "allreduce": 600}


def run_script(name: str, args: list[str], out_dir: Path) -> dict[str, Any]:
    out = out_dir / f"{name}.json"
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *args, "--out", str(out)]
    timeout = LONG_TIMEOUT_S.get(name, TIMEOUT_S)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")}
    start = time.perf_counter()
    # A session of its own, so a timeout ends the script's rank processes too: killing the script
    # alone left its spawned ranks running, and they slowed every benchmark after it.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        (out_dir / f"{name}.log").write_text(stderr)
        return {"ok": False, "seconds": timeout, "error": f"timed out after {timeout} s", "command": cmd}
    seconds = round(time.perf_counter() - start, 1)
    (out_dir / f"{name}.log").write_text(stderr)
    if proc.returncode != 0 or not out.is_file():
        return {"ok": False, "seconds": seconds, "error": stderr.strip().splitlines()[-5:], "command": cmd}
    return {"ok": True, "seconds": seconds, "command": cmd, "result": json.loads(out.read_text())}


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(benchmark, what, number) rows of the key series, from whatever ran."""
    rows: list[tuple[str, str, str]] = []
    for name, entry in results.items():
        if not entry["ok"]:
            rows.append((name, "FAILED", str(entry["error"])[:120]))
    dec = results.get("decode_and_allreduce", {}).get("result")
    if dec:
        d = dec["decode_batch1_fp32"]
        rows.append(("decode_and_allreduce", "decode tok/s, 512x8 fp32, edgellm 1 rank / transformers",
                     f"{d['edgellm_1rank_tok_s']} / {d['transformers_tok_s']} (x{d['ratio']})"))
        for key, ar in dec["allreduce_fp32"].items():
            if isinstance(ar, dict):
                rows.append(("decode_and_allreduce", f"allreduce {dec['allreduce_fp32']['numel']} floats, {key}, "
                             "p50 star / gloo (us)", f"{ar['star']['p50_us']} / {ar['gloo']['p50_us']}"))
                if "p50_ratio_paired_median" in ar:
                    rows.append(("decode_and_allreduce", f"allreduce {key}: star / gloo p50, each paired round "
                                 "(median)", ", ".join(map(str, ar["p50_ratio_paired_rounds"]))
                                 + f" ({ar['p50_ratio_paired_median']})"))
    collective = results.get("allreduce", {}).get("result")
    if collective:
        methods = ("star_fp32", "star_two_hop_fp32", "star_fp16", "star_int8", "gloo", "ring")
        for world, entry in collective.items():
            for kb in entry.get("gloo", {}) if world.endswith("_ranks") else ():
                rows.append(("allreduce", f"{world}, {kb} KB: p50 {' / '.join(methods)} (us)",
                             " / ".join(str(entry[m][kb]["p50_us"]) if m in entry else "-" for m in methods)))
                if paired := entry.get("star_fp32_vs_gloo_paired"):
                    rows.append(("allreduce", f"{world}, {kb} KB: star fp32 / gloo p50, each paired round (median)",
                                 ", ".join(str(r["ratio"][kb]) for r in paired["rounds"])
                                 + f" ({paired['median_ratio'][kb]})"))
    rows += _quant_rows(results.get("quant", {}).get("result"))
    rows += _latency_rows(results.get("latency", {}).get("result"))
    sync = results.get("sync_error", {}).get("result")
    if sync:
        for dtype, e in sync["dtypes"].items():
            if "max_abs_logit_diff" in e:
                rows.append(("sync_error", f"--sync-dtype {dtype}, {sync['ranks']} ranks: max logit diff / greedy "
                             "agreement", f"{e['max_abs_logit_diff']} / {e['greedy_agreement']:.1%}"))
    check = results.get("planner_check", {}).get("result")
    if check:
        for row in check["summary"]:
            passes = ", ".join(f"{p} / {m} ({e:+.0%})" for p, m, e in
                               zip(row["predicted_tok_s"], row["measured_tok_s"], row["tok_s_errors"], strict=True))
            rows.append(("planner_check", f"{row['config']}: tok/s predicted / measured, each pass (median error)",
                         f"{passes} ({row['median_tok_s_error']:+.0%})"))
            rows.append(("planner_check", f"{row['config']}: TTFT error, each pass",
                         ", ".join(f"{e:+.0%}" for e in row["ttft_errors"])))
    predictors = results.get("expert_predictors", {}).get("result")
    if predictors:
        for mode, r in predictors["predictors"].items():
            rows.append(("expert_predictors", f"{mode}: recall / precision / experts guessed per layer step "
                         f"({predictors['model']} model, offline)",
                         f"{r['recall']:.3f} / {r['precision']:.3f} / {r['guessed_per_layer_step']}"))
    for name in ("streaming", "moe_cache"):
        res = results.get(name, {}).get("result")
        if res:
            for key, value in _scalars(res):
                rows.append((name, key, value))
    return rows


def _quant_rows(quant: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not quant:
        return []
    rows = []
    for key, speed in quant.items():
        if key.startswith("speed_"):
            base = speed["transformers_fp32_tok_s"]
            for variant, v in speed.items():
                if isinstance(v, dict) and "tok_s" in v:
                    rows.append(("quant", f"decode tok/s {key[6:]} {variant} (x transformers fp32 {base})",
                                 f"{v['tok_s']} (x{v['vs_transformers_fp32']})"))
    for variant, e in quant.get("error_default_model", {}).items():
        if isinstance(e, dict):
            rows.append(("quant", f"embedded model, {variant} vs fp32: max logit diff / top-1 agreement / greedy prefix",
                         f"{e['max_abs_logit_diff']} / {e['top1_agreement']:.1%} / {e['greedy_prefix']}"))
    return rows


def _latency_rows(latency: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not latency:
        return []
    rows = []
    small = latency["small_llama_512x8"]
    for ranks in ("1_rank", "2_ranks"):
        series = small[ranks]
        rows.append(("latency", f"512x8, {ranks}: TTFT ms by prompt length",
                     ", ".join(f"{p}: {ms}" for p, ms in series["ttft_ms"].items())))
        rows.append(("latency", f"512x8, {ranks}: decode tok/s by prompt length / RSS MiB per rank",
                     ", ".join(f"{p}: {t}" for p, t in series["decode_tok_s"].items())
                     + f" / {series['rss_mib_per_rank']}"))
    big = latency.get("llama_1.1B_fp32")
    if big:
        rows.append(("latency", "1.1B fp32 decode tok/s measured / bandwidth bound (fraction)",
                     f"{big['measured_tok_s']} / {big['bound_tok_s']} ({big['fraction_of_bound']:.0%})"))
    return rows


def _scalars(tree: Any, prefix: str = "", limit: int = 12) -> list[tuple[str, str]]:
    """The first ``limit`` numeric leaves of a JSON tree, as (dotted key, value)."""
    out: list[tuple[str, str]] = []

    def walk(node: Any, key: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and not key.startswith(("machine", "shape")):
            out.append((key, str(node)))

    walk(tree, prefix)
    return out


def write_summary(results: dict[str, Any], path: Path) -> None:
    lines = ["# Benchmark suite", "", f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs. "
             "Only ratios within this one run are meaningful.", "",
             "| benchmark | what | number |", "| --- | --- | --- |"]
    lines += [f"| {b} | {w} | {n} |" for b, w, n in summary_rows(results)]
    lines += ["", "| benchmark | ok | seconds |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['ok']} | {v['seconds']} |" for k, v in results.items()]
    path.write_text("\n".join(lines) + "\n")


def write_plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    dec = results.get("decode_and_allreduce", {}).get("result")
    if dec:
        ar = {k: v for k, v in dec["allreduce_fp32"].items() if isinstance(v, dict)}
        labels = list(ar)
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = range(len(labels))
        for offset, impl in ((-0.2, "star"), (0.2, "gloo")):
            ax.bar([x + offset for x in xs], [ar[k][impl]["p50_us"] for k in labels], width=0.4, label=f"{impl} p50")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("µs")
        ax.set_title(f"allreduce of {dec['allreduce_fp32']['numel']} floats")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "allreduce.png", dpi=100)
        plt.close(fig)
        made.append("allreduce.png")
    bars: list[tuple[str, float, float | None]] = []
    if dec:
        d = dec["decode_batch1_fp32"]
        bars += [("transformers", d["transformers_tok_s"], None), ("edgellm 1 rank", d["edgellm_1rank_tok_s"], None)]
    quant = results.get("quant", {}).get("result")
    if quant and "speed_512" in quant:
        speed = quant["speed_512"]
        bars += [(f"512x8 {v}", speed[v]["tok_s"], None) for v in speed if isinstance(speed[v], dict)
                 and "tok_s" in speed[v]]
    check = results.get("planner_check", {}).get("result")
    if check:
        bars += [(c["config"].replace("llama-", "").replace(", ", "\n"), c["measured_tok_s"], c["predicted_tok_s"])
                 for c in check["passes"][-1]["checks"]]
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(bars)), 4))
        xs = range(len(bars))
        ax.bar(list(xs), [b[1] for b in bars], width=0.5, label="measured")
        pred = [(x, b[2]) for x, b in zip(xs, bars, strict=True) if b[2] is not None]
        if pred:
            ax.scatter([p[0] for p in pred], [p[1] for p in pred], color="black", marker="_", s=400,
                       label="planner prediction", zorder=3)
        ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=7)
        ax.set_ylabel("tokens/s (batch 1)")
        ax.set_title("decode speed by configuration")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "decode.png", dpi=100)
        plt.close(fig)
        made.append("decode.png")
    latency = results.get("latency", {}).get("result")
    if latency:
        fig, ax = plt.subplots(figsize=(6, 4))
        for ranks, series in latency["small_llama_512x8"].items():
            if ranks.endswith(("_rank", "_ranks")):
                prompts = list(series["ttft_ms"])
                ax.plot([int(p) for p in prompts], [series["ttft_ms"][p] for p in prompts], marker="o",
                        label=ranks.replace("_", " "))
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time to first token (ms)")
        ax.set_title("TTFT, random Llama 512x8, fp32")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "ttft.png", dpi=100)
        plt.close(fig)
        made.append("ttft.png")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated benchmark names (default: all present)")
    parser.add_argument("--out-root", default=str(BENCH / "results"))
    parser.add_argument("--tables", default=str(BENCH.parent / "docs" / "benchmarks" / "latest.md"),
                        help="where the markdown tables of docs/benchmarks.md go (default: %(default)s; "
                             "'' for nowhere); always also tables.md of the run")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes, no 1.1B-shape checkpoint, one planner pass")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    suite = QUICK if args.quick else SUITE
    present = {p.stem for p in BENCH.glob("*.py")}
    names = [n for n in suite if n in present]
    if args.only:
        names = [n for n in names if n in set(args.only.split(","))]
    out_dir = Path(args.out_root) / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = describe(sys.argv) | {"quick": args.quick}
    results: dict[str, Any] = {}
    for name in names:
        log.info("running %s", name)
        results[name] = run_script(name, suite[name], out_dir)
        log.info("%s: %s in %.0f s", name, "ok" if results[name]["ok"] else "FAILED", results[name]["seconds"])
    environment["load_average_end"] = load_average()
    (out_dir / "environment.json").write_text(json.dumps(environment, indent=2))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_summary(results, out_dir / "summary.md")
    plots = write_plots(results, out_dir)
    if args.tables:
        write_tables(out_dir, Path(args.tables))
        log.info("tables: %s", args.tables)
    log.info("wrote %s (results.json, summary.md, %s)", out_dir, ", ".join(plots) or "no plots")
    print((out_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
