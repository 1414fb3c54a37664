"""A host that decodes itself: kvfuse does the fused prefill, transformers' `generate` the rest.

    python examples/own_decode.py CACHE_DIR "Who painted A Sunday Afternoon on the Island of La Grande Jatte?" [--model smollm2-135m]

`engine.prefill` returns the whole prompt's KV as a transformers Cache (prefix + retrieved
chunks, keys re-rotated to their fused positions, the selected tokens recomputed, the question
computed), the first-token logits and the layout. `generate` wants the input ids of the whole
prompt, of which it feeds only the ones the cache does not hold yet; so the host appends the
first token (from the logits) to the prompt ids and lets `generate` continue from there.
Greedy decoding this way gives the same tokens as `engine.ask`.
"""

from __future__ import annotations

import argparse

import torch

from kvfuse.runtime import FusionEngine, load_model
from kvfuse.runtime.model import cache_kwargs


def prompt_ids(engine: FusionEngine, question: str, chunk_ids: list[str]) -> torch.Tensor:
    """[T] the token ids of the fused prompt: prefix, chunks in order, question (template applied)."""
    store = engine.store
    parts = [store.read(c).tokens.long() for c in [store.prefix_id, *chunk_ids]]
    return torch.cat([*parts, engine.question_ids(question).long()])


def eos_ids(lm) -> set[int]:
    """The ids that end an answer: the tokenizer's EOS and the generation config's."""
    ids = lm.model.generation_config.eos_token_id
    return {i for i in (lm.tokenizer.eos_token_id, *(ids if isinstance(ids, list) else [ids])) if i is not None}


@torch.inference_mode()
def answer(engine: FusionEngine, question: str, max_new_tokens: int = 32, **request) -> tuple[str, list[int]]:
    """Fused prefill by kvfuse, greedy decoding by `model.generate`. request: top_k / chunk_ids /
    selector / ratio as for `FusionRequest`. Returns (text, generated token ids)."""
    lm = engine.lm
    cache, logits, layout = engine.prefill(question, max_new_tokens=max_new_tokens, **request)
    ids = prompt_ids(engine, question, list(layout.chunk_ids))                  # [T]
    assert len(ids) == layout.total_len, "the cache holds the whole prompt"
    first = int(logits.argmax())
    eos = eos_ids(lm)
    if first in eos or max_new_tokens == 1:
        tokens = [] if first in eos else [first]
    else:
        input_ids = torch.cat([ids, torch.tensor([first])])[None].to(lm.model.device)   # [1, T + 1]
        out = lm.model.generate(input_ids, **cache_kwargs(lm.model, cache), max_new_tokens=max_new_tokens - 1,
                                do_sample=False, attention_mask=torch.ones_like(input_ids),
                                pad_token_id=lm.tokenizer.pad_token_id or min(eos), eos_token_id=sorted(eos))
        tokens = [t for t in out[0, layout.total_len:].tolist() if t not in eos]
    return lm.tokenizer.decode(tokens, skip_special_tokens=True), tokens


def main() -> None:
    p = argparse.ArgumentParser(description="kvfuse prefill + transformers generate.")
    p.add_argument("cache_dir")
    p.add_argument("question")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    with FusionEngine(args.cache_dir, load_model(args.model)) as engine:
        text, _ = answer(engine, args.question, args.max_new_tokens, top_k=args.top_k)
        ref = engine.ask(args.question, top_k=args.top_k, max_new_tokens=args.max_new_tokens)
    print(f"generate:   {text.strip()}")
    print(f"engine.ask: {ref.text.strip()}")
    print("same answer" if text == ref.text else "answers differ")


if __name__ == "__main__":
    main()
