"""Random Llama checkpoints written straight to safetensors, for probing and benchmarks.

No ``transformers`` needed: config.json plus one ``model.safetensors`` of std-0.02 weights under
the Hugging Face names that ``worker.shards.checkpoint`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_random_llama(out: Path, shape: dict[str, Any], seed: int = 0) -> Path:
    """``shape``: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    intermediate_size, vocab_size, max_position_embeddings (as in config.json)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = d // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(seed)

    def rand(*dims: int) -> torch.Tensor:
        return torch.empty(*dims).normal_(0, 0.02, generator=gen)

    tensors = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": torch.ones(d),
               "lm_head.weight": rand(v, d)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
                    p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
                    p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                    p + "mlp.down_proj.weight": rand(d, f), p + "input_layernorm.weight": torch.ones(d),
                    p + "post_attention_layernorm.weight": torch.ones(d)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
              "bos_token_id": 1, "eos_token_id": 2, **shape}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
