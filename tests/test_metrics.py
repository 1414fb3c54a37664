"""Answer-level metrics: teacher-forced KL, whole-answer agreement, paired bootstrap intervals."""

import math

import pytest
import torch
from conftest import tiny_model_dir

from kvfuse.bench.metrics import answer_agreement, answer_logprobs, bootstrap_ci, kl_per_position
from kvfuse.runtime.fusion import full_prefill
from kvfuse.runtime.model import load_model


def test_a_known_distribution_gives_its_known_kl():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.25, 0.5])
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # sum p log(p / q)
    assert float(kl_per_position(p.log(), q.log())) == pytest.approx(expected, abs=1e-6)
    assert float(kl_per_position(p.log(), p.log())) == pytest.approx(0.0, abs=1e-7)
    both = kl_per_position(torch.stack((p, p)).log(), torch.stack((q, p)).log())  # per position
    assert both.tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_identical_answers_agree_and_different_ones_do_not():
    assert answer_agreement([5, 6, 7], [5, 6, 7]) == 1.0
    assert answer_agreement([5, 6, 7], [5, 6, 8]) == 0.0
    assert answer_agreement([5, 6], [5, 6, 7]) == 0.0
    assert answer_agreement("Clara  Fenwick", "Clara Fenwick") == 1.0


def test_bootstrap_interval_of_a_constant_difference_is_that_constant():
    lo, hi = bootstrap_ci([0.125] * 40)
    assert lo == pytest.approx(0.125) and hi == pytest.approx(0.125)
    lo, hi = bootstrap_ci([0.0, 1.0] * 50)  # mean 0.5, sem 0.05: about 0.4 .. 0.6
    assert 0.37 < lo < 0.45 and 0.55 < hi < 0.63
    assert bootstrap_ci([0.0, 1.0] * 50) == (lo, hi)  # seeded
    assert all(math.isnan(x) for x in bootstrap_ci([1.0]))


def test_teacher_forced_logprobs_match_a_full_prefill_of_prompt_plus_answer(tmp_path_factory):
    lm = load_model(str(tiny_model_dir(tmp_path_factory)))
    prompt, answer = torch.arange(4, 20), [7, 9, 11, 13]
    cache, logits = full_prefill(lm, prompt)
    lp = answer_logprobs(lm, [cache, cache], [logits, logits], len(prompt), answer)       # [2, T, V]
    with torch.inference_mode():
        ref = lm.model(input_ids=torch.cat((prompt, torch.tensor(answer[:-1])))[None]).logits[0, len(prompt) - 1:]
    assert lp.shape == (2, 4, ref.shape[-1])
    assert torch.allclose(lp[0], ref.float().log_softmax(-1), atol=1e-4)
    assert torch.allclose(lp[0], lp[1], atol=1e-5)  # batched rows: equal up to rounding
    assert cache.get_seq_length() == len(prompt)  # the caller's cache is not extended
