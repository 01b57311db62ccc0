"""Model families, found by ``config.json["architectures"]``."""

from __future__ import annotations

from worker.config import SUPPORTED_ARCHITECTURES, CheckpointError
from worker.models.llama import RankModel
from worker.models.mixtral import MixtralRankModel
from worker.models.olmoe import OlmoeRankModel
from worker.models.qwen2_moe import Qwen2MoeRankModel
from worker.models.qwen3_moe import Qwen3MoeRankModel

MODEL_REGISTRY: dict[str, type[RankModel]] = {
    "LlamaForCausalLM": RankModel,
    "MistralForCausalLM": RankModel,  # Llama math plus a sliding window (in StepPlan masks)
    "Qwen2ForCausalLM": RankModel,  # Llama math plus q/k/v bias (in the weights)
    "MixtralForCausalLM": MixtralRankModel,
    "Qwen2MoeForCausalLM": Qwen2MoeRankModel,
    "Qwen3MoeForCausalLM": Qwen3MoeRankModel,
    "OlmoeForCausalLM": OlmoeRankModel,
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)


def model_class(architecture: str) -> type[RankModel]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise CheckpointError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(MODEL_REGISTRY)}"
        ) from None
