"""Real model shapes with random weights, built on the GPU from a config (no weights travel).

    lm = build_random_model("llama3-8b")   # LoadedModel: bf16, attention "kvfuse", no tokenizer

Timing does not depend on the weights' values, only on the shapes.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvfuse.runtime.attention import use_kvfuse_attention
from kvfuse.runtime.model import LoadedModel, ModelSpec

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # for smoke runs of the benchmark code on a CPU (not a real model)
    "tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=1 << 16,
        tie_word_embeddings=False,
    ),
}


def shape_config(name: str):
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


@torch.inference_mode()
def build_random_model(name: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0) -> LoadedModel:
    """A `name`-shaped causal LM with random weights, built directly on `device`."""
    config = shape_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    use_kvfuse_attention(model)
    spec = ModelSpec.from_config(name, model.config, dtype, fingerprint=f"random-{name}-seed{seed}")
    return LoadedModel(model, None, spec)
