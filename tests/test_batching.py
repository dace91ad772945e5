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


@pytest.mark.parametrize("policy", ["keep", "drop", "flip"])
def test_pair_tokenizer_scores_pairs_and_applies_the_student_wins_policy(tokenizer_dir, policy):
    # "ab>" is answered "ba": pair a the teacher wins, b a tie (both wrong), c the student wins.
    stage = PairTokenizer(tokenizer_dir, max_length=12, scorer="reverse", student_wins=policy)
    batch = {"id": np.array(["a", "b", "c"]), "heldout": np.array([False] * 3), "prompt": np.array(["ab>"] * 3),
             "chosen": np.array(["ba", "aa", "bb"]), "rejected": np.array(["bb", "ab", "ba"]),
             "chosen_finish_reason": np.array(["stop", "stop", "length"]),
             "rejected_finish_reason": np.array(["stop", "stop", "stop"])}
    out = stage(batch)
    assert out["verdict"].tolist() == ["teacher", "tie", "student"]
    assert out["status"].tolist() == ["ok", "ok", "student_better" if policy == "drop" else "ok"]
    ba, bb = ([ord(c) - 0x21 + 3 for c in s] for s in ("ba", "bb"))
    if policy == "flip":  # the student's right answer becomes chosen (with its EOS: it stopped)
        assert out["chosen_ids"][2].tolist() == ba + [tiny.EOS_ID] and out["rejected_ids"][2].tolist() == bb
        assert (out["chosen_score"][2], out["rejected_score"][2]) == (1.0, 0.0)
    else:
        assert out["chosen_ids"][2].tolist() == bb and out["rejected_ids"][2].tolist() == ba + [tiny.EOS_ID]
        assert (out["chosen_score"][2], out["rejected_score"][2]) == (0.0, 1.0)
    assert out["chosen_score"][:2].tolist() == [1.0, 0.0] and out["rejected_score"][:2].tolist() == [0.0, 0.0]
    batch_ = collate_pairs({k: out[k][:2] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_score",
                                                     "rejected_score")}, pad_id=0)
    assert batch_["chosen_score"].tolist() == [1.0, 0.0] and batch_["rejected_score"].tolist() == [0.0, 0.0]


def test_length_grouping_cuts_padding_and_keeps_every_pair_once():
    # 8 pairs of lengths 1..8 (prompt 1 + response k-1), shuffled; micro-batches of 2.
    lengths = [5, 1, 8, 3, 7, 2, 6, 4]
    bucket = {"prompt_ids": np.array([np.array([9]) for _ in lengths], dtype=object),
              "chosen_ids": np.array([np.arange(n - 1) for n in lengths], dtype=object),
              "rejected_ids": np.array([np.arange(max(n - 2, 0)) for n in lengths], dtype=object),
              "id": np.array([f"p{n}" for n in lengths])}
    from plad_ray.train.batching import length_grouped

    micro = length_grouped(bucket, 2, seed=[0, 0, 0])
    assert sorted(i for m in micro for i in m["id"]) == sorted(bucket["id"])  # every pair, once
    # Sorted neighbours share a micro-batch: lengths (1,2), (3,4), (5,6), (7,8), in a seeded order.
    assert sorted(tuple(sorted(int(i[1:]) for i in m["id"])) for m in micro) == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert [list(m["id"]) for m in micro] == [list(m["id"]) for m in length_grouped(bucket, 2, seed=[0, 0, 0])]
    # A pair of length L has sequences of L (chosen) and L-1 (rejected; 1 when L=1) tokens.
    # Real tokens: chosen 1+..+8 = 36, rejected 0+1+..+7 + 1 = 29 -> 65.
    # Slots (4 sequences x the longer L per micro-batch): grouped (1,2) (3,4) (5,6) (7,8) ->
    # 4 x (2+4+6+8) = 80; arrival order (5,1) (8,3) (7,2) (6,4) -> 4 x (5+8+7+6) = 104.
    grouped = [collate_pairs(m, 0)["attention_mask"] for m in micro]
    arrival = [collate_pairs({k: v[i:i + 2] for k, v in bucket.items()}, 0)["attention_mask"] for i in range(0, 8, 2)]
    assert sum(int(m.sum()) for m in grouped) == sum(int(m.sum()) for m in arrival) == 65
    assert sum(m.numel() for m in grouped) == 80 and sum(m.numel() for m in arrival) == 104
