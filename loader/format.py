"""Store format v2: names, ids and checksums (DESIGN §2).

A cache folder holds

    CURRENT                     one line: the current release id (replaced atomically)
    releases/<release>.json     the release manifest (model, params, parent, stats, index file + digests)
    releases/<release>.json.xxh3  digest of the manifest's bytes
    index/<release>.parquet     one row per (document, chunk number)
    shards/<shard>.safetensors  immutable; many chunks each
    shards/<shard>.sums.json    the writer's size, header digest and chunk checksums of the shard
    history.jsonl               what was current, when (gc keeps releases by it)

(loader/manifest.py writes and reads all but the shards; docs/reliability.md.)

and per chunk, inside a shard:

    <chunk_id>.kv   [L, 2, H_kv, T, D]  model dtype, or fp8 e4m3 / int8 codes (--kv-dtype);
                                        layer-major, keys after RoPE at pos_base..
    <chunk_id>.kvs  [L, H_kv, W]        bfloat16 scales of quantised codes only (layout: loader/quant.py)
    <chunk_id>.tok  [T]                 int32 token ids
    <chunk_id>.sal  [S, T]              float16 saliency signals (names in the shard metadata)

Format 2 adds the KV dtype ("model", "fp8", "int8"): the manifest's model.kv_dtype and
model.kv_scheme, the shard metadata's kv_dtype, and `.kvs`. A v1 store (no kv_dtype) is
a "model" store and still reads. A model-dtype chunk's bytes are v1's, and so is its id
(`CHUNK_FORMAT`): a refresh by this version reuses a v1 store's chunks.

This module owns only pure functions and constants, so that the pipeline, the
loader and the tests agree on every byte.
"""

from __future__ import annotations

import json
import re

import torch
import xxhash

FORMAT_VERSION = 2            # written into manifests and shard metadata
READABLE_FORMATS = (1, 2)     # store formats this reader opens
CHUNK_FORMAT = 1              # hashed into chunk ids: a chunk's tensor layout (unchanged for model-dtype KV)

CURRENT_FILE = "CURRENT"
RELEASES_DIR = "releases"
INDEX_DIR = "index"
SHARDS_DIR = "shards"
SHARD_SUFFIX = ".safetensors"

# Names of the saliency rows in `<chunk_id>.sal`, in order. Stored in each shard's
# metadata too, so a reader never has to guess.
SALIENCY_SIGNALS = ("attn_received", "kv_deviation")

# Index columns, in order; their types and meaning: loader.manifest.INDEX_SCHEMA (the one owner).
INDEX_COLUMNS = (
    "chunk_id", "doc_id", "chunk_no", "n_tokens", "shard", "pos_base", "neighbours", "checksum",
    "char_start", "char_end", "text",
)

PREFIX_DOC_ID = "__prefix__"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def kv_name(chunk_id: str) -> str:
    return f"{chunk_id}.kv"


def kvs_name(chunk_id: str) -> str:
    """The scales of a quantised chunk's codes (absent for model-dtype KV)."""
    return f"{chunk_id}.kvs"


def tensor_names(chunk_id: str, quantised: bool) -> tuple[str, ...]:
    """The chunk's tensors in checksum order: kv, tok, sal (+ kvs when quantised)."""
    names = (kv_name(chunk_id), tok_name(chunk_id), sal_name(chunk_id))
    return names + (kvs_name(chunk_id),) if quantised else names


def tok_name(chunk_id: str) -> str:
    return f"{chunk_id}.tok"


def sal_name(chunk_id: str) -> str:
    return f"{chunk_id}.sal"


def is_safe_name(name: str) -> bool:
    """A release or shard name that cannot escape its folder ('..', '/', absolute paths)."""
    return bool(_SAFE_NAME.match(name)) and ".." not in name


def chunk_id(
    *,
    model_fingerprint: str,
    dtype: str,
    tokenizer_fingerprint: str,
    chunker: dict,
    token_ids,
    prefix_id: str,
    neighbour_ids: list[str] | tuple[str, ...] = (),
    kv_scheme: str = "model",
) -> str:
    """Content hash of everything that determines a chunk's stored bytes.

    Identical chunks dedupe; an unchanged chunk keeps its id across releases and is
    reused without recomputation. kv_scheme: the KV codec's scheme (`quant.KVCodec.scheme`);
    "model" leaves it out, so model-dtype ids are format 1's.
    """
    h = xxhash.xxh3_128()
    header = {
        "format": CHUNK_FORMAT,
        "model": model_fingerprint,
        "dtype": dtype,
        "tokenizer": tokenizer_fingerprint,
        "chunker": chunker,
        "prefix": prefix_id,
        "neighbours": list(neighbour_ids),
    }
    if kv_scheme != "model":
        header["kv"] = kv_scheme
    h.update(json.dumps(header, sort_keys=True).encode())
    h.update(torch.as_tensor(list(token_ids), dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bf16 included) without a copy when contiguous."""
    t = t.detach().contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def checksum(*tensors: torch.Tensor) -> str:
    """xxh3_64 over the bytes of the tensors, in order (fast: ~10+ GB/s)."""
    h = xxhash.xxh3_64()
    for t in tensors:
        h.update(tensor_bytes(t.cpu() if t.device.type != "cpu" else t))
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in store metadata")
    return dtype
