"""The tables of docs/benchmarks.md, from one ``make bench-all`` run: markdown, every figure
beside the peer measured in the same run where one exists, under the run's machine, versions,
commit and load.

    .venv/bin/python bench/tables.py bench/results/<timestamp> [--out docs/benchmarks/latest.md]

``bench/run_all.py`` calls :func:`write_tables` at the end of every run; run this file to render
an earlier run again. Missing benchmarks (``--only``, a failure) leave their table out and say so.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = list[str]
Section = tuple[str, str, Row, list[Row]]  # title, what it measures, header, rows


def _table(header: Row, rows: list[Row]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _lat(entry: dict[str, Any] | None) -> str:
    """``p50 / p99`` µs of one allreduce series."""
    return f"{_num(entry['p50_us'], 0)} / {_num(entry['p99_us'], 0)}" if entry else "-"


def environment_lines(env: dict[str, Any], results: dict[str, Any]) -> list[str]:
    load = env.get("load_average_start")
    load_end = env.get("load_average_end")
    busy = load is not None and env.get("cpus") and load[0] > 0.5 * env["cpus"]
    rows = [
        ["date (UTC)", env.get("date_utc", "-")],
        ["machine", f"{env.get('cpu_model', '-')}, {env.get('cpus', '-')} CPUs, {env.get('memory_gib', '-')} GiB"],
        ["OS", env.get("os", "-")],
        ["versions", f"Python {env.get('python', '-')}, torch {env.get('torch', '-')}, "
                     f"transformers {env.get('transformers', '-')}, pyzmq {env.get('pyzmq', '-')}"],
        ["commit", f"`{env.get('commit', '-')}`"],
        ["command", f"`{env.get('command', '-')}`" + (" (quick: smaller sizes, no 1.1B shape)" if env.get("quick")
                                                      else "")],
        ["load average (1, 5, 15 min)", f"{load} at the start, {load_end} at the end"
         + (": **a busy machine**, other processes took CPU time during the run" if busy else "")],
        ["benchmarks", ", ".join(f"{name} {'ok' if e['ok'] else 'FAILED'} ({e['seconds']} s)"
                                 for name, e in results.items())],
    ]
    return _table(["run", ""], rows)


def decode_section(res: dict[str, Any]) -> list[Section]:
    d = res["decode_batch1_fp32"]
    shape = d.get("shape", {})
    decode = [[f"decode, batch 1, fp32, {res['machine'].get('threads', '-')} threads, Llama "
               f"{shape.get('hidden_size', '?')}x{shape.get('num_hidden_layers', '?')} layers",
               f"{d['edgellm_1rank_tok_s']} tok/s (1 rank)", f"transformers `generate`: {d['transformers_tok_s']} tok/s",
               f"{d['ratio']}x"]]
    ar = res["allreduce_fp32"]
    rows = []
    for world, entry in ar.items():
        if not isinstance(entry, dict):
            continue
        name = "exchange" if world == "2_ranks" else "star"
        ours = f"{name}: {_lat(entry['star'])}"
        if "star_two_hop" in entry:
            ours += f" (two-hop star: {_lat(entry['star_two_hop'])})"
        rows.append([f"allreduce {ar['numel']} floats, {world.replace('_', ' ')}, p50 / p99 µs", ours,
                     f"gloo: {_lat(entry['gloo'])}",
                     f"star / gloo p50: {_num(entry.get('p50_ratio_paired_median', entry.get('p50_ratio_star_over_gloo')), 2)} "
                     "(median of paired rounds)"])
    return [("Decode and allreduce (`make bench`, `bench/decode_and_allreduce.py`)",
             "Decode speed of one rank against transformers `generate` on the same random checkpoint; the star "
             "allreduce against torch.distributed's gloo on the same machine.",
             ["what", "edgellm", "peer, same run", "ratio"], decode + rows)]


ALLREDUCE_METHODS = (("star_fp32", "star fp32"), ("star_two_hop_fp32", "two-hop star fp32"),
                     ("star_fp16", "star fp16"), ("star_bf16", "star bf16"), ("star_int8", "star int8"),
                     ("gloo", "gloo"), ("ring", "ring"), ("ring_curve", "ring + CURVE"))


def allreduce_section(res: dict[str, Any]) -> list[Section]:
    worlds = [w for w in res if w.endswith("_ranks")]
    present = [(key, label) for key, label in ALLREDUCE_METHODS if any(key in res[w] for w in worlds)]
    rows = []
    for world in worlds:
        entry = res[world]
        for kb in entry.get("gloo", entry.get("star_fp32", {})):
            rows.append([world.replace("_", " "), f"{kb} KB",
                         *(_num(entry[key][kb]["p50_us"], 0) if key in entry and kb in entry[key] else "-"
                           for key, _ in present),
                         _num(entry.get("star_fp32_vs_gloo_paired", {}).get("median_ratio", {}).get(kb), 2)])
    return [("Allreduce (`bench/allreduce.py`)",
             "p50 µs of one allreduce of an fp32 payload, per method; at 2 ranks `star` is the one-hop exchange. "
             "The last column is star fp32 / gloo, the median of back-to-back pairs.",
             ["ranks", "payload", *(label for _, label in present), "star / gloo (paired)"], rows)]


def quant_section(res: dict[str, Any]) -> list[Section]:
    out: list[Section] = []
    errors = res.get("error_default_model", {})
    rows = [[variant, _num(e["max_abs_logit_diff"], 4), f"{e['top1_agreement']:.1%}", str(e["greedy_prefix"]),
             f"{e['shard_bytes'] / 2**20:.1f}"]
            for variant, e in errors.items() if isinstance(e, dict)]
    if rows:
        out.append(("Quantization error (`bench/quant.py`)",
                    "Each variant against fp32 on the embedded model, teacher-forced on fp32's greedy tokens "
                    f"({errors.get('positions', '?')} positions, prompt included); greedy prefix: how many tokens a "
                    "free-running greedy decode (`--agree-tokens` + 1 of them) matches fp32's before the first "
                    "that differs.",
                    ["variant", "max abs logit diff", "top-1 agreement", "greedy prefix", "shard MiB"], rows))
    for key, speed in res.items():
        if not key.startswith("speed_"):
            continue
        shape = speed.get("shape", {})
        base = speed["transformers_fp32_tok_s"]
        rows = [["transformers fp32 (`generate`)", _num(base, 2), "1.00x"]]
        rows += [[f"edgellm {variant}", _num(v["tok_s"], 2), f"{v['vs_transformers_fp32']:.2f}x"]
                 for variant, v in speed.items() if isinstance(v, dict) and "tok_s" in v]
        out.append((f"Quantized decode speed, {key[6:]} shape (`bench/quant.py`)",
                    f"Batch 1, 1 rank, random Llama {shape.get('hidden_size', '?')} wide x "
                    f"{shape.get('num_hidden_layers', '?')} layers, {res['machine'].get('threads', '?')} threads; "
                    "best of the passes.", ["variant", "tok/s", "vs transformers fp32"], rows))
    return out


def sync_section(res: dict[str, Any]) -> list[Section]:
    rows = [[dtype, str(e["wire_bytes_per_row"]), _num(e.get("max_abs_logit_diff"), 4),
             f"{e['greedy_agreement']:.1%}" if "greedy_agreement" in e else "exact"]
            for dtype, e in res["dtypes"].items()]
    return [("Allreduce payload dtype error (`bench/sync_error.py`)",
             f"Each `--sync-dtype` against fp32 on the embedded model, {res['ranks']} ranks, {res['tokens']} greedy "
             "tokens.", ["`--sync-dtype`", "wire bytes per row", "max abs logit diff", "greedy agreement"], rows)]


def latency_section(res: dict[str, Any]) -> list[Section]:
    small = res["small_llama_512x8"]
    out: list[Section] = []
    rows = []
    for ranks, series in small.items():
        if not ranks.endswith(("_rank", "_ranks")):
            continue
        for prompt, ttft in series["ttft_ms"].items():
            rows.append([ranks.replace("_", " "), prompt, _num(ttft), _num(series["decode_tok_s"][prompt]),
                         ", ".join(map(str, series["rss_mib_per_rank"]))])
    out.append(("Time to first token and rank scaling (`bench/latency.py`)",
                "Random Llama 512 wide x 8 layers, fp32, on loopback; RSS of every rank's process.",
                ["ranks", "prompt tokens", "TTFT ms", "decode tok/s", "RSS MiB per rank"], rows))
    big = res.get("llama_1.1B_fp32")
    if big:
        out.append(("1.1B decode against its memory-bandwidth bound (`bench/latency.py --big`)",
                    "Bound = measured matvec bandwidth / weight bytes per token; probe passes and decode steps "
                    "alternate, so both see the same minute.",
                    ["weight MiB per token", "measured tok/s", "bound tok/s", "fraction of bound (quartiles)",
                     "TTFT ms, 32-token prompt", "RSS MiB"],
                    [[str(big["weight_mib_per_token"]), _num(big["measured_tok_s"], 2), _num(big["bound_tok_s"], 2),
                      f"{big['fraction_of_bound']:.0%} ({', '.join(f'{q:.0%}' for q in big['fraction_of_bound_quartiles'])})",
                      _num(big["ttft_ms_32"]), _num(big["rss_mib"])]]))
    return out


def streaming_section(res: dict[str, Any]) -> list[Section]:
    rows = [[name, _num(r["tokens_per_s"]), _num(r["step_ms"]), _num(r["disk_read_ms_per_step"]),
             _num(r["stall_ms_per_step"]), _num(r["overlap_ratio"], 2), str(r["window_slots"])]
            for name, r in (("resident", res["resident"]), ("streamed", res["streamed"]))]
    return [("Sliding window (`bench/streaming.py`)",
             f"One rank whose shard ({res['shard_bytes'] / 2**20:.0f} MiB) is 4x its budget "
             f"({res['budget_bytes'] / 2**20:.0f} MiB), streamed from disk with a cold page cache, against the "
             f"same shard resident. Streamed step / max(resident step, disk read per step) = "
             f"**{res['streamed_over_bound']:.2f}** (1.00 would be perfect overlap).",
             ["run", "tok/s", "step ms", "disk read ms/step", "stall ms/step", "overlap", "window slots"], rows)]


def moe_section(res: dict[str, Any]) -> list[Section]:
    speedup = res.get("speedup_over_on_demand_distance", {})
    rows = [[name, _num(r["tokens_per_s"]), f"{speedup[name]:.2f}x" if name in speedup else "-",
             _num(r.get("hit_rate"), 2), _num(r.get("recall"), 2), _num(r.get("precision"), 2),
             _num(r.get("bytes_read_per_token", 0) / 2**20, 2)]
            for name, r in res["runs"].items()]
    shape = res.get("shape", {})
    return [("Expert cache (`bench/moe_cache.py`)",
             f"{res['model']} Mixtral-style model, {shape.get('layers')} layers, {shape.get('experts')} experts, "
             f"top-{shape.get('top_k')}, experts in {res['expert_bits']} bits; a cache of {res['cache_experts']} "
             "experts, cold page cache. Runs are `<prefetch or on demand>_<predictor>_<eviction>`; the peer is "
             "on-demand loading with the same cache.",
             ["run", "tok/s", "vs on demand", "hit rate", "recall", "precision", "MiB read per token"], rows)]


def predictor_section(res: dict[str, Any]) -> list[Section]:
    rows = [[mode, _num(r["recall"], 3), _num(r["precision"], 3), str(r["guessed_per_layer_step"])]
            for mode, r in res["predictors"].items()]
    return [("Expert predictors, offline (`bench/expert_predictors.py`)",
             f"Each predictor's guesses against the experts the {res['model']} model then used, "
             f"{res.get('layers', '?')} layers; no disk, no timing.",
             ["predictor", "recall", "precision", "experts guessed per layer step"], rows)]


def planner_section(res: dict[str, Any]) -> list[Section]:
    rows = [[row["config"], ", ".join(f"{p} / {m}" for p, m in zip(row["predicted_tok_s"], row["measured_tok_s"],
                                                                      strict=True)),
             f"{row['median_tok_s_error']:+.0%}", ", ".join(f"{e:+.0%}" for e in row["ttft_errors"])]
            for row in res["summary"]]
    return [("Planner against measurement (`bench/planner_check.py`)",
             "The planner's prediction from a fresh probe of this machine, then the real code; error = "
             "predicted / measured - 1. Each pass probes and then measures.",
             ["configuration", "decode tok/s predicted / measured, each pass", "median error", "TTFT error, each pass"],
             rows)]


SECTIONS: dict[str, Callable[[dict[str, Any]], list[Section]]] = {
    "decode_and_allreduce": decode_section, "quant": quant_section, "latency": latency_section,
    "allreduce": allreduce_section, "sync_error": sync_section, "streaming": streaming_section,
    "moe_cache": moe_section, "expert_predictors": predictor_section, "planner_check": planner_section,
}


def render(results: dict[str, Any], env: dict[str, Any], run_dir: str) -> str:
    lines = ["# Benchmark tables", "",
             "Written by `make bench-all` (`bench/run_all.py`, rendered by `bench/tables.py`); do not edit by hand. "
             "What each benchmark does: [benchmarks.md](../benchmarks.md). Numbers of one run compare with each "
             f"other, not with another run's. Raw JSON of this run: `{run_dir}/results.json`.", "",
             *environment_lines(env, results)]
    for name, section in SECTIONS.items():
        entry = results.get(name)
        if entry is None:
            continue
        if not entry["ok"]:
            lines += ["", f"## {name}", "", f"FAILED: `{entry['error']}`"]
            continue
        for title, what, header, rows in section(entry["result"]):
            lines += ["", f"## {title}", "", what, "", *_table(header, rows)]
    return "\n".join(lines) + "\n"


def write_tables(run_dir: Path, out: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    env_file = run_dir / "environment.json"
    env = json.loads(env_file.read_text()) if env_file.is_file() else {}
    try:
        shown = run_dir.resolve().relative_to(Path(__file__).resolve().parent.parent)
    except ValueError:
        shown = run_dir
    text = render(results, env, str(shown))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (run_dir / "tables.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a bench/results/<timestamp> directory")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
                        / "latest.md")
    args = parser.parse_args()
    write_tables(args.run_dir, args.out)


if __name__ == "__main__":
    main()
