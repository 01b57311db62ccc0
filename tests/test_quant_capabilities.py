"""Quantized shards are right on every CPU: written under one ``ATEN_CPU_CAPABILITY`` and served
under another (each in its own process: torch picks the capability at import), int8, int4 and
MoE ``--expert-bits 4`` give the same tokens, and every quantized product equals the
dequantized matrix's, with the native kernels and without (``EDGELLM_NATIVE=0``: torch's, the
path of a CPU without ours). The capabilities are those this CPU has: ``default`` (what every ARM
CPU runs), ``avx2``, ``avx512``. Before the shards had a byte layout of their own, int4 under
``default`` or ``avx512`` answered garbage."""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.capability_probe import KINDS, PROMPT, RANKS, TOKENS
from tests.tiny_models import build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "server" / "default_model"
_ORDER = ("DEFAULT", "AVX2", "AVX512")


@functools.cache
def capabilities() -> list[str]:
    """Every capability up to the one torch picks on this CPU (it can be forced down, never up),
    asked of a fresh process without ``ATEN_CPU_CAPABILITY``: a run forced down as a whole still
    checks them all."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    return [c.lower() for c in _ORDER[: _ORDER.index(done.stdout.strip()) + 1]]


def _probe(*args: str, capability: str, native: bool = True) -> str:
    env = os.environ | {"ATEN_CPU_CAPABILITY": capability, "EDGELLM_NATIVE": "1" if native else "0"}
    done = subprocess.run([sys.executable, "-m", "tests.capability_probe", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shards of every kind, written once under each capability."""
    root = tmp_path_factory.mktemp("capabilities")
    moe = build_checkpoint(root / "moe", "qwen3_moe", moe_intermediate_size=64)
    out = {}
    for capability in capabilities():
        out[capability] = root / f"written-{capability}"
        _probe("write", str(out[capability]), str(DEFAULT_MODEL), str(moe), capability=capability)
    return out


@pytest.mark.timeout(600)
def test_shards_are_the_same_and_serve_the_same_tokens_under_every_capability(written: dict[str, Path]) -> None:
    caps = capabilities()
    assert caps[:2] == ["default", "avx2"], caps  # this test needs at least two to mean anything
    # Written anywhere, the bytes are the same: edgellm's layout, not a kernel's.
    first = written[caps[0]]
    for capability in caps[1:]:
        for f in sorted(first.rglob("*.safetensors")):
            assert (written[capability] / f.relative_to(first)).read_bytes() == f.read_bytes(), (capability, f)
    # Served under each capability (from the shards written under another), native kernels on and off.
    served = {(cap, native): json.loads(_probe("serve", str(written[caps[-1 - i % len(caps)]]),
                                               capability=cap, native=native))
              for i, cap in enumerate(caps) for native in (True, False)}
    for (cap, native), result in served.items():
        assert result["capability"] == cap.upper()
        for kind in KINDS:
            errors = result[kind]["linear_error_over_bound"]
            assert errors and max(errors.values()) <= 1.0, (cap, native, kind, errors)
    for kind in KINDS:
        tokens = {config: result[kind]["tokens"] for config, result in served.items()}
        assert all(t == tokens[(caps[0], True)] for t in tokens.values()), (kind, tokens)
        # Where the same kernels ran, only the summation order of torch's ops differs between
        # capabilities: the logits agree to within the bf16 rounding of torch's quantized
        # kernels' results (2^-8 relative each way) and a little more. int8's native kernel has
        # fp32 activations, torch's bf16, and the native kernels are off under ``default``:
        # those pairs are compared by tokens.
        for a, b in itertools.combinations(served, 2):
            if served[a]["kernels"] == served[b]["kernels"]:
                la, lb = (torch.tensor(served[c][kind]["logits"]) for c in (a, b))
                bound = 2.0 ** -7 * torch.maximum(la.abs(), lb.abs()) + 1e-3 * la.abs().max()
                assert ((la - lb).abs() <= bound).all(), (kind, a, b, (la - lb).abs().max())
    # And the embedded trained model still says what it says in fp32 (int8: all tokens; int4:
    # the first 4, as test_quant's float-text test asks).
    expected = _float_tokens()
    for (cap, native), result in served.items():
        assert result["int8"]["tokens"] == expected, (cap, native)
        assert result["int4"]["tokens"][:4] == expected[:4], (cap, native)


def _float_tokens() -> list[int]:
    from tests.harness import inprocess_cluster
    from worker.rank.step import SeqSpan

    with inprocess_cluster(DEFAULT_MODEL, [1.0] * RANKS, max_batch=1, max_context=64) as executor:
        tokens = [int(executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))])[0].argmax())]
        for i in range(TOKENS - 1):
            tokens.append(int(executor.step([[tokens[-1]]], [SeqSpan(0, len(PROMPT) + i, 1)])[0].argmax()))
    return tokens
