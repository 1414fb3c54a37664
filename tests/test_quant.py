"""KV codecs (loader/quant.py): fp8 / int8 codes with per-channel key and per-token value
scales; decode on the CPU and the in-place dequantisation the GPU gather uses agree; keys
are dequantised before re-rotation."""

import pytest
import torch

from kvfuse.loader.quant import KV_DTYPES, LEGACY, dequantize_, kv_codec
from kvfuse.runtime.rope import rerotate_keys

L, H, T, D = 3, 2, 24, 16


def sample_kv(seed=0):
    """[L, 2, H, T, D] with outlier key channels and per-token value ranges, like real KV."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn((L, 2, H, T, D), generator=g)
    kv[:, 0, :, :, 3] *= 40.0                                    # an outlier key channel
    kv[:, 1] *= torch.rand((L, H, T, 1), generator=g) * 5 + 0.1  # values: per-token range
    return kv


@pytest.mark.parametrize("name, bound", [("fp8", 0.04), ("int8", 0.01)])
def test_roundtrip_error_and_shapes(name, bound):
    codec = kv_codec(name)
    kv = sample_kv()
    codes, scales = codec.encode(kv)
    assert codes.dtype == codec.code_dtype and codes.shape == kv.shape
    assert scales.dtype == torch.bfloat16 and scales.shape == (L, H, codec.row_width(D, T)) and scales.is_contiguous()
    back = codec.decode(codes, scales, torch.float32)
    assert back.shape == kv.shape and back.dtype == torch.float32
    for part in (0, 1):
        rel = (back[:, part] - kv[:, part]).norm() / kv[:, part].norm()
        assert rel < bound, (name, part, float(rel))
    # every small key channel keeps its own precision (a per-token scale would crush it by the outlier)
    small = [c for c in range(D) if c != 3]
    rel_small = (back[:, 0][..., small] - kv[:, 0][..., small]).norm() / kv[:, 0][..., small].norm()
    assert rel_small < bound


def test_scales_are_per_key_channel_and_per_value_token():
    codec = kv_codec("int8")
    kv = sample_kv()
    codes, scales = codec.encode(kv)
    want = torch.cat((kv[:, 0].abs().amax(dim=2), kv[:, 1].abs().amax(dim=3)), -1) / 127  # [L, H, D + T]
    got = scales.float()
    assert (got >= want).all() and (got <= want * (1 + 2**-6)).all()  # rounded up to a bfloat16
    assert codes.abs().max() >= 125                                   # (nearly) the full range is used


def test_model_codec_is_identity_and_zeros_survive():
    codec = kv_codec("model")
    kv = sample_kv()
    assert codec.encode(kv) == (kv, None) and not codec.quantised
    assert codec.storage_dtype(torch.bfloat16) == torch.bfloat16
    assert kv_codec(None) is codec  # a v1 store (no kv_dtype) is a model store
    for name in ("fp8", "int8"):
        q = kv_codec(name)
        zero = torch.zeros((1, 2, 1, 4, D))
        codes, scales = q.encode(zero)
        assert torch.equal(q.decode(codes, scales, torch.float32), zero) and torch.isfinite(scales).all()


def test_saturation_no_nan_and_nonfinite_refused():
    q = kv_codec("fp8")
    kv = sample_kv()
    kv[0, 0, 0, 0, 0] = 1e4   # the channel's max sets the scale: decodes to itself, no NaN from overflow
    codes, scales = q.encode(kv)
    back = q.decode(codes, scales, torch.float32)
    assert torch.isfinite(back).all()
    torch.testing.assert_close(back[0, 0, 0, 0, 0], torch.tensor(1e4), rtol=0.07, atol=0)
    kv[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        q.encode(kv)
    with pytest.raises(ValueError, match="choose one of model, fp8, int8"):
        kv_codec("fp4")
    assert KV_DTYPES == ("model", "fp8", "int8")


@pytest.mark.parametrize("name", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_dequantisation_equals_decode(name, dtype):
    """The layer-wise path: codes of several chunks copied (converted) into a fused buffer end to
    end, then one `dequantize_` per layer and run of equal-length chunks, their scale rows
    stacked; bit-equal to `decode` of each chunk (what Store.read returns)."""
    codec = kv_codec(name)
    chunks = [sample_kv(s)[:, :, :, :n] for s, n in enumerate((T, T, T - 5))]   # a run of two, then one
    enc = [codec.encode(c) for c in chunks]
    lens = [c.shape[3] for c in chunks]
    fused = torch.zeros((L, 2, H, sum(lens) + 4, D), dtype=dtype)    # + a question tail, untouched
    starts = [0, lens[0], lens[0] + lens[1]]
    for l in range(L):
        dst = [fused[l, :, :, s:s + n] for s, n in zip(starts, lens)]
        torch._foreach_copy_(dst, [q[l] for q, _ in enc])
        dequantize_(fused[l, :, :, : 2 * T], torch.stack([sc[l] for _, sc in enc[:2]], 1), codec.key_offsets)
        dequantize_(fused[l, :, :, 2 * T: sum(lens)], enc[2][1][l][:, None], codec.key_offsets)
    want = torch.cat([codec.decode(q, sc, dtype) for q, sc in enc], dim=3)
    assert torch.equal(fused[..., : sum(lens), :], want)
    assert not fused[..., sum(lens):, :].any()
    with pytest.raises(ValueError, match="scale rows"):
        dequantize_(fused[0, :, :, :T + 1], enc[0][1][0][:, None], codec.key_offsets)


def test_fp8_keys_centred_on_channel_offsets():
    """A key channel far from zero (10 +- 1, like RoPE's slow pairs): e4m3 codes it in steps of
    1, losing what varies across tokens, the part attention sees. fp8 stores keys minus each
    channel's midrange: the varying part's error drops many times over the legacy scheme's."""
    kv = sample_kv()
    kv[:, 0, :, :, 5] = 10.0 + torch.randn(L, H, T)               # an offset channel
    varying = kv[:, 0, :, :, 5] - kv[:, 0, :, :, 5].mean(dim=2, keepdim=True)

    def varying_error(codec):  # of that channel's part that varies across tokens
        err = codec.decode(*codec.encode(kv), torch.float32)[:, 0, :, :, 5] - kv[:, 0, :, :, 5]
        return float((err - err.mean(dim=2, keepdim=True)).norm() / varying.norm())

    new, old = kv_codec("fp8"), next(iter(LEGACY.values()))
    assert new.key_offsets and not old.key_offsets and new.scheme != old.scheme
    assert varying_error(new) < varying_error(old) / 3, (varying_error(new), varying_error(old))
    assert new.row_width(D, T) == 2 * D + T and old.row_width(D, T) == D + T


def test_codec_of_a_stores_scheme():
    """A store names the scheme its chunks were encoded with: the current one, a legacy one that
    still decodes, or one this version does not know (a clear error)."""
    fp8 = kv_codec("fp8")
    assert kv_codec("fp8", fp8.scheme) is fp8 and kv_codec("model", "model") is kv_codec("model")
    for scheme, codec in LEGACY.items():
        assert kv_codec(codec.name, scheme) is codec
    with pytest.raises(ValueError, match="cannot decode fp8 KV of scheme 'fp8-e9'"):
        kv_codec("fp8", "fp8-e9")


def test_keys_dequantised_before_rerotation():
    """Stored keys are quantised in the stored (rotated at pos_base) basis. Rotation mixes
    channels d and d + D/2, whose scales differ: decoding then rotating matches rotating the
    exact keys (to the codec's error); rotating codes first and scaling after does not."""
    codec = kv_codec("int8")
    kv = sample_kv()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    codes, scales = codec.encode(kv)
    exact = rerotate_keys(kv[:, 0], 37, inv_freq)
    right = rerotate_keys(codec.decode(codes, scales, torch.float32)[:, 0], 37, inv_freq)
    wrong = rerotate_keys(codes[:, 0].float(), 37, inv_freq) * scales[..., None, :D]  # int8: no key offsets
    assert (right - exact).norm() / exact.norm() < 0.01
    assert (wrong - exact).norm() / exact.norm() > 0.1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_cuda_encode_and_gather_dequantisation_equal_cpu(name):
    codec = kv_codec(name)
    kv = sample_kv()
    codes, scales = codec.encode(kv)
    g_codes, g_scales = codec.encode(kv.cuda())
    assert torch.equal(g_codes.cpu().view(torch.uint8), codes.view(torch.uint8))
    torch.testing.assert_close(g_scales.cpu(), scales, rtol=0, atol=0)
    fused = torch.empty((L, 2, H, T, D), dtype=torch.bfloat16, device="cuda")
    for l in range(L):
        torch._foreach_copy_([fused[l]], [g_codes[l]])
        dequantize_(fused[l], g_scales[l][:, None], codec.key_offsets)
    assert torch.equal(fused.cpu(), codec.decode(codes, scales, torch.bfloat16))
