"""`Answer.first_difference`: where a fused answer leaves the full prefill's (what `ask --compare`
prints on its `same:` line; issue 12: the whole answer, not only its first token)."""

from kvfuse.cli import main as cli
from kvfuse.runtime.requests import Answer


def answer(ours, full):
    a = Answer(text="", chunk_ids=[], n_reused=0, n_recomputed=0, n_question=0, ttft_s=0.0, token_ids=ours)
    a.full_token_ids = full
    return a


def test_identical_answers_have_no_difference():
    assert answer([5, 6, 7], [5, 6, 7]).first_difference is None


def test_nothing_compared_has_no_difference():
    assert answer([5, 6], None).first_difference is None


def test_the_first_differing_token_is_found():
    assert answer([9, 6, 7], [5, 6, 7]).first_difference == 0
    assert answer([5, 6, 8, 1], [5, 6, 7, 1]).first_difference == 2


def test_a_shorter_answer_differs_where_it_ends():
    assert answer([5, 6], [5, 6, 7]).first_difference == 2
    assert answer([5, 6, 7], [5, 6]).first_difference == 2


class Tok:
    def decode(self, ids):
        return {5: "A", 9: "The"}.get(ids[0], "?")


def test_the_cli_line_names_the_parting_tokens():
    assert cli._agreement(answer([5, 6], [5, 6]), Tok()).startswith("yes")
    line = cli._agreement(answer([9, 6], [5, 6]), Tok())
    assert line == "no, the answers differ from the first generated token on: 'The' (token 9) against the full prefill's 'A' (token 5)"
    assert "from generated token 2 on (the first 1 agree)" in cli._agreement(answer([5, 9], [5, 6]), Tok())
    assert "the end" in cli._agreement(answer([5], [5, 6]), Tok())
    assert cli._agreement(answer([5], None), Tok()).startswith("not compared")
