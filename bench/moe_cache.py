"""MoE expert cache at a fixed budget: prediction + prefetch against on-demand loading and
against all experts resident, the expert predictors, the eviction policies, and the I/O bound
of every run, as JSON.

    .venv/bin/python bench/moe_cache.py [--model DIR] [--expert-bits 4] [--caches 2x,25%]
                                        [--tokens 24] [--prompts 3] [--repeats 2] [--runs a,b,...]
                                        [--against DIR] [--disk-mbps MB_S [--disk-model paced|cgroup]]
                                        [--out FILE]

One rank in this process. ``--model DIR`` is a Hugging Face Mixtral-style checkpoint directory
(``scripts/train_tiny_moe.py`` trains one whose routing is learned); without it, a random
Mixtral (8 experts, top-2), whose routers send tokens close to uniformly, the hard case for a
cache. ``--expert-bits 4`` (or 8) writes the routed experts in int4 (int8), as
``edgellm shard --expert-bits 4``; bench/expert_bits.py measures ``--expert-bits auto``.

Each run is measured with each cache of ``--caches``: ``2x`` holds twice one layer's active
experts (for the whole model), ``25%`` a quarter of all experts. Reads drop the page cache
after use, so misses really go to disk. The text is real: ``--prompts`` module docstrings of the
standard library (the corpus the tiny MoE was trained on, so possibly seen in training), each
fed as ``16`` prompt tokens and then ``--tokens`` decode steps of its own continuation (teacher
forcing: every run decodes the same tokens, and the routing is that of real text rather than of
a greedy loop). Only decode steps are timed and counted.

Runs are named ``prefetch_<predictor>[_ungated]_<eviction>`` and ``on_demand_<eviction>``
(``RUNS``). The hit rate counts an expert that was prefetched, landed or not, as a hit.

The I/O bound: ``needed_bytes_per_token`` is what a run's steps had to bring in (experts used
that were not in the cache from an earlier use; wrong guesses are not in it), and
``io_bound_tokens_per_s`` = disk MB/s / needed bytes per token: no run can decode faster, however
well it overlaps reads with compute. The disk MB/s is ``disk_probe``'s, taken right before and
right after every run (``disk_mb_per_s_each``): cold reads of expert blocks through the cache's
own read queue, its piece sizes, depth, page-cache handling (``O_DIRECT`` where the file system
has it) and helping compute thread, with every read queued at once. This VM's disk moved from 361
to 1320 MB/s within an hour, so one figure from the start of a bench bounded runs minutes later
by another disk; and where a run's own reads got more MB/s while in flight than the probes did
(``read_mb_per_s_while_busy``), that figure is the disk's. ``io_bound_fraction`` is the median over
repeats of tok/s / bound, each repeat against its own disk figure; ``io_bound_fraction_probe`` the
same against the probes alone, and ``io_bound_fraction_start_disk`` the median tok/s against the best of
``disk`` (whole experts at 1, 2 and 4 in flight through the page cache, once at the start: the
bound of before). ``disk_bytes_per_token`` is what the block device really read
(``/proc/self/io``), wrong guesses included.

``--disk-mbps 350`` runs the whole bench on a disk of that speed, so that a run measures a Pi's
disk rather than whatever this VM's gives that minute: every expert read waits for its turn on a
paced disk (``paced_disk``; real reads, then a wait), or with ``--disk-model cgroup`` the kernel's
block-I/O throttle (``disk_throttle``, root only; it caps the average over 100 ms slices, so idle
gaps cost nothing under it). The probes then measure that disk.

``--against DIR`` runs every configuration also with the code of another checkout (e.g. main's,
``git archive main | tar -x -C DIR``), on the same shard, interleaved with this checkout's runs;
its runs are named ``<run>@base``, and ``speedup_over_base`` pairs each run with its own ``@base``
within each repeat; which of the two runs first alternates between repeats (the later run of a
pair tended to be faster). Each run of either side is then a fresh process (``python -c``, calling
that checkout's ``bench/moe_cache.py`` ``run``), so that the two do not share imports or threads.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paced_disk import add_disk_arguments, disk_of_speed  # noqa: E402  (bench/ is sys.path[0] as a script)
from page_cache import drop_page_cache  # noqa: E402
from report import emit  # noqa: E402

from worker.comm.collective import StarHub  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.kernels.quant import QuantSpec  # noqa: E402
from worker.memory import expert_cache  # noqa: E402
from worker.memory.expert_reads import ReadQueue  # noqa: E402
from worker.models.moe import MoeRankModel, Predictor  # noqa: E402
from worker.rank.executor import Executor  # noqa: E402
from worker.rank.runtime import RankSpec  # noqa: E402
from worker.rank.step import SeqSpan  # noqa: E402
from worker.shards.shard_file import ShardFile, aligned_buffer  # noqa: E402
from worker.shards.shard_writer import write_shards  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402
from worker.shards.weights import expert_block, rank_shard_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "server" / "default_model"
SHAPE: dict[str, Any] = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=4096, num_local_experts=8, num_experts_per_tok=2,
                             max_position_embeddings=512)
PROMPT_TOKENS = 16
TEXT_MODULES = ("json", "subprocess", "argparse", "logging", "threading", "collections", "pathlib", "csv",
                "random", "datetime")
# name -> (eviction policy, prefetch, predictor, gated); all_resident has no cache limit. A gated
# prefetch reads a layer's guesses only where worker.memory.prefetch_gate expects them to pay; "ungated"
# reads every guess (still only while no demand read waits, and cancelled when wrong).
RUNS: dict[str, tuple[str, bool, str, bool]] = {
    "prefetch_temporal_distance": ("distance", True, "temporal", True),
    "prefetch_router_distance": ("distance", True, "router", True),
    "prefetch_input_distance": ("distance", True, "input", True),
    "prefetch_adaptive_distance": ("distance", True, "adaptive", True),
    "prefetch_union_distance": ("distance", True, "union", True),
    "prefetch_adaptive_lru": ("lru", True, "adaptive", True),
    "prefetch_adaptive_frequency": ("frequency", True, "adaptive", True),
    "prefetch_adaptive_ungated_distance": ("distance", True, "adaptive", False),
    "prefetch_union_ungated_distance": ("distance", True, "union", False),
    "prefetch_router_ungated_distance": ("distance", True, "router", False),
    "prefetch_input_ungated_distance": ("distance", True, "input", False),
    "prefetch_temporal_ungated_distance": ("distance", True, "temporal", False),
    "prefetch_oracle_distance": ("distance", True, "oracle", True),
    "prefetch_oracle_ungated_distance": ("distance", True, "oracle", False),
    "on_demand_distance": ("distance", False, "temporal", True),
    "on_demand_lru": ("lru", False, "temporal", True),
    "on_demand_frequency": ("frequency", False, "temporal", True),
    "all_resident": ("distance", False, "temporal", True),
}
# --caches: "2x" is twice one layer's active experts, "25%" a quarter of all experts, "per-layer"
# twice the active experts of every layer, or a number of experts.
CACHES = ("2x", "25%")


def disk_bytes() -> int:
    """Bytes this process has had read from the block device (``/proc/self/io``: what really came
    from disk, read-ahead and wrong guesses included, page-cache copies not)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def texts(model_dir: Path, count: int, tokens: int) -> list[list[int]]:
    """``count`` token sequences of real text, each ``PROMPT_TOKENS + tokens`` long."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir if (model_dir / "tokenizer.json").exists()
                                                        else TOKENIZER)
    out = []
    for name in TEXT_MODULES:
        doc = inspect.getdoc(__import__(name)) or ""
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= PROMPT_TOKENS + tokens:
            out.append([tokenizer.bos_token_id, *ids[: PROMPT_TOKENS + tokens - 1]])
        if len(out) == count:
            return out
    raise SystemExit(f"only {len(out)} docstrings have {PROMPT_TOKENS + tokens} tokens; ask for fewer")


def build(out: Path, model: Path | None, expert_bits: int | None) -> Path:
    if model is None:
        import transformers

        torch.manual_seed(0)
        model = out / "hf"
        transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE)).save_pretrained(model)
    config = ModelConfig.from_dir(model)
    quant = QuantSpec(bits=None, expert_bits=expert_bits) if expert_bits else None
    return write_shards(model, plan_shards(config, [1.0]), out / "shards", progress=False, quant=quant)


class OraclePredictor(Predictor):
    """Always right: names the experts each layer will route to next, from ``routing_trace`` of the
    same decode (every run decodes the same tokens, and a streamed step gives the bits of a resident
    one). Not a predictor a server can have: it measures what prefetch could give on this machine
    with perfect guesses, so that a shortfall can be told apart from the predictors' own."""

    def __init__(self, like: Predictor, trace: list[tuple[int, tuple[int, ...]]]):
        super().__init__(like.routers, like.norms, like.eps, like.top_k, "router")
        self.trace, self.cursor = trace, 0  # cursor: the trace's entry of the layer about to route

    def predict(self, layer: int, hidden: torch.Tensor) -> set[int]:
        """``layer``'s next routing not yet made: asked after the current layer routed (the
        cursor is past it), or before it, for a layer other than the current one."""
        for at in range(self.cursor, len(self.trace)):
            if self.trace[at][0] == layer:
                return set(self.trace[at][1])
        return set()

    def predict_at_input(self, layer: int, hidden: torch.Tensor) -> set[int]:
        return set()

    def routed(self, layer: int, needed: list[int]) -> None:
        if self.trace[self.cursor] != (layer, tuple(needed)):
            raise RuntimeError(f"the decode left the recorded routing at layer {layer}: the oracle is void")
        self.cursor += 1


def _on_begin_layer(executor: Executor, hook: Callable[[int, list[int]], None]) -> None:
    """Call ``hook(layer, needed)`` on every ``ExpertCache.begin_layer`` of ``executor``'s model."""
    assert isinstance(executor.model, MoeRankModel)
    cache = executor.model.experts
    begin = cache.begin_layer

    def begin_layer(layer: int, needed: Iterable[int]) -> list[int]:
        needed = list(needed)
        hook(layer, needed)
        return begin(layer, needed)

    cache.begin_layer = begin_layer  # type: ignore[method-assign]  # a bench hook on one instance


def _prefill(executor: Executor, seq: list[int]) -> None:
    executor.step([seq[:PROMPT_TOKENS]], [SeqSpan(0, 0, PROMPT_TOKENS)])


def _decode_step(executor: Executor, seq: list[int], pos: int) -> int:
    return int(executor.step([[seq[pos]]], [SeqSpan(0, pos, 1)])[0].argmax())


def routing_trace(shard_dir: Path, sequences: list[list[int]]) -> list[tuple[int, tuple[int, ...]]]:
    """(layer, experts routed to) of every MoE layer step of ``run``'s decode of ``sequences``, in
    order, decoded all resident."""
    config = ModelConfig.from_dir(shard_dir)
    executor = Executor(RankSpec(str(shard_dir), config, plan_shards(config, [1.0])[0], 1, 256, prefetch=False),
                        StarHub(1))
    trace: list[tuple[int, tuple[int, ...]]] = []
    _on_begin_layer(executor, lambda layer, needed: trace.append((layer, tuple(needed))))
    try:
        for seq in sequences:
            _prefill(executor, seq)
            for pos in range(PROMPT_TOKENS, len(seq)):
                _decode_step(executor, seq, pos)
    finally:
        executor.close()
    return trace


def run(shard_dir: Path, sequences: list[list[int]], cache: int | None, policy: str, prefetch: bool,
        predictor: str, gated: bool = True) -> dict[str, Any]:
    config = ModelConfig.from_dir(shard_dir)
    trace = routing_trace(shard_dir, sequences) if predictor == "oracle" else None
    spec = RankSpec(str(shard_dir), config, plan_shards(config, [1.0])[0], 1, 256, expert_cache_bytes=cache,
                    expert_policy=policy, prefetch=prefetch,
                    expert_predictor="router" if trace is not None else predictor)
    expert_cache.GATED = gated  # not a RankSpec field: a bench switch the cache reads when built
    try:
        executor = Executor(spec, StarHub(1))
    finally:
        expert_cache.GATED = True
    if trace is not None:
        assert isinstance(executor.model, MoeRankModel) and executor.model.predictor is not None
        oracle = executor.model.predictor = OraclePredictor(executor.model.predictor, trace)
        _on_begin_layer(executor, oracle.routed)
    keys = ("expert_hits", "expert_misses", "expert_bytes_read", "expert_stall_seconds", "expert_late_prefetches",
            "expert_prefetches", "expert_prefetch_bytes", "expert_prefetch_bytes_read", "expert_prefetch_skipped",
            "expert_cancelled_prefetches", "expert_predicted", "expert_predicted_used", "expert_used",
            "expert_fetched_bytes")
    total = dict.fromkeys(keys, 0.0)
    elapsed = busy = 0.0
    from_disk = 0
    argmax: list[int] = []
    reads = getattr(getattr(executor.model, "experts", None), "reads", None)  # None: all resident
    try:
        for seq in sequences:
            _prefill(executor, seq)
            # cold for the decode: loading the dense blocks read ahead into experts' pages (default
            # read-ahead of the loader's descriptor), which on-demand runs then found in memory
            drop_page_cache(rank_shard_path(shard_dir, spec.shard))
            before = executor.rank.stats()
            disk_before = disk_bytes()
            busy_before = getattr(reads, "busy_seconds", 0.0)  # main's code has none
            start = time.perf_counter()
            for pos in range(PROMPT_TOKENS, len(seq)):
                argmax.append(_decode_step(executor, seq, pos))
            elapsed += time.perf_counter() - start
            busy += getattr(reads, "busy_seconds", 0.0) - busy_before
            from_disk += disk_bytes() - disk_before
            after = executor.rank.stats()
            for key in keys:
                total[key] += after.get(key, 0) - before.get(key, 0)
    finally:
        executor.close()
    tokens = sum(len(s) - PROMPT_TOKENS for s in sequences)
    lookups = total["expert_hits"] + total["expert_misses"]
    return {"tokens_per_s": tokens / elapsed,
            "needed_bytes_per_token": total["expert_fetched_bytes"] / tokens,
            "disk_bytes_per_token": from_disk / tokens,
            "prefetch_bytes_read_per_token": total["expert_prefetch_bytes_read"] / tokens,
            "guesses_skipped_per_token": total["expert_prefetch_skipped"] / tokens,
            "hit_rate": total["expert_hits"] / lookups if lookups else 1.0,
            "recall": total["expert_predicted_used"] / total["expert_used"] if total["expert_used"] else 0.0,
            "precision": total["expert_predicted_used"] / total["expert_predicted"] if total["expert_predicted"]
            else 0.0,
            "bytes_read_per_token": total["expert_bytes_read"] / tokens,
            "prefetch_bytes_per_token": total["expert_prefetch_bytes"] / tokens,
            "stall_ms_per_token": 1000 * total["expert_stall_seconds"] / tokens,
            "prefetches_per_token": total["expert_prefetches"] / tokens,
            "cancelled_prefetches_per_token": total["expert_cancelled_prefetches"] / tokens,
            "late_prefetches": total["expert_late_prefetches"], "argmax": argmax,
            # the MB/s the run's reads got while at least one was in flight (None: not measured)
            "read_mb_per_s_while_busy": total["expert_bytes_read"] / busy / 1e6 if busy else None,
            "disk_idle_ms_per_token": 1000 * (elapsed - busy) / tokens if busy else None,
            # the gate's state after the last prompt: layers reading ahead, and layers it measured losing
            "prefetch_layers_open": after.get("expert_prefetch_layers_open", 0),
            "prefetch_layers_off": after.get("expert_prefetch_layers_off", 0)}


ISOLATED_RUN = """
import json, logging, sys
from pathlib import Path
args = json.loads(sys.stdin.read())
sys.path[:0] = [args["code"] + "/bench", args["code"]]
if args["pace"]:  # this checkout's pacing, on the other checkout's reads
    sys.path.append(args["here"])
    import paced_disk
    from worker.shards.shard_file import ShardFile
    paced_disk.pace_reads(ShardFile, args["pace"])
import torch
torch.set_num_threads(args["threads"])
logging.basicConfig(level=logging.WARNING)
import moe_cache
result = moe_cache.run(Path(args["shard_dir"]), args["sequences"], args["cache"], *args["config"])
print(json.dumps(result))
"""


def run_isolated(code: Path, shard_dir: Path, sequences: list[list[int]], cache: int | None,
                 config: tuple[str, bool, str, bool], threads: int, pace: float | None = None) -> dict[str, Any]:
    """``run`` in a fresh process, with the ``worker`` and ``bench`` of the checkout ``code``;
    ``pace``: its expert reads on a paced disk of that many MB/s (``paced_disk``)."""
    args = {"code": str(code), "shard_dir": str(shard_dir), "sequences": sequences, "cache": cache,
            "config": list(config), "threads": threads, "pace": pace, "here": str(REPO / "bench")}
    out = subprocess.run([sys.executable, "-c", ISOLATED_RUN], input=json.dumps(args), capture_output=True,
                         text=True, check=False, cwd=code, timeout=1800)
    if out.returncode:
        raise SystemExit(f"a run with the code of {code} failed:\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _reader(file: ShardFile, todo: list[str], lock: threading.Lock, size: int) -> None:
    buffer = torch.empty(size, dtype=torch.uint8)
    while True:
        with lock:
            if not todo:
                return
            block = todo.pop()
        file.read_into(block, buffer)


def disk(shard_dir: Path, config: ModelConfig, reads: int = 32) -> dict[str, float]:
    """MB/s of cold reads of whole expert blocks with 1, 2 and 4 in flight, through a descriptor
    opened as the expert cache opens it (no read-ahead past a block, pages dropped after each
    read); each depth twice, interleaved, the best kept. ``disk_bytes_per_read_byte`` is what the
    block device really read per byte asked (1.0: no read-ahead waste)."""
    file = ShardFile(rank_shard_path(shard_dir, plan_shards(config, [1.0])[0]), random_access=True)
    blocks = [expert_block(m, e) for m in range(config.num_layers) for e in range(config.num_experts)
              if file.has(expert_block(m, e))]
    blocks = blocks[:: max(1, len(blocks) // reads)][:reads]  # spread over the file, as the routers spread reads
    nbytes = sum(file.block_bytes(b) for b in blocks)
    out: dict[str, float] = {}
    asked = device = 0
    try:
        for depth in (1, 2, 4, 1, 2, 4):
            drop_page_cache(file.path)
            todo = list(blocks)
            lock = threading.Lock()
            size = max(file.block_bytes(b) for b in blocks)
            before = disk_bytes()
            start = time.perf_counter()
            threads = [threading.Thread(target=_reader, args=(file, todo, lock, size)) for _ in range(depth)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            key = f"read_mb_per_s_depth_{depth}"
            out[key] = max(out.get(key, 0.0), nbytes / (time.perf_counter() - start) / 1e6)
            asked, device = asked + nbytes, device + disk_bytes() - before
    finally:
        file.close()
    out["best_mb_per_s"] = max(out.values())
    out["disk_bytes_per_read_byte"] = round(device / asked, 3) if device else float("nan")
    return out


def disk_probe(shard_dir: Path, config: ModelConfig, reads: int | None = None,
               depth: int = expert_cache.DEFAULT_READ_DEPTH, direct: bool = True) -> dict[str, float]:
    """MB/s of cold reads of expert blocks as a streamed run reads them: every expert of the file
    (or ``reads`` of them, spread over it; a run reads any of them, and the VM's disk was faster
    on blocks read shortly before, as from a host cache: 0.9-2.4 GB/s against 0.6-1.2), through the cache's own read queue (``ReadQueue``: its reader threads, its
    pieces, its page-cache drops, ``depth`` in flight), the calling thread helping with each read
    in turn as the compute thread does, every read queued at once so the disk never waits on
    compute; ``O_DIRECT`` where the file system has it, as the cache's file (``direct``). Taken right before and right after each run (``main``): the disk of this VM moved
    from 361 to 1320 MB/s within an hour, so a figure from another minute bounds nothing."""
    file = ShardFile(rank_shard_path(shard_dir, plan_shards(config, [1.0])[0]), random_access=True, direct=direct)
    blocks = [expert_block(m, e) for m in range(config.num_layers) for e in range(config.num_experts)
              if file.has(expert_block(m, e))]
    if reads is not None:
        blocks = blocks[:: max(1, len(blocks) // reads)][:reads]
    size = max(file.block_bytes(b) for b in blocks)
    lock = threading.RLock()
    cond = threading.Condition(lock)
    queue = ReadQueue(file, cond, depth, work=threading.Condition(lock))
    try:
        drop_page_cache(file.path)
        buffers = [file.place(b, aligned_buffer(size)) for b in blocks]
        before = disk_bytes()
        start = time.perf_counter()
        with cond:
            pending = [queue.submit(b, buf, demand=True) for b, buf in zip(blocks, buffers, strict=True)]
        for read in pending:
            queue.help(read)
        seconds = time.perf_counter() - start
        device = disk_bytes() - before
    finally:
        queue.close()
        file.close()
    nbytes = sum(file.block_bytes(b) for b in blocks)
    return {"mb_per_s": nbytes / seconds / 1e6, "mb": nbytes / 1e6, "seconds": seconds,
            "disk_bytes_per_read_byte": round(device / nbytes, 3)}


def largest_expert(shard_dir: Path, config: ModelConfig) -> int:
    """Bytes of the rank's largest expert block (the size of every cache buffer)."""
    file = ShardFile(rank_shard_path(shard_dir, plan_shards(config, [1.0])[0]))
    try:
        return max(file.block_bytes(expert_block(m, e)) for m in range(config.num_layers)
                   for e in range(config.num_experts) if file.has(expert_block(m, e)))
    finally:
        file.close()


@contextmanager
def scratch(shards: Path | None) -> Iterator[Path]:
    """A temporary directory to build the shard in, or none where ``shards`` names one built already."""
    if shards is not None:
        yield shards
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def cache_experts(choice: str, config: ModelConfig, moe_layers: int) -> int:
    """Experts the cache holds for a ``--caches`` item."""
    active = config.experts_per_token
    if choice == "2x":
        return 2 * active
    if choice == "per-layer":
        return 2 * active * moe_layers
    if choice.endswith("%"):
        return max(active, round(float(choice[:-1]) / 100 * config.num_experts * moe_layers))
    return int(choice)


def io_bound(result: dict[str, Any], mb_per_s: float) -> dict[str, Any]:
    """The decode speed the disk allows a run: the bytes its steps had to bring in (experts used that
    were not cached from an earlier use) at the disk's throughput, and the share of it the run
    reached. Compute is not in it: no run can beat it, however well it overlaps.

    Per repeat (``io_bound_fraction_each``; ``io_bound_fraction`` is their median): that repeat's
    tok/s and needed bytes against the disk's MB/s then, the higher of the mean of the two
    ``disk_probe`` figures taken right before and right after it (reads as the run makes them) and
    the MB/s the run's own reads got while one was in flight (this checkout's code measures it; a
    disk that delivered that much could have, so a run never beats its bound).
    ``io_bound_fraction_probe`` uses the probes alone, ``io_bound_fraction_start_disk`` the best of
    ``disk`` at the start (``mb_per_s``, the one figure of before) with the median tok/s."""
    needed = result["needed_bytes_per_token"]
    if not needed:  # nothing read: no bound
        return {"io_bound_tokens_per_s": None, "io_bound_fraction": None, "io_bound_fraction_each": None,
                "io_bound_fraction_probe": None, "io_bound_fraction_start_disk": None}
    probes = [statistics.mean(probe) for probe in result["disk_mb_per_s_each"]]
    disks = [max(probe, busy or 0.0) for probe, busy in zip(probes, result["read_mb_per_s_while_busy_each"],
                                                             strict=True)]
    work = list(zip(result["tokens_per_s_each"], result["needed_bytes_per_token_each"], strict=True))
    each = [tps * need / (disk * 1e6) for (tps, need), disk in zip(work, disks, strict=True)]
    probe_each = [tps * need / (probe * 1e6) for (tps, need), probe in zip(work, probes, strict=True)]
    median = statistics.median(result["tokens_per_s_each"])
    return {"io_bound_tokens_per_s": statistics.median(disks) * 1e6 / needed,
            "io_bound_fraction": statistics.median(each), "io_bound_fraction_each": each,
            "io_bound_fraction_probe": statistics.median(probe_each),
            "io_bound_fraction_start_disk": median * needed / (mb_per_s * 1e6)}


def paired_ratios(runs: dict[str, dict[str, Any]], base: str) -> dict[str, float]:
    """Each run's tok/s over ``base``'s in the same repeat, the median over repeats: runs of one
    repeat are minutes apart at most, so a busy stretch of a shared machine hits both sides of a
    ratio, where a ratio of bests pairs one run's lucky minute with another's unlucky one."""
    out = {}
    for name, result in runs.items():
        pairs = zip(result["tokens_per_s_each"], runs[base]["tokens_per_s_each"], strict=False)
        out[name] = statistics.median(a / b for a, b in pairs)
    return out


TRAIN_HINT = ("make it first (bench/results/ is git-ignored; about 25 minutes on one core): .venv/bin/python "
              "scripts/train_tiny_moe.py --output bench/results/tiny_moe_8l --layers 8 --minutes 25 --threads 1")


def require_model(model: Path | None) -> None:
    """Stop with how to make the trained tiny MoE when ``--model`` names a checkpoint that is not there."""
    if model is not None and not (model / "config.json").exists():
        raise SystemExit(f"{model} holds no checkpoint; {TRAIN_HINT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="a trained HF Mixtral checkpoint dir (scripts/train_tiny_moe.py); default: random")
    parser.add_argument("--expert-bits", type=int, choices=(4, 8), default=None,
                        help="routed experts in int4/int8 (default: fp32 like the rest)")
    parser.add_argument("--tokens", type=int, default=24, help="decode steps per prompt")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--caches", default=",".join(CACHES),
                        help="comma-separated cache sizes: '2x' (twice one layer's active experts), '25%%' (a quarter "
                             "of all experts), 'per-layer' (twice every layer's active experts) or a number of experts")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved runs of each configuration; tokens_per_s is the best, tokens_per_s_each every one, "
                             "speedups the median of ratios within a repeat, the other figures the last")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--against", type=Path, default=None,
                        help="a checkout of other code (e.g. main's) to run every configuration with too, interleaved")
    add_disk_arguments(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    require_model(args.model)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    names = args.runs.split(",")
    if unknown := set(names) - set(RUNS):
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory() as tmp, disk_of_speed(Path(tmp), args.disk_mbps, args.disk_model, ShardFile):
        shard_dir = build(Path(tmp), args.model, args.expert_bits)
        config = ModelConfig.from_dir(shard_dir)
        sequences = texts(args.model or TOKENIZER, args.prompts, args.tokens)
        moe_layers = sum(config.is_moe_layer(layer) for layer in range(config.num_layers))
        file = ShardFile(rank_shard_path(shard_dir, plan_shards(config, [1.0])[0]))
        expert_bytes = max(file.block_bytes(expert_block(m, e)) for m in range(config.num_layers)
                           for e in range(config.num_experts) if file.has(expert_block(m, e)))
        file.close()
        caches = {c: cache_experts(c, config, moe_layers) for c in args.caches.split(",")}
        io = disk(shard_dir, config)
        per_cache: dict[str, dict[str, dict[str, Any]]] = {c: {} for c in caches}
        for repeat in range(args.repeats):  # interleaved, so a busy moment of the machine hits every run alike
            # --against: which side runs first alternates (ABBA): in a round of main, this, this, main
            # (trained MoE, 2x cache, 4 rounds) the second of the same code ran 1.12-1.18x the first
            codes: list[Path | None] = [REPO, args.against] if args.against else [None]
            if repeat % 2:
                codes.reverse()
            for name in names:
                for choice, experts in caches.items():
                    if name == "all_resident" and choice != next(iter(caches)):
                        continue  # no cache limit: once is enough
                    size = None if name == "all_resident" else experts * expert_bytes
                    for code in codes:
                        # the disk right before and right after the run, read as the run reads it
                        before = disk_probe(shard_dir, config) if size is not None else None
                        drop_page_cache(file.path)  # every run starts cold
                        if code is None:
                            result = run(shard_dir, sequences, size, *RUNS[name])
                        else:
                            pace = args.disk_mbps if args.disk_model == "paced" else None
                            result = run_isolated(code, shard_dir, sequences, size, RUNS[name], args.threads, pace)
                        after = disk_probe(shard_dir, config) if before is not None else None
                        key = name if code in (None, REPO) else f"{name}@base"
                        runs = per_cache[choice]
                        old = runs.get(key, {})
                        every = old.get("tokens_per_s_each", []) + [result["tokens_per_s"]]
                        needed = old.get("needed_bytes_per_token_each", []) + [result["needed_bytes_per_token"]]
                        probes = old.get("disk_mb_per_s_each", []) + (
                            [[before["mb_per_s"], after["mb_per_s"]]] if before and after else [])
                        busy = old.get("read_mb_per_s_while_busy_each", []) + [result.get("read_mb_per_s_while_busy")]  # main's run has none
                        runs[key] = result | {"tokens_per_s": max(every), "tokens_per_s_each": every,
                                              "needed_bytes_per_token_each": needed, "disk_mb_per_s_each": probes,
                                              "read_mb_per_s_while_busy_each": busy}
    reference = next(iter(per_cache.values()))[names[-1]]["argmax"]
    same = all(r.pop("argmax") == reference for runs in per_cache.values() for r in runs.values())
    report: dict[str, Any] = {
        "model": str(args.model) if args.model else "random", "shape": {
            "hidden_size": config.hidden_size, "layers": config.num_layers, "experts": config.num_experts,
            "top_k": config.experts_per_token, "expert_width": config.moe_intermediate_size},
        "expert_bits": args.expert_bits or 32, "threads": torch.get_num_threads(), "expert_bytes": expert_bytes,
        "against": str(args.against) if args.against else None,
        "decode_tokens": sum(len(s) - PROMPT_TOKENS for s in sequences),
        "page_cache": "posix_fadvise(DONTNEED) after every read", "disk": io, "disk_cap_mb_per_s": args.disk_mbps,
        "disk_model": args.disk_model if args.disk_mbps else None,
        "same_tokens_in_every_run": same,
        "caches": {}}
    for choice, runs in per_cache.items():
        for result in runs.values():
            result |= io_bound(result, io["best_mb_per_s"])
        entry: dict[str, Any] = {"cache_experts": caches[choice], "cache_bytes": caches[choice] * expert_bytes,
                                 "runs": runs}
        if "on_demand_distance" in runs:
            entry["speedup_over_on_demand_distance"] = paired_ratios(runs, "on_demand_distance")
        if args.against:
            entry["speedup_over_base"] = {name: statistics.median(
                a / b for a, b in zip(runs[name]["tokens_per_s_each"], runs[f"{name}@base"]["tokens_per_s_each"],
                                      strict=False)) for name in names if f"{name}@base" in runs}
        report["caches"][choice] = entry
    emit(report, args.out)


if __name__ == "__main__":
    main()
