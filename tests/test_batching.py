"""Tokenization and collation of pairs (plad_ray.train.batching), with the tiny byte tokenizer."""

import numpy as np
import pytest

from plad_ray import tiny
from plad_ray.train.batching import PairTokenizer, collate_pairs, tokenize_pair


def test_tokenize_pair_cuts_responses_and_drops_long_prompts():
    # max_length 5, prompt of 3 -> room for 2 response tokens.
    assert tokenize_pair([1, 2, 3], [4, 5, 6], [7], 5) == ([1, 2, 3], [4, 5], [7])
    assert tokenize_pair([1, 2, 3, 4, 5], [6], [7], 5) is None


def test_collate_builds_one_forward_with_response_masks():
    batch = {
        "prompt_ids": np.array([np.array([10, 11]), np.array([12])], dtype=object),
        "chosen_ids": np.array([np.array([20, 21, 2]), np.array([22])], dtype=object),
        "rejected_ids": np.array([np.array([30]), np.array([31, 32, 33, 2])], dtype=object),
    }
    out = collate_pairs(batch, pad_id=0)
    # Rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1; width 5.
    assert out["input_ids"].tolist() == [
        [10, 11, 20, 21, 2], [12, 22, 0, 0, 0], [10, 11, 30, 0, 0], [12, 31, 32, 33, 2]]
    assert out["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["response_mask"].tolist() == [
        [0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer().save_pretrained(folder)
    return str(folder)


def test_pair_tokenizer_appends_eos_only_to_stopped_outputs(tokenizer_dir):
    stage = PairTokenizer(tokenizer_dir, max_length=12)
    batch = {
        "id": np.array(["a", "b", "c"]),
        "heldout": np.array([False, True, False]),
        "prompt": np.array(["ab>", "ab>", "abcdefghijklm>"]),
        "chosen": np.array(["ba", "ba", "x"]),
        "rejected": np.array(["bb", "ba", "y"]),
        "chosen_finish_reason": np.array(["stop", "stop", "stop"]),
        "rejected_finish_reason": np.array(["length", "stop", "stop"]),
    }
    out = stage(batch)
    assert out["status"].tolist() == ["ok", "identical", "too_long"]
    assert out["heldout"].tolist() == [False, True, False]
    # Byte-level ids: 3 special tokens, then the byte alphabet sorted, printable ASCII from '!' (0x21)
    # first, so a printable character c has id ord(c) - 0x21 + 3: 'a' -> 67, '>' -> 32.
    ab, ba, bb = ([ord(c) - 0x21 + 3 for c in s] for s in ("ab>", "ba", "bb"))
    assert out["prompt_ids"][0].tolist() == ab == [67, 68, 32]
    assert out["chosen_ids"][0].tolist() == ba + [tiny.EOS_ID]  # stopped: EOS is scored
    assert out["rejected_ids"][0].tolist() == bb  # cut at max_tokens: no EOS


def test_pair_tokenizer_applies_the_chat_template_like_the_engine(tmp_path):
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    tokenizer.save_pretrained(tmp_path)
    stage = PairTokenizer(str(tmp_path), max_length=32, chat_template=True)
    batch = {"id": np.array(["a"]), "heldout": np.array([False]), "prompt": np.array(["hi"]),
             "chosen": np.array(["x"]), "rejected": np.array(["y"]),
             "chosen_finish_reason": np.array(["stop"]), "rejected_finish_reason": np.array(["stop"])}
    # The student engine saw "[hi]:" (one user turn plus the generation prompt), so training scores after it.
    assert stage(batch)["prompt_ids"][0].tolist() == tokenizer("[hi]:", add_special_tokens=False)["input_ids"]
