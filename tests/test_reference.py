"""Our sharded logits against transformers' on the same tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from tests.harness import inprocess_cluster
from tests.tiny_models import load_reference
from worker.step import SeqSpan

RANK_WEIGHTS = {1: [1.0], 2: [1.0, 1.0], 3: [2.0, 1.0, 1.0], 4: [1.0, 1.0, 1.0, 1.0]}
PROMPT = [1, 17, 42, 99, 7, 250, 31, 5, 64, 128, 3, 77, 200, 11]  # 14 tokens > mistral's window of 12
DECODE_STEPS = 16
TOL = 1e-4


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2"])
def test_logits_match_transformers(checkpoints, arch: str, ranks: int) -> None:
    model_dir = checkpoints(arch)
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
