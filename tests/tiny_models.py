"""Tiny random Hugging Face checkpoints of each supported architecture, built locally.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few lines, and
the weights are random (with a wide init so logits differ meaningfully between positions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A cluster of small machines serves a large language model.",
    "Tensor parallelism splits every layer across the ranks.",
    "Hello world! How are you today? I am fine, thank you.",
    "Raspberry Pi boards talk over Ethernet and Wi-Fi.",
]

BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1)

ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", tie_word_embeddings=False),
    "llama3": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                   rope_theta=10000.0),
    "mistral": dict(cls="MistralForCausalLM", cfg="MistralConfig", sliding_window=12, tie_word_embeddings=False),
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", tie_word_embeddings=False),
    # Mixture of experts: 4 experts, top-2, so tokens of one prompt use different experts.
    "mixtral": dict(cls="MixtralForCausalLM", cfg="MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                    intermediate_size=96, tie_word_embeddings=False),
    # Layer 1 keeps a dense MLP (mlp_only_layers); shared expert behind its sigmoid gate.
    "qwen2_moe": dict(cls="Qwen2MoeForCausalLM", cfg="Qwen2MoeConfig", num_hidden_layers=3, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      mlp_only_layers=[1], norm_topk_prob=False, tie_word_embeddings=False),
    "qwen3_moe": dict(cls="Qwen3MoeForCausalLM", cfg="Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=48, norm_topk_prob=True, tie_word_embeddings=False),
    "olmoe": dict(cls="OlmoeForCausalLM", cfg="OlmoeConfig", num_experts=4, num_experts_per_tok=2,
                  intermediate_size=64, norm_topk_prob=False, tie_word_embeddings=False),
}
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def build_tokenizer(out_dir: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAINING_TEXT * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_checkpoint(out_dir: Path, arch: str = "llama", seed: int = 0, max_shard_size: str | None = None,
                     **overrides: Any) -> Path:
    """Save a random ``arch`` model plus tokenizer as a Hugging Face directory; return it."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    spec = dict(ARCHS[arch])
    cls_name, cfg_name = spec.pop("cls"), spec.pop("cfg")
    cfg = getattr(transformers, cfg_name)(
        **{**BASE, **spec, **overrides}, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if arch in ("qwen2", "qwen2_moe"):  # biases init to zero; make them matter
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
            for name in ("q_norm", "k_norm"):  # norms init to one; make them matter
                if hasattr(layer.self_attn, name):
                    getattr(layer.self_attn, name).weight.normal_(1.0, 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def load_reference(model_dir: Path) -> Any:
    import json

    import transformers

    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    moe = {"experts_implementation": "eager"} if "Moe" in arch or "Mixtral" in arch else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **moe).eval()
