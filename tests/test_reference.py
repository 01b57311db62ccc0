"""Our sharded logits against transformers' on the same tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from tests.harness import inprocess_cluster
from tests.tiny_models import load_reference
from worker.kernels import native
from worker.rank.step import SeqSpan

RANK_WEIGHTS = {1: [1.0], 2: [1.0, 1.0], 3: [2.0, 1.0, 1.0], 4: [1.0, 1.0, 1.0, 1.0]}
PROMPT = [1, 17, 42, 99, 7, 250, 31, 5, 64, 128, 3, 77, 200, 11]  # 14 tokens > mistral's window of 12
DECODE_STEPS = 16
TOL = 1e-4


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2"])
def test_logits_match_transformers(checkpoints, arch: str, ranks: int) -> None:
    _check_logits(checkpoints(arch), arch, ranks)


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3_moe"])
def test_logits_match_transformers_with_torch_kernels_only(checkpoints, arch: str, ranks: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the native kernels do not build (a Pi, no compiler), decode runs torch's ops:
    SDPA attention, RMSNorm and SiLU, with q/k norms between projection and RoPE for qwen3_moe."""
    for name in native._WRAPPERS:
        monkeypatch.setitem(native._loaded, name, None)
    _check_logits(checkpoints(arch), arch, ranks)


def _check_logits(model_dir, arch: str, ranks: int) -> None:
    """A prompt and DECODE_STEPS one-token steps match the reference's logits within TOL."""
    reference = load_reference(model_dir)
    torch.manual_seed(ranks)
    decode = torch.randint(3, reference.config.vocab_size, (DECODE_STEPS,)).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT + decode])).logits[0]  # (T, V)
    with inprocess_cluster(model_dir, RANK_WEIGHTS[ranks]) as executor:
        prefill = executor.step([PROMPT], [SeqSpan(slot=1, start=0, length=len(PROMPT))], all_logits=True)
        got = [prefill]
        for i, token in enumerate(decode):
            got.append(executor.step([[token]], [SeqSpan(slot=1, start=len(PROMPT) + i, length=1)]))
    ours = torch.cat(got)
    assert ours.shape == expected.shape
    diff = (ours - expected).abs().max().item()
    assert diff <= TOL, f"{arch} with {ranks} ranks: max abs logit diff {diff}"


def _generate_with_engine(model_dir, weights: list[float], prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy generation through the real engine, all prompts batched together."""
    import asyncio

    from server.engine import Engine, EngineLimits
    from server.sampler import SamplingParams
    from server.tokenizer import TextTokenizer

    async def run(engine: Engine) -> list[list[int]]:
        requests = [engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=0.0)) for p in prompts]
        for req in requests:
            async for _ in req.stream():
                pass
        return [req.output for req in requests]

    with inprocess_cluster(model_dir, weights) as executor:
        engine = Engine(executor, TextTokenizer(model_dir), EngineLimits(max_batch=4, max_context=128))
        engine.start()
        try:
            return asyncio.run(run(engine))
        finally:
            engine.stop()


@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_tokens_match_transformers_generate(checkpoints, arch: str, ranks: int) -> None:
    model_dir = checkpoints(arch)
    reference = load_reference(model_dir)
    prompts = [PROMPT, PROMPT[:5], [1, 300, 2, 150]]
    expected = []
    for prompt in prompts:
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
        expected.append(out[0, len(prompt):].tolist())
    got = _generate_with_engine(model_dir, RANK_WEIGHTS[ranks], prompts, max_tokens=20)
    assert got == expected


def test_chunked_prefill_generates_the_same_tokens(checkpoints) -> None:
    """A prompt prefilled 4 tokens per step, beside other sequences, equals one whole prefill."""
    import asyncio

    from server.engine import Engine, EngineLimits
    from server.sampler import SamplingParams
    from server.tokenizer import TextTokenizer

    model_dir = checkpoints("llama")
    prompts = [PROMPT * 3, PROMPT[:3], PROMPT[::-1]]

    async def run(engine: Engine) -> list[list[int]]:
        reqs = [engine.submit(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)) for p in prompts]
        for req in reqs:
            async for _ in req.stream():
                pass
        return [r.output for r in reqs]

    outputs = []
    for chunk in (4, 256):
        with inprocess_cluster(model_dir, [1.0, 1.0]) as executor:
            engine = Engine(executor, TextTokenizer(model_dir), EngineLimits(max_batch=4, max_context=128,
                                                                             prefill_chunk=chunk))
            engine.start()
            try:
                outputs.append(asyncio.run(run(engine)))
            finally:
                engine.stop()
            if chunk == 4:
                assert engine.steps > 12 + len(PROMPT * 3) // 4, "the long prompt must take several steps"
    assert outputs[0] == outputs[1]


def test_a_request_that_cannot_start_fails_alone_and_the_engine_keeps_serving(checkpoints) -> None:
    """A seed the generator cannot take (the API validates seeds as int64; the engine must not rely
    on it: a seed of 2**64 once killed the engine thread) ends that request with an error event;
    the request beside it and the next one are served."""
    import asyncio

    from server.engine import Engine, EngineLimits
    from server.sampler import SamplingParams
    from server.tokenizer import TextTokenizer

    model_dir = checkpoints("llama")
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def finish(req) -> list:
        return [event async for event in req.stream()]

    async def run(engine: Engine) -> tuple[list, list, list]:
        bad = engine.submit(PROMPT, SamplingParams(max_tokens=6, seed=1.5))  # type: ignore[arg-type]
        good = engine.submit(PROMPT, greedy)
        first = await asyncio.wait_for(asyncio.gather(finish(bad), finish(good)), 60)
        after = engine.submit(PROMPT, greedy)
        return *first, await asyncio.wait_for(finish(after), 60)

    with inprocess_cluster(model_dir, [1.0]) as executor:
        engine = Engine(executor, TextTokenizer(model_dir), EngineLimits(max_batch=2, max_context=64))
        engine.start()
        try:
            bad, good, after = asyncio.run(run(engine))
        finally:
            engine.stop()
    assert len(bad) == 1 and bad[0].error_code == "internal_error" and "could not start" in bad[0].error
    assert [e.token for e in good] == [e.token for e in after] and len(good) == 6
    assert good[-1].finish_reason == "length"


@pytest.mark.parametrize("fault", ["nan_logits", "step_raises"])
def test_a_fault_that_repair_cannot_fix_fails_the_request_instead_of_looping(checkpoints, fault: str) -> None:
    """NaN logits (corrupted weights) end their request with an error; a step that keeps failing
    while the cluster is whole is replayed at most ``MAX_REPLAYS`` times, then its request fails.
    Either way the client gets an answer and the next request is served."""
    import asyncio

    from server import engine as engine_module
    from server.engine import Engine, EngineLimits
    from server.sampler import SamplingParams
    from server.tokenizer import TextTokenizer

    model_dir = checkpoints("llama")
    params = SamplingParams(max_tokens=4, temperature=0.7, seed=1)
    repairs: list[float] = []

    async def events(engine: Engine) -> list:
        return [e async for e in engine.submit(PROMPT, params).stream()]

    with inprocess_cluster(model_dir, [1.0]) as executor:
        real_step = executor.step

        def broken_step(tokens, spans):  # type: ignore[no-untyped-def]
            if fault == "step_raises":
                raise RuntimeError("a bug in the step")
            return torch.full_like(real_step(tokens, spans), float("nan"))

        engine = Engine(executor, TextTokenizer(model_dir), EngineLimits(max_batch=2, max_context=64),
                        recover=lambda deadline: repairs.append(deadline) or True)
        engine.start()
        try:
            executor.step = broken_step  # type: ignore[method-assign]
            failed = asyncio.run(asyncio.wait_for(events(engine), 60))
            executor.step = real_step  # type: ignore[method-assign]
            served = asyncio.run(asyncio.wait_for(events(engine), 60))
        finally:
            engine.stop()
    assert len(failed) == 1 and failed[0].error_code == "internal_error"
    assert len(repairs) == (engine_module.MAX_REPLAYS + 1 if fault == "step_raises" else 0)
    assert served[-1].finish_reason == "length" and len(served) == 4


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3_moe"])
def test_batched_decode_equals_each_sequence_alone(checkpoints, arch: str, ranks: int) -> None:
    """A decode step of several one-token sequences attends in one call over the longest one's
    cache rows, masked per sequence (``worker.rank.step.DecodeBatch``). Its logits equal those of each
    sequence decoded alone: with consecutive and scattered slots, a prompt longer than mistral's
    window, and slots that held a longer sequence before (stale keys must stay masked)."""
    prompts = [PROMPT, PROMPT[:5], [1, 300, 2, 150]]
    decode = [[9, 33, 71], [120, 4, 56], [17, 17, 200]]  # per step, one token per sequence
    stale = [(7 * i) % 250 + 3 for i in range(40)]
    with inprocess_cluster(checkpoints(arch), RANK_WEIGHTS[ranks]) as executor:
        alone = []
        for i, prompt in enumerate(prompts):
            executor.step([prompt], [SeqSpan(slot=0, start=0, length=len(prompt))])
            rows = [executor.step([[step[i]]], [SeqSpan(slot=0, start=len(prompt) + n, length=1)])
                    for n, step in enumerate(decode)]
            alone.append(torch.cat(rows))  # (steps, V)
        for slots in ([0, 1, 2], [3, 0, 2]):
            for slot in slots:
                executor.step([stale], [SeqSpan(slot=slot, start=0, length=len(stale))])
            for slot, prompt in zip(slots, prompts, strict=True):
                executor.step([prompt], [SeqSpan(slot=slot, start=0, length=len(prompt))])
            for n, step in enumerate(decode):
                spans = [SeqSpan(slot=s, start=len(p) + n, length=1) for s, p in zip(slots, prompts, strict=True)]
                batched = executor.step([[t] for t in step], spans)  # (3, V)
                for i in range(len(prompts)):
                    diff = (batched[i] - alone[i][n]).abs().max().item()
                    assert diff <= 1e-5, f"{arch}, {ranks} ranks, slots {slots}, sequence {i}, step {n}: {diff}"


def test_a_queued_request_whose_client_left_frees_its_queue_place(checkpoints) -> None:
    """Clients that time out while queued (the route marks their requests cancelled) used to
    keep their queue places until each would have reached a slot: a live client was then
    refused with queue_full by their ghosts."""
    import asyncio

    from server.engine import Engine, EngineLimits, QueueFull
    from server.sampler import SamplingParams
    from server.tokenizer import TextTokenizer

    model_dir = checkpoints("llama")
    params = SamplingParams(max_tokens=4, temperature=0.0)

    async def run(engine: Engine) -> list[int]:
        gone = [engine.submit([1, 2, 3], params) for _ in range(2)]  # the queue holds 2: full
        with pytest.raises(QueueFull):
            engine.submit([1, 2, 3], params)
        for req in gone:
            req.cancelled = True  # what the route does when their clients disconnect
        live = engine.submit([1, 2, 3], params)  # not refused: the ghosts' places are free
        assert engine.num_waiting == 1
        engine.start()
        async for _ in live.stream():
            pass
        return live.output

    with inprocess_cluster(model_dir, [1.0]) as executor:
        engine = Engine(executor, TextTokenizer(model_dir), EngineLimits(max_batch=1, max_context=64, max_waiting=2))
        try:
            output = asyncio.run(run(engine))
        finally:
            engine.stop()
    assert len(output) == 4
    assert engine.metrics.requests.labels("cancelled")._value.get() == 2
