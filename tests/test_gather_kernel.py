"""The fused gather kernel (runtime/gather_kernel.py) against the torch gather, op for op.

Runs on a GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 set before
triton is imported); skipped where Triton is not installed (the CPU CI)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from kvfuse.loader.quant import dequantize_, kv_codec  # noqa: E402
from kvfuse.runtime.gather_kernel import GatherPlan  # noqa: E402
from kvfuse.runtime.rope import rotate_keys_, rotation_table  # noqa: E402

L, H, D = 3, 2, 16


def torch_gather(kvs, scales, starts, shifts, codec, dtype, n_total, inv_freq, layer):
    """The layer-wise load's torch path for one layer: copy (converting codes), decode, re-rotate."""
    out = torch.zeros(2, H, n_total, D, dtype=dtype)
    for i, (kv, s) in enumerate(zip(kvs, starts)):
        part = kv[layer].to(dtype, copy=True)                       # [2, H, T, D], not a view of the arena
        if scales is not None:
            dequantize_(part, scales[i][layer][:, None], codec.key_offsets)
        delta = torch.full((part.shape[2],), float(shifts[i]))
        cos, sin = rotation_table(delta, inv_freq)
        rotate_keys_(part[0], cos, sin)
        out[:, :, s:s + part.shape[2]] = part
    return out


@pytest.mark.parametrize("kv_dtype", ["model", "fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kernel_equals_the_torch_gather(kv_dtype, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter rounds float32 -> bfloat16 by its own rule (not to nearest): "
                    "float32 checks the arithmetic bit for bit, bfloat16 runs on a GPU")
    codec = kv_codec(kv_dtype)
    gen = torch.Generator().manual_seed(0)
    lens = [4, 16, 16, 9]                       # a prefix, two full chunks, a short last chunk
    starts = [0, 4, 20, 36]
    shifts = [0.0, 3.0, 19.0, 35.0]
    n_total = 45 + 5                             # + a question tail the gather leaves alone
    store_dtype = codec.storage_dtype(dtype)
    slot = L * 2 * H * 16 * D
    arena = torch.zeros(6, slot, dtype=store_dtype)
    scale_arena = torch.zeros(6, L * H * codec.row_width(D, 16), dtype=torch.bfloat16) if codec.quantised else None
    kvs, scales = [], [] if codec.quantised else None
    for i, (n, place) in enumerate(zip(lens, [5, 0, 3, 1])):      # slots out of order, as a pool hands them out
        kv = torch.randn(L, 2, H, n, D, generator=gen) * 3 + 1
        codes, sc = codec.encode(kv.to(dtype))
        view = arena[place, : codes.numel()].view(codes.shape)
        view.copy_(codes)
        kvs.append(view)
        if sc is not None:
            sview = scale_arena[place, : sc.numel()].view(sc.shape)
            sview.copy_(sc)
            scales.append(sview)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    want = [torch_gather(kvs, scales, starts, shifts, codec, dtype, n_total, inv_freq, l) for l in range(L)]

    to = (lambda t: None if t is None else t.to(device))
    arena_d, scale_d = to(arena), to(scale_arena)
    kvs_d = [arena_d[p, : kv.numel()].view(kv.shape) for kv, p in zip(kvs, [5, 0, 3, 1])]
    scales_d = None if scales is None else [scale_d[p, : s.numel()].view(s.shape) for s, p in zip(scales, [5, 0, 3, 1])]
    plan = GatherPlan.build(kvs_d, scales_d, starts, shifts, arena_d, scale_d, inv_freq, codec.key_cols)
    assert plan is not None
    fused = torch.zeros(L, 2, H, n_total, D, dtype=dtype, device=device)
    for l in range(L):
        plan.launch(fused[l], l)
    for l in range(L):
        got = fused[l].cpu()
        if device == "cpu":   # the interpreter runs the torch path's float32 steps: the same bits
            assert torch.equal(got, want[l]), (l, (got.float() - want[l].float()).abs().max())
        else:   # a GPU may contract a multiply and an add into one FMA
            torch.testing.assert_close(got, want[l])


def test_gather_plan_declines_entries_outside_the_arena():
    arena = torch.zeros(2, 64)
    other = torch.zeros(1, 2, 1, 2, 16)
    assert GatherPlan.build([other], None, [0], [0.0], arena, None, torch.ones(8), 0) is None


def test_gather_plan_declines_entries_without_scales():
    """A quantised request whose cold-plan front was prefilled (K/V in the model dtype, no scales)
    beside chunks held as codes: the plan declines (the torch gather runs) instead of failing."""
    arena, scale_arena = torch.zeros(2, 64, dtype=torch.float8_e4m3fn), torch.zeros(2, 32, dtype=torch.bfloat16)
    loaded = arena[0].view(1, 2, 1, 2, 16)
    front = torch.zeros(1, 2, 1, 2, 16, dtype=torch.bfloat16)
    assert GatherPlan.build([front, loaded], [None, scale_arena[0, :4].view(1, 1, 4)], [0, 2], [0.0, 2.0],
                            arena, scale_arena, torch.ones(8), 1) is None
    assert GatherPlan.build([loaded], [None], [0], [0.0], arena, scale_arena, torch.ones(8), 1) is None


@pytest.mark.parametrize("kv_dtype", ["model", "fp8", "int8"])
def test_kernel_on_with_a_prefilled_front_equals_fusion_over_it(tmp_path_factory, monkeypatch, kv_dtype):
    """The cold plan's mixed case from an fp8 store with the kernel forced on (the H200 run of
    2026-11-30 failed here: 'NoneType' object has no attribute 'data_ptr')."""
    from kvfuse.runtime import layerwise
    from test_coldplan import test_front_prefilled_while_the_back_loads_equals_fusion_over_that_prefix as mixed
    monkeypatch.setattr(layerwise, "GATHER_KERNEL", True)
    opened = []
    real = layerwise.LayerwiseLoad._kernel_plan
    monkeypatch.setattr(layerwise.LayerwiseLoad, "_kernel_plan",
                        lambda self, *a: opened.append((real(self, *a), self.front_kv)) or opened[-1][0])
    cuda = torch.cuda.is_available()
    mixed(tmp_path_factory, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32,
          1e-2 if cuda else 1e-5, kv_dtype)
    # the kernel gathered the loaded back; the prefilled front went beside it (it declined the request before)
    assert any(plan is not None and front is not None for plan, front in opened)


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
def test_layerwise_load_with_the_kernel_equals_the_plain_path(tmp_path_factory, monkeypatch, kv_dtype):
    """A whole request through the layer-wise load with the kernel forced on (the interpreter on
    the CPU, float32; bfloat16 on a GPU) gives the plain path's logits on every tier (cold, hot, warm)."""
    from kvfuse.runtime import layerwise
    from test_layerwise import check_same_as_plain, setup, tiers_for
    monkeypatch.setattr(layerwise, "GATHER_KERNEL", True)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    lm, store, prefix, ids = setup(tmp_path_factory, device, dtype, kv_dtype=kv_dtype)
    tiers = tiers_for(lm, store, device)
    try:
        opened = []
        real = layerwise.LayerwiseLoad._kernel_plan
        monkeypatch.setattr(layerwise.LayerwiseLoad, "_kernel_plan",
                            lambda self, *a: opened.append(real(self, *a)) or opened[-1])
        check_same_as_plain(lm, store, prefix, ids, tiers, atol=1e-3 if cuda else 1e-5)
        assert opened and all(plan is not None for plan in opened)   # the kernel ran on every load
    finally:
        tiers.close()
