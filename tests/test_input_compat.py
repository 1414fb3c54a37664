"""Issue 13 item 11: forward calls pass the cache the way the installed transformers expects.

transformers >= 5.2x names the forward's cache `cache` and warns (FutureWarning) that
`past_key_values` goes in 5.40; 5.17 only knows `past_key_values`. `cache_kwargs` picks the
keyword by the forward's signature, so neither version warns or silently drops the cache.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from conftest import tiny_model_dir
from kvfuse.pipeline.precompute import embed_chunk, prefill_chunk, prefill_prefix
from kvfuse.runtime.fusion import full_prefill, greedy
from kvfuse.runtime.model import cache_kwargs, load_model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory, "llama")))


def test_cache_keyword_follows_the_forward_signature(lm):
    for m in (lm.model, lm.model.model):
        (key,) = cache_kwargs(m, None)
        assert key in inspect.signature(m.forward).parameters


def test_forward_calls_raise_no_future_warning(lm):
    ids = torch.tensor([5, 6, 7, 8, 9])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        prefix_kv = prefill_prefix(lm, ids[:2])
        prefill_chunk(lm, prefix_kv, ids[2:], neighbour_ids=[10, 11])
        embed_chunk(lm, prefix_kv, ids[2:])
        cache, logits = full_prefill(lm, ids)
        greedy(lm, cache, logits, len(ids), max_new_tokens=3)


def test_the_cache_is_used(lm):
    """Decoding from a cache equals a prefill of the whole sequence (a dropped cache would not)."""
    ids = torch.tensor([5, 6, 7, 8, 9])
    cache, logits = full_prefill(lm, ids[:-1])
    step = lm.model(input_ids=ids[-1:][None], position_ids=torch.tensor([[len(ids) - 1]]),
                    **cache_kwargs(lm.model, cache), use_cache=True, logits_to_keep=1)
    _, whole = full_prefill(lm, ids)
    torch.testing.assert_close(step.logits[0, -1].float(), whole, rtol=1e-4, atol=1e-4)
