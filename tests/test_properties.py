"""Property-based tests (hypothesis): the chunker tiles every document without losing text, chunk ids
are stable and collision-free for different content, and the index round-trips every row."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_chunker import WORDS, bpe_tok, word_tok  # noqa: F401  (fixtures)

from kvfuse.loader import format as fmt
from kvfuse.loader.manifest import INDEX_SCHEMA, Digest, read_index, record_row, write_index
from kvfuse.pipeline.chunker import chunk_document
from kvfuse.pipeline.corpus import Document

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# text built from the tokenizers' words, sentence marks, blank lines, and arbitrary unicode runs
pieces = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from([".", "!", "?", ",", " ", "  ", "\n", "\n\n", "\t", "。", "…"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6),
)
documents = st.lists(pieces, min_size=1, max_size=120).map(" ".join).filter(lambda t: t.strip())


@pytest.mark.parametrize("tok_name", ["word_tok", "bpe_tok"])
def test_chunks_tile_the_document_and_lose_no_text(request, tok_name):
    tok = request.getfixturevalue(tok_name)

    @SETTINGS
    @given(text=documents, limit=st.integers(4, 48))
    def check(text, limit):
        doc = Document("d", text)
        chunks = chunk_document(doc, tok, limit)
        assert "".join(c.text for c in chunks) == text.strip()  # no lost or invented text
        assert [c.chunk_no for c in chunks] == list(range(len(chunks)))
        for c in chunks:
            assert 0 < len(c.token_ids) <= limit
            assert text[c.char_start:c.char_end] == c.text
        for a, b in zip(chunks, chunks[1:]):
            assert a.char_end == b.char_start  # tiling: contiguous, no overlap
        assert chunk_document(doc, tok, limit) == chunks  # deterministic

    check()


IDENT = dict(model_fingerprint="m", dtype="float32", tokenizer_fingerprint="t", chunker={"chunk_tokens": 16})
token_lists = st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=64)


@SETTINGS
@given(a=token_lists, b=token_lists, prefix=st.text(max_size=8), nb=st.lists(st.text(max_size=8), max_size=3))
def test_chunk_ids_are_stable_and_differ_for_different_content(a, b, prefix, nb):
    ida = fmt.chunk_id(**IDENT, token_ids=a, prefix_id=prefix, neighbour_ids=nb)
    assert ida == fmt.chunk_id(**IDENT, token_ids=list(a), prefix_id=prefix, neighbour_ids=tuple(nb))  # stable
    assert fmt.is_safe_name(ida)
    if a != b:
        assert ida != fmt.chunk_id(**IDENT, token_ids=b, prefix_id=prefix, neighbour_ids=nb)
    assert ida != fmt.chunk_id(**IDENT, token_ids=a, prefix_id=prefix + "x", neighbour_ids=nb)
    assert ida != fmt.chunk_id(**IDENT, token_ids=a, prefix_id=prefix, neighbour_ids=[*nb, "n"])
    assert ida != fmt.chunk_id(**{**IDENT, "dtype": "bfloat16"}, token_ids=a, prefix_id=prefix, neighbour_ids=nb)


safe_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z").filter(fmt.is_safe_name)
int32 = st.integers(-(2**31), 2**31 - 1)
rows = st.fixed_dictionaries({
    "chunk_id": safe_names, "doc_id": st.text(max_size=20), "chunk_no": int32, "n_tokens": int32,
    "shard": safe_names, "pos_base": int32, "neighbours": st.lists(safe_names, max_size=3),
    "checksum": st.text("0123456789abcdef", min_size=16, max_size=16),
    "char_start": st.integers(0, 2**62), "char_end": st.integers(0, 2**62), "text": st.text(max_size=200),
})


@SETTINGS
@given(index=st.lists(rows, max_size=20))
def test_index_round_trips_every_row_and_its_digest(tmp_path_factory, index):
    path = tmp_path_factory.mktemp("idx") / "i.parquet"
    digest = write_index(path, index)
    assert digest == Digest.of(path.read_bytes())
    assert [record_row(r) for r in read_index(path, digest)] == index
    assert tuple(INDEX_SCHEMA.names) == fmt.INDEX_COLUMNS
