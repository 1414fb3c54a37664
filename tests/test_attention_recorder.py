"""The attention recorder's question-to-context probabilities (runtime/attention.py): the
masked columns only from the first key a recorded row can't see, the same probabilities as
masking every column; on CUDA, half-precision scores from one float32-output GEMM."""

import pytest
import torch

from kvfuse.runtime import recompute_attention as ra
from kvfuse.runtime.attention import _probabilities


def _problem(n_keys=300, rows=40, h_q=4, h_kv=2, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = torch.cat((torch.randperm(n_keys - 8, generator=g)[:rows - 8].sort().values,
                           torch.arange(n_keys - 8, n_keys)))                     # picks + an 8-token question
    q = torch.randn(1, h_q, rows, d, generator=g).to(device, dtype)
    k = torch.randn(1, h_kv, n_keys, d, generator=g).to(device, dtype)
    return positions.to(device), q, k


def test_scattered_recorder_masks_only_the_tail_and_matches_the_full_mask():
    positions, q, k = _problem()
    rows = slice(-8, None)
    with_host = ra.ScatteredQueries(positions, k.shape[2], "sdpa", host_positions=positions.cpu())
    without = ra.ScatteredQueries(positions, k.shape[2], "sdpa")
    first = with_host.first_unseen(rows)
    assert first == int(positions[-8]) + 1 and without.first_unseen(rows) == 0
    tail = _probabilities(q, k, with_host.row_mask(rows, first), 0.25, rows, first)
    full = _probabilities(q, k, without.row_mask(rows), 0.25, rows)
    torch.testing.assert_close(tail, full, rtol=0, atol=0)
    assert torch.allclose(full.sum(-1), torch.ones(1, 8))


def test_plain_causal_recorder_masks_only_the_tail():
    _, q, k = _problem()
    rows = slice(-8, None)
    q_all = q.shape[2]
    first = k.shape[2] - q_all + (q_all - 8) + 1
    torch.testing.assert_close(_probabilities(q, k, None, 0.25, rows, first),
                               _probabilities(q, k, None, 0.25, rows), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_recorder_scores_match_upcast_scores():
    positions, q, k = _problem(n_keys=4096, rows=200, h_q=8, h_kv=2, d=128, dtype=torch.bfloat16, device="cuda")
    rows = slice(-8, None)
    sq = ra.ScatteredQueries(positions, k.shape[2], "sdpa", host_positions=positions.cpu())
    first = sq.first_unseen(rows)
    got = _probabilities(q, k, sq.row_mask(rows, first), 0.0884, rows, first)
    ref = _probabilities(q.float(), k.float(), sq.row_mask(rows), 0.0884, rows)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


def test_no_recorded_rows_give_an_empty_map():
    positions, q, k = _problem()
    sq = ra.ScatteredQueries(positions, k.shape[2], "sdpa", host_positions=positions.cpu())
    rows = slice(q.shape[2], None)                                   # none
    assert sq.first_unseen(rows) == 0
    assert _probabilities(q, k, sq.row_mask(rows), 0.25, rows).shape == (1, 0, k.shape[2])


def test_recorded_hidden_mask_equals_the_row_mask_path():
    """The per-pass mask the recorder reads (`recorded`: the hidden keys, built once) scores
    exactly as the row mask does."""
    positions, q, k = _problem()
    rows = slice(-8, None)
    sq = ra.ScatteredQueries(positions, k.shape[2], "sdpa", host_positions=positions.cpu())
    first, hidden = sq.recorded(rows)
    assert first == sq.first_unseen(rows) and hidden.dtype == torch.bool
    assert sq.recorded(rows)[1] is hidden                                # built once, shared by the layers
    torch.testing.assert_close(_probabilities(q, k, None, 0.25, rows, first, hidden),
                               _probabilities(q, k, sq.row_mask(rows), 0.25, rows), rtol=0, atol=0)


def test_additive_mask_is_sdpas_cudnn_conversion_and_gives_the_same_attention():
    """`additive` holds what SDPA's cuDNN path makes of the bool mask (0 / -65504, in the query
    dtype); every row sees key 0, so against SDPA's -inf conversion (the CPU's) the attention
    is the same bit for bit."""
    positions, q, k = _problem()
    v = torch.randn_like(k)
    sq = ra.ScatteredQueries(positions, k.shape[2], "sdpa")
    add = sq.additive(q.dtype)
    assert sq.additive(q.dtype) is add and add.dtype == q.dtype
    assert torch.equal(add == 0, sq.allowed()) and (add[~sq.allowed()] == -65504.0).all()
    assert (sq.additive(torch.bfloat16)[~sq.allowed()] == -65536.0).all()     # -65504 rounded, as torch's
    by_bool = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sq.allowed(), enable_gqa=True)
    by_add = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=add, enable_gqa=True)
    torch.testing.assert_close(by_add, by_bool, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"])
def test_cuda_additive_mask_equals_the_bool_mask_on_every_sdpa_backend(backend):
    """Llama-3-8B heads, 1,024 rows over ~33k keys with low positions, so most key tiles of
    most rows are hidden: the precomputed mask gives the bool mask's attention on each SDPA
    backend, finite everywhere (cuDNN's -inf handling is why torch fills -65504 there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(0)
    n_keys, rows = 33_000, 1024
    positions = torch.sort(torch.randint(0, 4_000, (rows,), generator=g)).values.cuda()
    q = torch.randn(1, 32, rows, 128, generator=g).cuda().bfloat16()
    k = torch.randn(1, 8, n_keys, 128, generator=g).cuda().bfloat16()
    v = torch.randn(1, 8, n_keys, 128, generator=g).cuda().bfloat16()
    sq = ra.ScatteredQueries(positions, n_keys, "sdpa")
    with sdpa_kernel(getattr(SDPBackend, backend)):
        try:
            by_bool = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sq.allowed(), enable_gqa=True)
        except RuntimeError as exc:   # this backend does not take these inputs here
            pytest.skip(f"{backend}: {exc}"[:200])
        by_add = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sq.additive(q.dtype),
                                                                  enable_gqa=True)
    assert torch.isfinite(by_add).all()
    torch.testing.assert_close(by_add, by_bool, rtol=0, atol=2e-3 if backend != "CUDNN_ATTENTION" else 0)
