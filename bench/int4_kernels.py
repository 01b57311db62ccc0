"""int4 matrix products on this CPU, ms per matrix, as JSON: the native edgellm-int4 kernels
(``int4_q80``: activations quantized to int8 per 32 inputs, integer dot products; ``int4_f32``:
fp32 activations, nibbles converted to floats and FMA'd), torch's ``_weight_int4pack_mm_for_cpu``
(the fallback, on the same matrices converted at load, bf16 activations) and the native int8
kernels on the same shapes (``int8``: what ``int8_mm`` runs, int8-quantized activations below 12
rows; ``int8_f32``: fp32 activations, each weight converted to float).

    .venv/bin/python bench/int4_kernels.py [--rows 1,8] [--threads 2] [--rounds 15] [--group 64] [--out FILE]

Shapes: ``512x8``, the 32 matrices of the 512-wide, 8-layer Llama (bench/decode_and_allreduce.py's
SHAPE: wqkv 1024x512, wo 512x512, w_gate_up 3072x512, w_down 512x1536), ms for one matrix on
average; ``2048x5632``, TinyLlama's down projection, in copies enough to exceed the last-level
cache. Each round times every kernel once over the whole set (cold caches: a decode step reads
every weight from DRAM), interleaved; the figures are the fastest round (``min``: on a machine
shared with other work, the round least disturbed) and the median. Compare kernels within one run. Also the load-time cost of the torch fallback's
conversion (``worker.kernels.quant.to_torch_layout``), ms per 2048x5632 matrix.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from worker.kernels import native  # noqa: E402
from worker.kernels.quant import linear, quantize_int4, quantize_int8, to_torch_layout  # noqa: E402

log = logging.getLogger("bench.int4_kernels")

SHAPES: dict[str, list[tuple[int, int]]] = {
    "512x8": [(1024, 512), (512, 512), (3072, 512), (512, 1536)] * 8,
    "2048x5632": [(2048, 5632)] * 12,  # 12 x 5.8 MB of int4: past any L3 here
}


def _matrices(shape: list[tuple[int, int]], group: int) -> dict[str, list[Any]]:
    """Per kernel, its form of every matrix of the shape (random weights, the same for all)."""
    out: dict[str, list[Any]] = {"int4_q80": [], "int4_f32": [], "torch_int4": [], "int8": [], "int8_f32": []}
    for n, k in shape:
        w = torch.randn(n, k)
        packed, scales_zeros = quantize_int4(w, group)
        out["int4_q80"].append((packed, scales_zeros))
        out["int4_f32"].append((packed, scales_zeros))
        out["torch_int4"].append(to_torch_layout(packed.clone(), scales_zeros.clone(), group))
        out["int8"].append(quantize_int8(w))
        out["int8_f32"].append(out["int8"][-1])
    return out


def _runner(name: str, group: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    int4_mm, int4_f32_mm, int8_mm = native.int4_mm(), native.int4_f32_mm(), native.int8_mm()
    int8_f32_mm = native.int8_f32_mm()
    assert int4_mm and int4_f32_mm and int8_mm and int8_f32_mm, "the native kernels do not build here"
    if name == "int4_q80":
        return lambda x, m: int4_mm(x, m[0], m[1], group)
    if name == "int4_f32":
        return lambda x, m: int4_f32_mm(x, m[0], m[1], group)
    if name == "torch_int4":
        return lambda x, m: linear(x, m)
    if name == "int8_f32":
        return lambda x, m: int8_f32_mm(x, m[0], m[1])
    return lambda x, m: int8_mm(x, m[0], m[1])


def bench_shape(shape: list[tuple[int, int]], rows: int, rounds: int, group: int) -> dict[str, dict[str, float]]:
    mats = _matrices(shape, group)
    xs = {k: torch.randn(rows, k) for k in {k for _, k in shape}}
    times: dict[str, list[float]] = {name: [] for name in mats}
    for _ in range(rounds):
        for name, forms in mats.items():
            run = _runner(name, group)
            start = time.perf_counter()
            for (_, k), m in zip(shape, forms, strict=True):
                run(xs[k], m)
            times[name].append((time.perf_counter() - start) * 1e3 / len(shape))
    return {name: {"min": round(min(t), 4), "median": round(statistics.median(t), 4)} for name, t in times.items()}


def conversion_ms(group: int, repeats: int = 10) -> dict[str, float]:
    """ms (fastest and median of ``repeats``) to convert one 2048x5632 int4 matrix in place for
    torch's kernel, at the current thread count."""
    packed, scales_zeros = quantize_int4(torch.randn(2048, 5632), group)
    t = []
    for _ in range(repeats):
        p, s = packed.clone(), scales_zeros.clone()
        start = time.perf_counter()
        to_torch_layout(p, s, group)
        t.append((time.perf_counter() - start) * 1e3)
    return {"min": round(min(t), 2), "median": round(statistics.median(t), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--shapes", default="512x8,2048x5632")
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__},
        "group": args.group, "rounds": args.rounds, "ms_per_matrix": {}}
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in args.shapes.split(","):
            for rows in map(int, args.rows.split(",")):
                key = f"{shape}/{rows}row/{threads}thread"
                result["ms_per_matrix"][key] = bench_shape(SHAPES[shape], rows, args.rounds, args.group)
                log.info("%s: %s", key, result["ms_per_matrix"][key])
    result["torch_conversion_ms_2048x5632"] = conversion_ms(args.group)
    emit(result, args.out)


if __name__ == "__main__":
    main()
