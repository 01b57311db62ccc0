"""bench/arm_cycles.py finds the hot inner loop of a cross-compiled aarch64 function and counts the
weights it consumes per iteration right: checked on distributed-llama's Q40 x Q80 loop, whose
source says what each build's loop does (4 blocks of 32 weights with ``sdot``, 2 blocks with
``smull`` without it), and on a plain C loop of known shape."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import arm_cycles  # noqa: E402

TOOLS = [arm_cycles.LLVM_MCA.exists(), shutil.which("aarch64-linux-gnu-gcc"), shutil.which("aarch64-linux-gnu-g++")]
pytestmark = pytest.mark.skipif(not all(TOOLS), reason="needs llvm-19 and the aarch64 cross compilers: "
                                "run deploy/install-system-deps.sh as root")

# A one-row float matvec, unrolled by hand to 8 floats (2 fmla of 4) per iteration, inside a row loop.
F32_SOURCE = """
#include <arm_neon.h>
void f32_matvec(const float *w, const float *x, float *y, int n, int k) {
    for (int i = 0; i < n; i++) {
        float32x4_t a = vdupq_n_f32(0), b = vdupq_n_f32(0);
        for (int j = 0; j + 8 <= k; j += 8) {
            a = vfmaq_f32(a, vld1q_f32(w + (long)i * k + j), vld1q_f32(x + j));
            b = vfmaq_f32(b, vld1q_f32(w + (long)i * k + j + 4), vld1q_f32(x + j + 4));
        }
        y[i] = vaddvq_f32(vaddq_f32(a, b));
    }
}
"""


@pytest.mark.skipif(not arm_cycles.DLLAMA_TGZ.exists(), reason=f"no {arm_cycles.DLLAMA_TGZ}")
def test_distributed_llamas_loop_per_cpu() -> None:
    kernel = next(k for k in arm_cycles.KERNELS if k.builds["pi5"].source == "dllama")
    rows = arm_cycles.measure((kernel,), None)["kernels"]
    assert {r["cpu"]: r["weights_per_iteration"] for r in rows} == {"pi5": 128, "pi4": 64}
    for r in rows:
        mnemonics = [line.split()[0] for line in r["loop"]]
        assert mnemonics.count("sdot") == (8 if r["cpu"] == "pi5" else 0)
        assert mnemonics.count("smull") + mnemonics.count("smull2") == (0 if r["cpu"] == "pi5" else 8)
        assert r["cycles_per_iteration"] > 0
        assert r["cycles_per_weight"] == pytest.approx(r["cycles_per_iteration"] / r["weights_per_iteration"], abs=1e-4)


def test_hot_loop_of_a_plain_float_matvec(tmp_path: Path) -> None:
    src = tmp_path / "f32.c"
    src.write_text(F32_SOURCE)
    asm = tmp_path / "f32.s"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O3", "-mcpu=cortex-a72", "-S", str(src), "-o", str(asm)], check=True)
    symbol, body = arm_cycles.function_body(asm.read_text(), r"^f32_matvec$")
    loop = arm_cycles.hot_loop(body)
    assert symbol == "f32_matvec"
    assert arm_cycles.products(loop, arm_cycles.FLOAT_PRODUCTS) == 8  # the inner loop, not the row loop
    assert arm_cycles.products(loop, arm_cycles.INT_PRODUCTS) == 0
    assert not any(line.startswith("faddp") for line in loop)  # the row's reduction is outside it
    timing = arm_cycles.mca(loop, arm_cycles.CPUS[1])
    assert timing["cycles_per_iteration"] >= timing["block_rthroughput"] > 0


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "worker" / "kernels" / "arm").is_dir(),
                    reason="no aarch64 kernels (worker/kernels/arm/) in this tree")
def test_edgellms_loops_consume_the_weights_their_source_says() -> None:
    """Per iteration: int8, 4 rows x one 32-block; int4, 4 rows x the 2 blocks of a 64-group (the
    group loop around the block loop); f32, 8 rows x 4 floats. The Pi 5 build sums with sdot, the
    Pi 4 build with widening multiplies."""
    rows = arm_cycles.measure(tuple(k for k in arm_cycles.KERNELS if k.name.startswith("edgellm")), None)
    assert not rows["missing"], rows["missing"]
    got = {(r["dtype"], r["cpu"]): r for r in rows["kernels"]}
    expected = {"int8": 128, "int4": 256, "float32": 32}
    for (dtype, cpu), r in got.items():
        assert r["weights_per_iteration"] == expected[dtype], (dtype, cpu)
        mnemonics = [line.split()[0] for line in r["loop"]]
        if dtype != "float32":
            assert ("sdot" in mnemonics) == (cpu == "pi5"), (dtype, cpu)
    assert len(got) == 6
