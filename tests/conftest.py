"""Shared test helpers.

``tiny_model_dir(tmp_path_factory, arch="llama")`` writes a random-weight
2-layer causal LM (hidden 64, 4 heads, 2 KV heads, head_dim 16) plus a small
WordLevel tokenizer to a temporary folder and returns the folder: a stand-in
for a real model that loads with ``kvfuse.runtime.model.load_model(path)``.
Import it with ``from conftest import tiny_model_dir``.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a an of to in and is was for on with as by at from that this it be are or not "
    "what who when where why how which one two three four five six seven eight nine ten "
    "paris london berlin rome madrid tokyo city capital country river mountain sea "
    "france england germany italy spain japan key value secret number answer question "
    "context document chunk token model cache memory text word name year day time people "
    "red green blue black white cat dog bird fish tree house car book door water fire "
    "is: . , ? ! : ; ' \" ( ) - 0 1 2 3 4 5 6 7 8 9"
).split()
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>"]
# A minimal chat template so prompt-layout code has something to split.
CHAT_TEMPLATE = (
    "<s> system : be brief . </s>"
    "{% for m in messages %} <s> {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %} <s> assistant :{% endif %}"
)


def make_tiny_tokenizer():
    """PreTrainedTokenizerFast over WORDS (whitespace-split, WordLevel)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def tiny_model_dir(tmp_path_factory, arch: str = "llama", seed: int = 0, **config_overrides) -> Path:
    """Save a random tiny `arch` ("llama" | "qwen2" | "mistral" | "qwen3") model; return its folder.

    config_overrides go to the config class (e.g. rope_parameters=..., max_position_embeddings=...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tiny_tokenizer()
    kwargs = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    kwargs.update(config_overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp(f"tiny-{arch}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
