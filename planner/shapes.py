"""Model shapes the planner knows by name, so it can predict for checkpoints that are not on disk.

Each entry is the subset of the Hugging Face ``config.json`` that the cost model needs; the
numbers are those of the published configs (Meta Llama 3 8B, Llama 2 70B, TinyLlama 1.1B).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.config import CheckpointError, ModelConfig

NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0),
    "llama-2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096),
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
}


def load_shape(model: str) -> ModelConfig:
    """A built-in shape by name, or the ``config.json`` of a directory (weights not needed)."""
    if model in NAMED_SHAPES:
        return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **NAMED_SHAPES[model]})
    if not Path(model).is_dir():
        raise CheckpointError(f"{model!r} is neither a directory nor a known shape ({', '.join(NAMED_SHAPES)})")
    return ModelConfig.from_dir(model)
