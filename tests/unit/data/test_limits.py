"""data.too_long, one policy for every place a prompt must fit (plad_ray.data.limits), on one block."""

import pyarrow as pa
import pytest

from plad_ray.data.limits import LengthCheck, Limit
from plad_ray.data.prompts import error_line, rows_table
from plad_ray.models import tiny


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer().save_pretrained(folder)
    return str(folder)


def block(*texts):
    n = len(texts)
    return rows_table(
        {
            "file": pa.array([0] * n, pa.int32()),
            "line": pa.array(range(1, n + 1), pa.int64()),
            "row": pa.array(range(n), pa.int64()),
            "id": pa.array([f"p{i}" for i in range(n)]),
            "prompt": pa.array(list(texts)),
        },
        n,
    )


def limits(tok, engine: int, train: int):
    # Byte-level tokenizer: one token per ASCII character.
    return [
        Limit("teacher.max_model_len - teacher.sampling.max_tokens", tok, False, engine),
        Limit("train.max_length - 1", tok, False, train),
    ]


def test_skip_marks_the_row_with_the_tightest_limit_named(tok):
    out = LengthCheck(limits(tok, 8, 6), "skip", "src")(block("abc>", "abcdefgh>", "ab>")).to_pylist()
    assert [r["check"] for r in out] == [None, "length", None] and not any(r["truncated"] for r in out)
    # 9 tokens: over both limits; the first limit checked (the engine's, 8) is the one reported.
    assert (out[1]["where"], out[1]["id"], out[1]["prompt"], out[1]["reason"]) == (
        "prompt source src row 1",
        "p1",
        "abcdefgh>",
        "9 prompt tokens exceed teacher.max_model_len - teacher.sampling.max_tokens = 8",
    )


def test_truncate_keeps_the_end_that_fits_everywhere(tok):
    out = LengthCheck(limits(tok, 8, 6), "truncate", "src")(block("abcdefgh>", "ab>")).to_pylist()
    # The tighter limit is 6 tokens: keep the last 6 characters.
    assert [r["prompt"] for r in out] == ["defgh>", "ab>"] and [r["truncated"] for r in out] == [True, None]
    assert [r["check"] for r in out] == [None, None]


def test_error_line_names_row_id_and_fix(tok):
    out = LengthCheck(limits(tok, 100, 4), "error", "src")(block("abcdefgh>")).to_pylist()
    assert error_line(out[0]) == (
        "prompt source src row 0 (id p0): 9 prompt tokens exceed train.max_length - 1 = 4; "
        "shorten it, raise the limit, or set data.too_long to skip or truncate"
    )


def test_rows_already_bad_are_not_counted_again(tok):
    rows = block("abcdefgh>").to_pylist()
    rows[0].update(check="row", where="w", reason="empty prompt")
    from plad_ray.data.prompts import ROW_SCHEMA

    out = LengthCheck(limits(tok, 4, 4), "skip", "src")(pa.Table.from_pylist(rows, schema=ROW_SCHEMA)).to_pylist()
    assert out[0]["check"] == "row" and out[0]["reason"] == "empty prompt"
