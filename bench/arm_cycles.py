"""Cycles per weight of aarch64 matvec inner loops on the Pi 5's and Pi 4's cores, from llvm-mca, as JSON.

    .venv/bin/python bench/arm_cycles.py [--source REF] [--out FILE] [--table]

No ARM machine is at hand, so the loops are cross-compiled (``aarch64-linux-gnu-gcc``/``g++``
with each CPU's ``-mcpu``, as ``-march=native`` resolves on the Pi itself) and their assembly is
fed to LLVM's machine-code analyzer with its model of the core:

- ``pi5``: ``llvm-mca -mcpu=neoverse-n1 -mattr=+dotprod`` (the Neoverse N1 is built on the
  Cortex-A76; LLVM has no A76 model of its own), code built with ``-mcpu=cortex-a76``;
- ``pi4``: ``llvm-mca -mcpu=cortex-a72``, code built with ``-mcpu=cortex-a72`` (no ``sdot``).

The inner loop of a function is found in the compiler's assembly as the innermost
backward branch whose body holds the most multiply(-accumulate) instructions; its body (labels
and directives dropped) is what llvm-mca runs, 200 iterations. ``weights_per_iteration`` is
counted from the products in that body: for an integer loop ``sdot`` is 16 int8 products and
``smull``/``smlal`` on bytes 8 (the float multiply of a block's scale is not a weight), for a float
loop ``fmla``/``fmul`` on 4 floats is 4. For a one-row matvec that is the number of weights each
iteration consumes.

llvm-mca assumes every load hits the L1 cache: ``cycles_per_weight`` is a compute ceiling of
one core, beside (not instead of) the memory bandwidth that bounds a decode step. The planner's
``pi5`` profile takes these figures (``planner/profiles/pi5.yaml``, ``matvec_cycles_per_weight``).

Kernels: distributed-llama's NEON Q40 x Q80 ``matmul_Q80_Q40_F32`` (8d624a7, from
``/work/shared/peers``, built with its Makefile's flags: ``-std=c++11 -O3`` and ``-march=native``,
which is the core's ``-mcpu`` on a Pi), and edgellm's aarch64 kernels in ``worker/kernels/``
of ``--source`` (a git ref, default the working tree) when that tree has them.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("arm_cycles")

REPO = Path(__file__).resolve().parents[1]
LLVM_MCA = Path("/usr/lib/llvm-19/bin/llvm-mca")
DLLAMA_TGZ = Path("/work/shared/peers/distributed-llama-8d624a7.tgz")
ITERATIONS = 200


@dataclass(frozen=True)
class Cpu:
    """A Pi's core: how code is built for it and which llvm-mca model prices it."""

    name: str
    mca_cpu: str  # -mcpu= for llvm-mca
    mca_attr: str  # -mattr= for llvm-mca ("" for none)
    ghz: float


CPUS = (Cpu("pi5", "neoverse-n1", "+dotprod", 2.4), Cpu("pi4", "cortex-a72", "", 1.8))


# worker/kernels/native.py's aarch64 compile units: matmul.c for armv8-a (every 64-bit Pi), dotprod.c's
# loops for armv8.2-a+dotprod (chosen at run time where HWCAP_ASIMDDP says so: the Pi 5)
ARM_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-march=armv8-a")
DOTPROD_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-march=armv8.2-a+dotprod")
# f32_gemm's one-row loop is a static function inlined into an OpenMP body beside the multi-row
# ones; a wrapper gets it alone (the same loop, compiled with the same flags)
F32_ROW = """
void bench_f32_row(const float *r0, int64_t k, int64_t k4, const float *x, float out[8]) {
    one_row_against_eight(r0, k, k4, x, out);
}
"""


@dataclass(frozen=True)
class Build:
    """How one CPU's variant of a kernel is compiled, and which function holds its loop."""

    source: str  # "dllama", or a file of worker/kernels/arm/
    flags: tuple[str, ...]
    function: str  # a regex matched against the assembly's function symbols
    wrapper: str = ""  # C appended to the source: a function around a static loop, measured instead


@dataclass(frozen=True)
class Kernel:
    """One matvec kernel: per CPU the function whose hot loop is measured; what a weight costs in bytes."""

    name: str
    dtype: str  # the shard dtype it serves: float32, int8, int4
    builds: dict[str, Build]  # by Cpu.name
    bytes_per_weight: float
    # which products consume a weight: int8 x int8 ones ("int": sdot, smull, smlal) or float ones
    # ("float": fmla, fmul on vectors); the others in the loop (a block scale's fmla) are not weights
    products: str = "int"
    # >0: the loop around the hot one runs it this many times per iteration (edgellm int4: the
    # blocks of one group, whose scale and zero are applied outside the block loop), measured together
    inner_trips: int = 0


def _dllama(gcc_cpu: str) -> Build:
    # its Makefile: -std=c++11 -O3 -march=native -mtune=native, i.e. the Pi's own core; gcc inlines
    # matmul_Q80_Q40_F32 into its only caller, matmulForward_Q80_Q40_F32
    return Build("dllama", ("-std=c++11", "-O3", f"-mcpu={gcc_cpu}"), r"matmul(Forward)?_Q80_Q40_F32")


KERNELS = (
    # 18-byte blocks of 32 weights: an fp16 scale and 16 bytes of nibbles (Q40), against Q80 activations
    Kernel("distributed-llama Q40xQ80", "int4", {"pi5": _dllama("cortex-a76"), "pi4": _dllama("cortex-a72")},
           18 / 32),
    # edgellm's (worker/kernels/arm/): 4 weight rows against one row of int8-quantized activations
    Kernel("edgellm int4 (group 64)", "int4",
           {"pi5": Build("dotprod.c", DOTPROD_FLAGS, r"^int4_rows4_dotprod$"),
            "pi4": Build("matmul.c", ARM_FLAGS, r"^int4_rows4_neon$")},
           0.5 + 4 / 64, inner_trips=2),  # 16 bytes per 32 weights, a bf16 (scale, zero) pair per 64
    Kernel("edgellm int8", "int8",
           {"pi5": Build("dotprod.c", DOTPROD_FLAGS, r"^int8_rows4_dotprod$"),
            "pi4": Build("matmul.c", ARM_FLAGS, r"^int8_rows4_neon$")}, 1.0),
    Kernel("edgellm f32", "float32", {cpu: Build("matmul.c", ARM_FLAGS, r"^bench_f32_row$", F32_ROW)
                                      for cpu in ("pi5", "pi4")}, 4.0, "float"),
)

# Products per instruction, by mnemonic and the arrangement of its first source register: integer
# products (int8 x int8: what a quantized loop with int8 activations consumes a weight with) and float
# ones (a float loop's weights, or an int8/int4 loop that converts its weights to floats).
INT_PRODUCTS = {("sdot", "16b"): 16, ("udot", "16b"): 16, ("sdot", "8b"): 8, ("udot", "8b"): 8,
                ("smull", "8b"): 8, ("smull2", "16b"): 8, ("smlal", "8b"): 8, ("smlal2", "16b"): 8,
                ("umull", "8b"): 8, ("umull2", "16b"): 8, ("umlal", "8b"): 8, ("umlal2", "16b"): 8}
FLOAT_PRODUCTS = {("fmla", "4s"): 4, ("fmul", "4s"): 4, ("fmla", "8h"): 8, ("fmlal", "4h"): 4, ("fmlal2", "4h"): 4}
CONDITIONS = "eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al"
BRANCH = re.compile(rf"^\s*(b(?:\.?(?:{CONDITIONS}))?|cbn?z|tbn?z)\s+(?:[^,]+,\s*)*(\.L\w+)\s*$")
LABEL = re.compile(r"^(\.L\w+):")


def products(lines: list[str], table: dict[tuple[str, str], int]) -> int:
    """Scalar products in ``lines`` by the instructions of ``table``."""
    total = 0
    for line in lines:
        parts = line.split(None, 1)
        if len(parts) < 2:
            continue
        arrangements = re.findall(r"v\d+\.(\d+[bhs])", parts[1])
        # the first source register (the second operand) tells the element width of the inputs;
        # a by-element operand (v22.s[0]) has no arrangement: then the first register's
        src = arrangements[1] if len(arrangements) > 1 else (arrangements[0] if arrangements else "")
        total += table.get((parts[0], src), 0)
    return total


def function_body(asm: str, pattern: str) -> tuple[str, list[str]]:
    """The first function whose symbol matches ``pattern``: (symbol, its lines)."""
    lines = asm.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\s*\.type\s+([\w.$]+),\s*%function", line)
        if m and re.search(pattern, m.group(1)):
            symbol = m.group(1)
            end = next(j for j in range(i, len(lines)) if re.match(rf"^\s*\.size\s+{re.escape(symbol)},", lines[j]))
            return symbol, lines[i:end]
    raise LookupError(f"no function matching {pattern!r}")


def instructions(lines: list[str]) -> list[str]:
    """Instruction lines only: no labels, directives or comments."""
    out = []
    for line in lines:
        text = line.split("//")[0].strip()
        if text and not text.startswith(".") and not LABEL.match(text) and not text.endswith(":"):
            out.append(text)
    return out


def loops(body: list[str]) -> list[tuple[int, int]]:
    """(label line, backward branch line) of every loop in ``body``."""
    where = {m.group(1): i for i, line in enumerate(body) if (m := LABEL.match(line))}
    found = []
    for i, line in enumerate(body):
        m = BRANCH.match(line)
        if m and m.group(2) in where and where[m.group(2)] < i:
            found.append((where[m.group(2)], i))
    return found


def hot_loop(body: list[str], inner_trips: int = 0) -> list[str]:
    """The innermost loop (a label and a later branch back to it with no loop inside) with the
    most products: the instructions from the label to the branch, inclusive. With
    ``inner_trips``, the smallest loop around it instead, its inner loop written out that many
    times (llvm-mca runs straight-line code: a nest is one iteration of the outer loop)."""
    all_loops = loops(body)
    inside = {ab: [cd for cd in all_loops if ab[0] <= cd[0] and cd[1] <= ab[1] and cd != ab] for ab in all_loops}
    innermost = [ab for ab in all_loops if not inside[ab]]
    if not innermost:
        raise LookupError("no loop in the function")

    def weight(ab: tuple[int, int]) -> tuple[int, int]:
        loop = instructions(body[ab[0]:ab[1] + 1])
        return products(loop, INT_PRODUCTS) + products(loop, FLOAT_PRODUCTS), ab[1] - ab[0]

    start, end = max(innermost, key=weight)
    if not inner_trips:
        return instructions(body[start:end + 1])
    outer = [ab for ab in all_loops if (start, end) in inside[ab]]
    if not outer:
        raise LookupError("the hot loop has no loop around it")
    a, b = min(outer, key=lambda ab: ab[1] - ab[0])
    return instructions(body[a:start]) + instructions(body[start:end + 1]) * inner_trips + \
        instructions(body[end + 1:b + 1])


def mca(loop: list[str], cpu: Cpu) -> dict[str, float]:
    """llvm-mca's steady state of ``loop`` on ``cpu``'s model."""
    cmd = [str(LLVM_MCA), "-mtriple=aarch64", f"-mcpu={cpu.mca_cpu}", f"-iterations={ITERATIONS}"]
    if cpu.mca_attr:
        cmd.append(f"-mattr={cpu.mca_attr}")
    out = subprocess.run(cmd, input="\n".join(loop) + "\n", capture_output=True, text=True, check=True).stdout
    fields = {k: float(v) for k, v in re.findall(r"^(Iterations|Total Cycles|Block RThroughput):\s+([\d.]+)", out, re.M)}
    return {"cycles_per_iteration": fields["Total Cycles"] / fields["Iterations"],
            "block_rthroughput": fields["Block RThroughput"]}


def dllama_source(work: Path) -> Path:
    """distributed-llama's tree, unpacked once per run."""
    src = work / "dllama"
    if not src.exists():
        src.mkdir()
        with tarfile.open(DLLAMA_TGZ) as tgz:
            tgz.extractall(src, filter="data")
    return src


def edgellm_source(ref: str | None, work: Path) -> Path | None:
    """worker/kernels/arm/ of the working tree or of git ref ``ref``, copied into ``work`` with the
    rest of worker/kernels/ (its sources include ../common.h); None where it has no aarch64 kernels."""
    dest = work / "edgellm-kernels"
    arm = dest / "arm"
    if dest.exists():
        return arm if arm.is_dir() and any(arm.iterdir()) else None
    dest.mkdir()
    if ref is None:
        shutil.copytree(REPO / "worker" / "kernels", dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "worker/kernels"], capture_output=True)
        if archive.returncode == 0:
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                tar.extractall(work / "archive", filter="data")
            shutil.copytree(work / "archive" / "worker" / "kernels", dest, dirs_exist_ok=True)
    return arm if arm.is_dir() and any(arm.iterdir()) else None


def assemble(build: Build, ref: str | None, work: Path, tag: str) -> str | None:
    """``build``'s source compiled to assembly with its flags; None where the source is absent."""
    if build.source == "dllama":
        src = dllama_source(work) / "src" / "nn" / "nn-cpu-ops.cpp"
        compiler = "aarch64-linux-gnu-g++"
    else:
        tree = edgellm_source(ref, work)
        if tree is None or not (tree / build.source).exists():
            return None
        src = tree / build.source
        compiler = "aarch64-linux-gnu-gcc"
        if build.wrapper:  # beside the original, so that its #include "..." still resolve
            wrapped = tree / f"bench-{tag}-{build.source}"
            wrapped.write_text(src.read_text() + build.wrapper)
            src = wrapped
    out = work / f"{tag}.s"
    subprocess.run([compiler, *build.flags, "-S", str(src), "-o", str(out)], check=True, capture_output=True, text=True)
    return out.read_text()


def measure(kernels: tuple[Kernel, ...], ref: str | None) -> dict[str, Any]:
    """Every kernel on every CPU model: the JSON this script prints."""
    version = subprocess.run([str(LLVM_MCA), "--version"], capture_output=True, text=True).stdout
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    with tempfile.TemporaryDirectory(prefix="arm-cycles-") as tmp:
        work = Path(tmp)
        for n, kernel in enumerate(kernels):
            for cpu in CPUS:
                build = kernel.builds[cpu.name]
                asm = assemble(build, ref, work, f"k{n}-{cpu.name}")
                if asm is None:
                    missing.append(f"{kernel.name}: no worker/kernels/arm/{build.source} in {ref or 'the working tree'}")
                    break
                try:
                    symbol, body = function_body(asm, build.function)
                    loop = hot_loop(body, kernel.inner_trips)
                except LookupError as exc:
                    missing.append(f"{kernel.name}: {exc} ({build.source}, {cpu.name})")
                    break
                weights = products(loop, INT_PRODUCTS if kernel.products == "int" else FLOAT_PRODUCTS)
                timing = mca(loop, cpu)
                cpw = timing["cycles_per_iteration"] / weights
                rows.append({"kernel": kernel.name, "dtype": kernel.dtype, "cpu": cpu.name,
                             "mca_cpu": cpu.mca_cpu + (f" {cpu.mca_attr}" if cpu.mca_attr else ""),
                             "compile": " ".join(build.flags), "function": symbol, "loop_instructions": len(loop),
                             **{k: round(v, 3) for k, v in timing.items()},
                             "weights_per_iteration": weights, "cycles_per_weight": round(cpw, 4),
                             "bytes_per_weight": round(kernel.bytes_per_weight, 4),
                             "cycles_per_byte": round(cpw / kernel.bytes_per_weight, 4),
                             # one core at the nominal clock, everything in L1
                             "core_gb_s_ceiling": round(cpu.ghz / cpw * kernel.bytes_per_weight, 2),
                             "loop": loop})
    return {"llvm_mca": next((line.strip() for line in version.splitlines() if "version" in line), "?"),
            "iterations": ITERATIONS, "source": ref or "working tree",
            "cpus": {c.name: {"llvm_mca": f"-mcpu={c.mca_cpu} {c.mca_attr}".strip(), "ghz": c.ghz} for c in CPUS},
            "kernels": rows, "missing": missing}


def table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (for the docs)."""
    head = "| kernel | CPU (llvm-mca model) | cycles/iteration | weights/iteration | cycles/weight | cycles/byte |"
    out = [head, "| --- | --- | --- | --- | --- | --- |"]
    for r in result["kernels"]:
        out.append(f"| {r['kernel']} | {r['cpu']} ({r['mca_cpu']}) | {r['cycles_per_iteration']:.2f} | "
                   f"{r['weights_per_iteration']} | {r['cycles_per_weight']:.4f} | {r['cycles_per_byte']:.4f} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None, help="git ref to take worker/kernels/ from (default: the working tree)")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--table", action="store_true", help="print a Markdown table after the JSON")
    parser.add_argument("--with-loops", action="store_true", help="keep each loop's instructions in the JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tools = [LLVM_MCA, shutil.which("aarch64-linux-gnu-gcc"), shutil.which("aarch64-linux-gnu-g++")]
    if not all(t and Path(t).exists() for t in tools) or not DLLAMA_TGZ.exists():
        log.error("needs llvm-19, gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu (deploy/install-system-deps.sh) "
                  "and %s", DLLAMA_TGZ)
        return 2
    result = measure(KERNELS, args.source)
    if not args.with_loops:
        for row in result["kernels"]:
            row.pop("loop")
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")
    if args.table:
        sys.stdout.write("\n" + table(result) + "\n")
    for line in result["missing"]:
        log.warning("not measured: %s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
