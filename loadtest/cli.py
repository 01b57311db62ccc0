"""``python -m loadtest``: parse the flags, run, write the JSON report and the sweep plot."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtest.report import human_summary, plot_sweep
from loadtest.runner import ServerCheckError, Target, fetch_model, run_load
from loadtest.stats import SLO, request_record, summarize
from loadtest.workload import LengthSpec, make_workload, poisson_arrivals, tokenizer_counter

log = logging.getLogger("loadtest")


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # for argparse's "invalid int value" message
    return parse


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates are comma-separated numbers, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return rates


def _length_range(text: str) -> LengthSpec:
    try:
        return LengthSpec.parse_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test any OpenAI-compatible server with streaming requests; JSON report on stdout.")
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="completions",
                   help="/v1/completions (default: prompt lengths are exact) or /v1/chat/completions")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    load = p.add_argument_group("load")
    load.add_argument("--mode", choices=["closed", "open"], default=None,
                      help="closed (default): --concurrency clients back to back; open: Poisson arrivals at --rate")
    load.add_argument("--concurrency", type=_positive(int), default=1, help="closed loop: clients (default: 1)")
    load.add_argument("--rate", type=_positive(float), default=None, help="open loop: requests per second")
    load.add_argument("--sweep-rates", type=_rates, default=None,
                      help="open loop at each of these comma-separated rates, e.g. 0.5,1,2,4")
    load.add_argument("--plot", default=None, help="with --sweep-rates: write the latency/throughput PNG here")
    load.add_argument("--requests", type=_positive(int), default=100,
                      help="measured requests per run (default: 100); the run stops at this or --duration")
    load.add_argument("--duration", type=_positive(float), default=300.0,
                      help="seconds after which no new request is sent (default: 300)")
    load.add_argument("--warmup", type=int, default=2, help="requests sent first and left out of the stats (default: 2)")
    load.add_argument("--timeout", type=_positive(float), default=120.0,
                      help="seconds one request may take, from send to the end of its stream (default: 120)")
    work = p.add_argument_group("workload")
    ins = work.add_mutually_exclusive_group()
    ins.add_argument("--input-len", type=_positive(int), default=64, help="prompt tokens (default: 64)")
    ins.add_argument("--input-len-range", type=_length_range, default=None,
                     help="prompt tokens uniform in the half-open range LOW:HIGH")
    outs = work.add_mutually_exclusive_group()
    outs.add_argument("--output-len", type=_positive(int), default=64, help="max_tokens (default: 64)")
    outs.add_argument("--output-len-range", type=_length_range, default=None,
                      help="max_tokens uniform in the half-open range LOW:HIGH")
    work.add_argument("--tokenizer", default=None,
                      help="tokenizer.json (or its directory) of the served model: prompts get exactly "
                           "--input-len tokens instead of as many words")
    work.add_argument("--temperature", type=float, default=0.0, help="sent with every request (default: 0)")
    work.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and arrival times (default: 0)")
    slo = p.add_argument_group("latency targets (goodput counts the requests meeting all given)")
    slo.add_argument("--slo-ttft-ms", type=_positive(float), default=None, help="time to first token")
    slo.add_argument("--slo-itl-ms", type=_positive(float), default=None, help="a request's mean inter-token latency")
    slo.add_argument("--slo-e2e-ms", type=_positive(float), default=None, help="end-to-end latency")
    p.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.url.startswith(("http://", "https://")):
        p.error(f"--url must start with http:// or https://, got {args.url!r}")
    try:  # a bad port would otherwise be a traceback from deep in the socket layer
        url = urlsplit(args.url)
        port = url.port
    except ValueError as exc:
        p.error(f"--url {args.url!r}: {exc}")
    if not url.hostname or port == 0:
        p.error(f"--url needs a host and a port from 1 to 65535, got {args.url!r}")
    if args.sweep_rates is not None:
        if args.mode == "closed":
            p.error("--sweep-rates runs the open loop at each rate: drop --mode closed")
        args.mode = "open"
    args.mode = args.mode or "closed"
    if args.mode == "open" and args.rate is None and args.sweep_rates is None:
        p.error("--mode open needs --rate (or --sweep-rates)")
    if args.plot and args.sweep_rates is None:
        p.error("--plot draws a rate sweep: give --sweep-rates too")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")


def _run_config(args: argparse.Namespace, target: Target, rate: float | None, inputs: LengthSpec,
                outputs: LengthSpec) -> dict[str, Any]:
    return {"url": target.url, "model": target.model, "endpoint": target.endpoint, "mode": args.mode,
            "concurrency": args.concurrency if args.mode == "closed" else None, "rate": rate,
            "requests": args.requests, "duration_s": args.duration, "warmup": args.warmup,
            "timeout_s": args.timeout, "input_len": inputs.describe(), "output_len": outputs.describe(),
            "tokenizer": args.tokenizer, "temperature": args.temperature, "seed": args.seed}


async def _run(args: argparse.Namespace, model: str, rates: Sequence[float | None]) -> list[dict[str, Any]]:
    target = Target(url=args.url, model=model, endpoint=args.endpoint, temperature=args.temperature,
                    api_key=args.api_key, timeout_s=args.timeout)
    inputs = args.input_len_range or LengthSpec.fixed(args.input_len)
    outputs = args.output_len_range or LengthSpec.fixed(args.output_len)
    count = tokenizer_counter(args.tokenizer) if args.tokenizer else None
    specs = make_workload(args.requests, inputs, outputs, args.seed, count)
    warmup = make_workload(args.warmup, inputs, outputs, args.seed, count, first_index=-args.warmup,
                           stream="warmup")
    slo = SLO(args.slo_ttft_ms, args.slo_itl_ms, args.slo_e2e_ms)
    runs = []
    for i, rate in enumerate(rates):
        arrivals = None if rate is None else poisson_arrivals(rate, len(specs), random.Random(f"arrivals-{args.seed}"))
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        warm, measured = await run_load(target, specs, mode=args.mode, concurrency=args.concurrency,
                                        arrivals=arrivals, duration_s=args.duration,
                                        warmup=warmup if i == 0 else ())
        summary = summarize(measured.results, measured.elapsed_s, slo)
        summary["stopped_by"] = measured.stopped_by
        summary["issued_per_s"] = None if measured.issued_per_s is None else round(measured.issued_per_s, 3)
        summary["warmup"] = {"sent": len(warm.results) if warm else 0,
                             "failed": sum(not r.ok for r in warm.results) if warm else 0}
        run = {"config": _run_config(args, target, rate, inputs, outputs), "started_at": started,
               "summary": summary, "requests": [request_record(r) for r in measured.results]}
        sys.stderr.write(human_summary(run))
        runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    _check(p, args)
    rates: list[float | None] = list(args.sweep_rates) if args.sweep_rates else [args.rate]
    model = args.model
    if model is None:
        try:
            model = asyncio.run(fetch_model(args.url, args.api_key))
        except ServerCheckError as exc:
            log.error("%s", exc)
            return 2
        log.info("model: %s", model)
    runs = asyncio.run(_run(args, model, rates))
    report: dict[str, Any]
    if args.sweep_rates:
        report = {"sweep": runs, "plot": None}
        if args.plot:
            report["plot"] = str(plot_sweep(runs, args.plot))
            log.info("plot written to %s", args.plot)
    else:
        report = runs[0]
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        log.info("report written to %s", args.out)
    else:
        sys.stdout.write(text + "\n")
    return 0 if any(run["summary"]["requests"]["succeeded"] for run in runs) else 1
