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
    gcc_cpu: str  # -mcpu= for the cross compiler (what -march=native picks on that Pi)
    mca_cpu: str  # -mcpu= for llvm-mca
    mca_attr: str  # -mattr= for llvm-mca ("" for none)
    ghz: float


CPUS = (Cpu("pi5", "cortex-a76", "neoverse-n1", "+dotprod", 2.4), Cpu("pi4", "cortex-a72", "cortex-a72", "", 1.8))


@dataclass(frozen=True)
class Kernel:
    """One matvec kernel: the function whose innermost hot loop is measured, and what a weight costs in bytes."""

    name: str
    dtype: str  # the shard dtype it serves: float32, int8, int4
    source: str  # "dllama" or a path under worker/kernels/
    function: str  # a regex matched against the assembly's function symbols
    bytes_per_weight: float
    # which products consume a weight: int8 x int8 ones ("int": sdot, smull, smlal) or float ones
    # ("float": fmla, fmul on vectors); the others in the loop (a block scale's fmla) are not weights
    products: str = "int"


KERNELS = (
    # 18-byte blocks of 32 weights: an fp16 scale and 16 bytes of nibbles (Q40), against Q80 activations
    # (gcc inlines matmul_Q80_Q40_F32 into its only caller, matmulForward_Q80_Q40_F32)
    Kernel("distributed-llama Q40xQ80", "int4", "dllama", r"matmul(Forward)?_Q80_Q40_F32", 18 / 32),
    # edgellm's own aarch64 kernels (armkern's; none on a branch without them: reported as missing)
    Kernel("edgellm f32", "float32", "worker/kernels/matmul_neon.c", r"f32_(gemm|mm|matvec)", 4.0, "float"),
    Kernel("edgellm int8", "int8", "worker/kernels/matmul_neon.c", r"int8_(gemm|mm|matvec)", 1.0),
    Kernel("edgellm int4", "int4", "worker/kernels/matmul_neon.c", r"int4_(gemm|mm|matvec)", 18 / 32),
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


def hot_loop(body: list[str]) -> list[str]:
    """The innermost loop (a label and a later branch back to it with no loop inside) with the
    most products: the instructions from the label to the branch, inclusive."""
    where = {m.group(1): i for i, line in enumerate(body) if (m := LABEL.match(line))}
    loops = []
    for i, line in enumerate(body):
        m = BRANCH.match(line)
        if m and m.group(2) in where and where[m.group(2)] < i:
            loops.append((where[m.group(2)], i))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    if not innermost:
        raise LookupError("no loop in the function")
    def weight(ab: tuple[int, int]) -> tuple[int, int]:
        loop = instructions(body[ab[0]:ab[1] + 1])
        return products(loop, INT_PRODUCTS) + products(loop, FLOAT_PRODUCTS), ab[1] - ab[0]

    start, end = max(innermost, key=weight)
    return instructions(body[start:end + 1])


def mca(loop: list[str], cpu: Cpu) -> dict[str, float]:
    """llvm-mca's steady state of ``loop`` on ``cpu``'s model."""
    cmd = [str(LLVM_MCA), "-mtriple=aarch64", f"-mcpu={cpu.mca_cpu}", f"-iterations={ITERATIONS}"]
    if cpu.mca_attr:
        cmd.append(f"-mattr={cpu.mca_attr}")
    out = subprocess.run(cmd, input="\n".join(loop) + "\n", capture_output=True, text=True, check=True).stdout
    fields = {k: float(v) for k, v in re.findall(r"^(Iterations|Total Cycles|Block RThroughput):\s+([\d.]+)", out, re.M)}
    return {"cycles_per_iteration": fields["Total Cycles"] / fields["Iterations"],
            "block_rthroughput": fields["Block RThroughput"]}


def dllama_assembly(cpu: Cpu, work: Path) -> tuple[str, list[str]]:
    """distributed-llama's nn-cpu-ops.cpp compiled for ``cpu`` as its Makefile does on that Pi."""
    src = work / "dllama"
    if not src.exists():
        src.mkdir()
        with tarfile.open(DLLAMA_TGZ) as tgz:
            tgz.extractall(src, filter="data")
    flags = ["-std=c++11", "-O3", f"-mcpu={cpu.gcc_cpu}"]
    out = work / f"dllama-{cpu.name}.s"
    subprocess.run(["aarch64-linux-gnu-g++", *flags, "-S", str(src / "src/nn/nn-cpu-ops.cpp"), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return out.read_text(), flags


def edgellm_assembly(path: str, ref: str | None, cpu: Cpu, work: Path) -> tuple[str, list[str]] | None:
    """One of edgellm's kernel sources (working tree, or ``ref``) compiled for ``cpu``; None if absent."""
    if ref is None:
        file = REPO / path
        if not file.exists():
            return None
        text = file.read_text()
    else:
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{path}"], capture_output=True, text=True)
        if shown.returncode:
            return None
        text = shown.stdout
    src = work / f"{ref or 'tree'}-{Path(path).name}".replace("/", "_")
    src.write_text(text)
    flags = ["-O3", "-fopenmp", f"-mcpu={cpu.gcc_cpu}"]
    out = src.with_suffix(f".{cpu.name}.s")
    subprocess.run(["aarch64-linux-gnu-gcc", *flags, "-S", str(src), "-o", str(out)], check=True,
                   capture_output=True, text=True)
    return out.read_text(), flags


def measure(kernels: tuple[Kernel, ...], ref: str | None) -> dict[str, Any]:
    """Every kernel on every CPU model: the JSON this script prints."""
    version = subprocess.run([str(LLVM_MCA), "--version"], capture_output=True, text=True).stdout
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    with tempfile.TemporaryDirectory(prefix="arm-cycles-") as tmp:
        work = Path(tmp)
        for kernel in kernels:
            for cpu in CPUS:
                built = dllama_assembly(cpu, work) if kernel.source == "dllama" else \
                    edgellm_assembly(kernel.source, ref, cpu, work)
                if built is None:
                    missing.append(f"{kernel.name}: no {kernel.source} in {ref or 'the working tree'}")
                    break
                asm, flags = built
                try:
                    symbol, body = function_body(asm, kernel.function)
                except LookupError as exc:
                    missing.append(f"{kernel.name}: {exc} in {kernel.source}")
                    break
                loop = hot_loop(body)
                weights = products(loop, INT_PRODUCTS if kernel.products == "int" else FLOAT_PRODUCTS)
                timing = mca(loop, cpu)
                cpw = timing["cycles_per_iteration"] / weights
                rows.append({"kernel": kernel.name, "dtype": kernel.dtype, "cpu": cpu.name,
                             "mca_cpu": cpu.mca_cpu + (f" {cpu.mca_attr}" if cpu.mca_attr else ""),
                             "compile": " ".join(flags), "function": symbol, "loop_instructions": len(loop),
                             **{k: round(v, 3) for k, v in timing.items()},
                             "weights_per_iteration": weights, "cycles_per_weight": round(cpw, 4),
                             "bytes_per_weight": round(kernel.bytes_per_weight, 4),
                             "cycles_per_byte": round(cpw / kernel.bytes_per_weight, 4),
                             # one core at the nominal clock, everything in L1
                             "core_gb_s_ceiling": round(cpu.ghz / cpw * kernel.bytes_per_weight, 2),
                             "loop": loop})
    return {"llvm_mca": next((line.strip() for line in version.splitlines() if "version" in line), "?"),
            "iterations": ITERATIONS, "source": ref or "working tree",
            "cpus": {c.name: {"gcc": f"-mcpu={c.gcc_cpu}", "llvm_mca": f"-mcpu={c.mca_cpu} {c.mca_attr}".strip(),
                              "ghz": c.ghz} for c in CPUS},
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
