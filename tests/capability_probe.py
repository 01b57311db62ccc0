"""The side of tests/test_quant_capabilities.py that runs in a subprocess: torch fixes its CPU
capability (``ATEN_CPU_CAPABILITY``) when it is imported, so each capability is a process.

    python -m tests.capability_probe write OUT MODEL MOE       # the quantized shards, into OUT
    python -m tests.capability_probe serve SHARDS              # JSON on stdout: tokens, logits, errors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from server.cli import main as edgellm_main
from tests.harness import inprocess_cluster
from worker.config import ModelConfig
from worker.kernels import native
from worker.kernels.quant import QuantWeight, field, linear
from worker.rank.step import SeqSpan
from worker.shards.checkpoint import open_safetensors
from worker.shards.shard_file import ShardFile
from worker.shards.sharding import plan_shards
from worker.shards.weights import rank_shard_path

PROMPT = [1, 17, 42, 99, 7, 250, 31, 5, 64, 128, 3, 77]
TOKENS = 12
# kind -> (which checkpoint, the shard command's quantization flags)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "int8": ("model", ("--quantize", "int8")),
    "int4": ("model", ("--quantize", "int4", "--group-size", "32")),
    "moe_expert_bits_4": ("moe", ("--quantize", "int8", "--expert-bits", "4", "--group-size", "32")),
}
RANKS = 2


def write(out: Path, model: Path, moe: Path) -> None:
    for kind, (which, flags) in KINDS.items():
        source = model if which == "model" else moe
        assert edgellm_main(["shard", "--model", str(source), "--ranks", str(RANKS), "--out", str(out / kind),
                             *flags]) == 0


def greedy(shard_dir: Path) -> tuple[list[int], list[float]]:
    """Greedy tokens of PROMPT and the first step's logits, on an in-process 2-rank cluster."""
    with inprocess_cluster(shard_dir, [1.0] * RANKS, max_batch=1, max_context=64) as executor:
        logits = executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))])[0]
        tokens = [int(logits.argmax())]
        for i in range(TOKENS - 1):
            tokens.append(int(executor.step([[tokens[-1]]], [SeqSpan(0, len(PROMPT) + i, 1)])[0].argmax()))
    return tokens, logits.tolist()


def linear_errors(shard_dir: Path) -> dict[str, float]:
    """Per quantized matrix of rank 0's first layers: the largest |linear - reference| / bound,
    ``linear`` on the weight as a rank reads it (``ShardFile``: converted where this CPU's kernel
    needs it), the reference in fp64 from the stored bytes (edgellm's layout, never converted).
    The bound covers every kernel's rounding: activations in bf16 or int8 per 32 inputs (half a
    step, max|x| / 254, each), fp32 sums, a bf16 result. A wrong byte order is off by about the
    magnitude of the products themselves."""
    shard = plan_shards(ModelConfig.from_dir(shard_dir), [1.0] * RANKS)[0]
    path = rank_shard_path(shard_dir, shard)
    file = ShardFile(path)
    out: dict[str, float] = {}
    torch.manual_seed(0)
    with open_safetensors(path) as stored:
        for block in ("layers.0.attn", "layers.0.mlp", "layers.0.experts.0"):
            if not file.has(block):
                continue
            read = file.read(block)
            for name in ("wqkv", "wo", "w_gate_up", "w_down"):
                w = field(read, name)
                if not isinstance(w, QuantWeight):
                    continue
                raw = field({n: stored.get_tensor(f"{block}.{n}") for n in (name, f"{name}.scales",
                                                                               f"{name}.scales_zeros")
                             if f"{block}.{n}" in stored.keys()}, name)  # noqa: SIM118
                assert isinstance(raw, QuantWeight)
                deq = raw.dequantize().double()  # (N, K)
                x = torch.randn(3, deq.shape[1])
                ref = x.double() @ deq.T
                magnitude = x.double().abs() @ deq.abs().T
                step = x.abs().view(3, -1, 32).amax(dim=-1).double() / 254  # (3, K/32): int8 rounding
                q80 = (step.repeat_interleave(32, dim=1) @ deq.abs().T)
                bound = q80 + 2.0 ** -8 * (ref.abs() + magnitude) + 1e-6
                out[f"{block}.{name}"] = ((linear(x, w).double() - ref).abs() / bound).max().item()
    file.close()
    return out


def serve(shards: Path) -> dict[str, object]:
    result: dict[str, object] = {"capability": torch.backends.cpu.get_cpu_capability()}
    for kind in KINDS:
        tokens, logits = greedy(shards / kind)
        result[kind] = {"tokens": tokens, "logits": logits, "linear_error_over_bound": linear_errors(shards / kind)}
    result["kernels"] = sorted(name for name, kernel in native._loaded.items() if kernel is not None)  # the ones that ran
    return result


def main(argv: list[str]) -> None:
    if argv[0] == "write":
        write(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    else:
        print(json.dumps(serve(Path(argv[1]))))


if __name__ == "__main__":
    main(sys.argv[1:])
