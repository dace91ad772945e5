"""data.too_long, one policy for every place a prompt must fit (plad_ray.data.limits)."""

import pyarrow as pa
import pytest

from plad_ray.models import tiny
from plad_ray.errors import DataError
from plad_ray.data.limits import Limit, apply_length_policy


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer().save_pretrained(folder)
    return str(folder)


def prompts(*texts):
    return pa.table({"id": [f"p{i}" for i in range(len(texts))], "prompt": list(texts)})


def limits(tok, engine: int, train: int):
    # Byte-level tokenizer: one token per ASCII character.
    return [Limit("teacher.max_model_len - teacher.sampling.max_tokens", tok, False, engine),
            Limit("train.max_length - 1", tok, False, train)]


def test_skip_quarantines_with_the_tightest_limit_named(tok):
    table, quarantined, truncated = apply_length_policy(prompts("abc>", "abcdefgh>", "ab>"), limits(tok, 8, 6),
                                                        "skip", "src")
    assert table.column("id").to_pylist() == ["p0", "p2"] and truncated == 0
    # 9 tokens: over both limits; the first limit checked (the engine's, 8) is the one reported.
    assert quarantined == [{"where": "prompt source src row 1", "id": "p1", "prompt": "abcdefgh>",
                            "reason": "9 prompt tokens exceed teacher.max_model_len - teacher.sampling.max_tokens = 8"}]


def test_truncate_keeps_the_end_that_fits_everywhere(tok):
    table, quarantined, truncated = apply_length_policy(prompts("abcdefgh>", "ab>"), limits(tok, 8, 6),
                                                        "truncate", "src")
    # The tighter limit is 6 tokens: keep the last 6 characters.
    assert table.column("prompt").to_pylist() == ["defgh>", "ab>"] and truncated == 1 and quarantined == []


def test_error_names_row_id_and_fix(tok):
    with pytest.raises(DataError, match=r"prompt source src row 0 \(id p0\): 9 prompt tokens exceed train.max_length"
                                        r" - 1 = 4; shorten it, raise the limit, or set data.too_long"):
        apply_length_policy(prompts("abcdefgh>"), limits(tok, 100, 4), "error", "src")
