"""Tokenization and collation of pairs (plad_ray.train.batching), with the tiny byte tokenizer."""

import numpy as np
import pytest

from plad_ray.models import tiny
from plad_ray.train.batching import PairTokenizer, collate_pairs, ragged, tokenize_pair


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
        [10, 11, 20, 21, 2],
        [12, 22, 0, 0, 0],
        [10, 11, 30, 0, 0],
        [12, 31, 32, 33, 2],
    ]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer().save_pretrained(folder)
    return str(folder)


def test_pair_tokenizer_appends_eos_only_to_outputs_that_ended_on_eos(tokenizer_dir):
    stage = PairTokenizer(tokenizer_dir, max_length=12)
    batch = {
        "id": np.array(["a", "b", "c"]),
        "heldout": np.array([False, True, False]),
        "prompt": np.array(["ab>", "ab>", "abcdefghijklm>"]),
        "chosen": np.array(["ba", "ba", "x"]),
        "rejected": np.array(["bb", "ba", "y"]),
        "chosen_finish_reason": np.array(["eos", "eos", "eos"]),
        "rejected_finish_reason": np.array(["length", "eos", "eos"]),
    }
    out = stage(batch)
    assert out["status"].tolist() == ["ok", "identical", "too_long"]
    assert out["heldout"].tolist() == [False, True, False]
    # Byte-level ids: 3 special tokens, then the byte alphabet sorted, printable ASCII from '!' (0x21)
    # first, so a printable character c has id ord(c) - 0x21 + 3: 'a' -> 67, '>' -> 32.
    ab, ba, bb = ([ord(c) - 0x21 + 3 for c in s] for s in ("ab>", "ba", "bb"))
    assert out["prompt_ids"][0].tolist() == ab == [67, 68, 32]
    assert out["chosen_ids"][0].tolist() == ba + [tiny.EOS_ID]  # ended on EOS: EOS is scored
    assert out["rejected_ids"][0].tolist() == bb  # cut at max_tokens: no EOS
    assert out["chosen_ids"][1].tolist() == ba + [tiny.EOS_ID]  # identical pairs keep their ids (NLL part)


def test_an_output_a_stop_string_ended_is_scored_with_the_stop_string_not_eos(tokenizer_dir):
    # vLLM drops the stop string from the text but keeps the token that completed it in the ids;
    # the text path puts it back, so both paths score the same ending, and neither invents an EOS.
    stage = PairTokenizer(tokenizer_dir, max_length=16, chosen_stop="\n", rejected_stop="\n")
    batch = {
        "id": np.array(["a"]),
        "heldout": np.array([False]),
        "prompt": np.array(["ab>"]),
        "chosen": np.array(["ba"]),
        "rejected": np.array(["bb"]),
        "chosen_finish_reason": np.array(["stop"]),
        "rejected_finish_reason": np.array(["stop"]),
        "rejected_token_ids": np.array([None], dtype=object),
    }
    out = stage(batch)
    newline = tiny.build_tokenizer()("\n", add_special_tokens=False)["input_ids"]
    ba, bb = ([ord(c) - 0x21 + 3 for c in s] for s in ("ba", "bb"))
    assert len(newline) == 1 and newline[0] != tiny.EOS_ID
    assert out["chosen_ids"][0].tolist() == ba + newline
    assert out["rejected_ids"][0].tolist() == bb + newline


def test_generated_ids_are_scored_as_generated(tokenizer_dir):
    # The engine's ids win over the text wherever a pair carries them: here they differ from the
    # text on purpose (EOS included by the engine, a token the text would not give), and are used.
    stage = PairTokenizer(tokenizer_dir, max_length=16)
    batch = {
        "id": np.array(["a", "b"]),
        "heldout": np.array([False, False]),
        "prompt": np.array(["ab>", "ab>"]),
        "chosen": np.array(["ba", "ba"]),
        "rejected": np.array(["bb", "aa"]),
        "chosen_finish_reason": np.array(["eos", "eos"]),
        "rejected_finish_reason": np.array(["eos", "length"]),
        "chosen_token_ids": np.array([[68, 67, 2], None], dtype=object),
        "rejected_token_ids": np.array([[68, 68, 2], [67, 67, 67]], dtype=object),
    }
    out = stage(batch)
    assert out["chosen_ids"][0].tolist() == [68, 67, 2]
    assert out["chosen_ids"][1].tolist() == [68, 67, tiny.EOS_ID]  # no ids (another tokenizer): text + EOS
    assert out["rejected_ids"][0].tolist() == [68, 68, 2]
    assert out["rejected_ids"][1].tolist() == [67, 67, 67]


def test_pair_tokenizer_applies_the_chat_template_like_the_engine(tmp_path):
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    )
    tokenizer.save_pretrained(tmp_path)
    stage = PairTokenizer(str(tmp_path), max_length=32, chat_template=True)
    batch = {
        "id": np.array(["a"]),
        "heldout": np.array([False]),
        "prompt": np.array(["hi"]),
        "chosen": np.array(["x"]),
        "rejected": np.array(["y"]),
        "chosen_finish_reason": np.array(["eos"]),
        "rejected_finish_reason": np.array(["eos"]),
    }
    # The student engine saw "[hi]:" (one user turn plus the generation prompt), so training scores after it.
    assert stage(batch)["prompt_ids"][0].tolist() == tokenizer("[hi]:", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("policy", ["keep", "drop", "flip"])
def test_pair_tokenizer_scores_pairs_and_applies_the_student_wins_policy(tokenizer_dir, policy):
    # "ab>" is answered "ba": pair a the teacher wins, b a tie (both wrong), c the student wins.
    stage = PairTokenizer(tokenizer_dir, max_length=12, scorer="reverse", student_wins=policy)
    batch = {
        "id": np.array(["a", "b", "c"]),
        "heldout": np.array([False] * 3),
        "prompt": np.array(["ab>"] * 3),
        "chosen": np.array(["ba", "aa", "bb"]),
        "rejected": np.array(["bb", "ab", "ba"]),
        "chosen_finish_reason": np.array(["eos", "eos", "length"]),
        "rejected_finish_reason": np.array(["eos", "eos", "eos"]),
    }
    out = stage(batch)
    assert out["verdict"].tolist() == ["teacher", "tie", "student"]
    assert out["status"].tolist() == ["ok", "ok", "student_better" if policy == "drop" else "ok"]
    ba, bb = ([ord(c) - 0x21 + 3 for c in s] for s in ("ba", "bb"))
    if policy == "flip":  # the student's right answer becomes chosen (with its EOS: it ended on one)
        assert out["chosen_ids"][2].tolist() == ba + [tiny.EOS_ID] and out["rejected_ids"][2].tolist() == bb
        assert (out["chosen_score"][2], out["rejected_score"][2]) == (1.0, 0.0)
    else:
        assert out["chosen_ids"][2].tolist() == bb and out["rejected_ids"][2].tolist() == ba + [tiny.EOS_ID]
        assert (out["chosen_score"][2], out["rejected_score"][2]) == (0.0, 1.0)
    assert out["chosen_score"][:2].tolist() == [1.0, 0.0] and out["rejected_score"][:2].tolist() == [0.0, 0.0]
    batch_ = collate_pairs(
        {k: out[k][:2] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_score", "rejected_score")},
        pad_id=0,
    )
    assert batch_["chosen_score"].tolist() == [1.0, 0.0] and batch_["rejected_score"].tolist() == [0.0, 0.0]


def test_length_grouping_cuts_padding_and_keeps_every_pair_once():
    # 8 pairs of lengths 1..8 (prompt 1 + response k-1), shuffled; micro-batches of 2.
    lengths = [5, 1, 8, 3, 7, 2, 6, 4]
    bucket = {
        "prompt_ids": np.array([np.array([9]) for _ in lengths], dtype=object),
        "chosen_ids": np.array([np.arange(n - 1) for n in lengths], dtype=object),
        "rejected_ids": np.array([np.arange(max(n - 2, 0)) for n in lengths], dtype=object),
        "id": np.array([f"p{n}" for n in lengths]),
    }
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
    arrival = [collate_pairs({k: v[i : i + 2] for k, v in bucket.items()}, 0)["attention_mask"] for i in range(0, 8, 2)]
    assert sum(int(m.sum()) for m in grouped) == sum(int(m.sum()) for m in arrival) == 65
    assert sum(m.numel() for m in grouped) == 80 and sum(m.numel() for m in arrival) == 104


@pytest.fixture(scope="module")
def prefix_marker_tokenizer_dir(tmp_path_factory):
    """A SentencePiece-style tokenizer: words start with the marker '▁' (Metaspace), BPE merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "<s>", "</s>", "▁", "a", "b", ">", "▁a", "▁b", "▁ba", "▁ab", "ab", "ab>", "▁ab>"]
    merges = [("▁", "a"), ("▁", "b"), ("▁b", "a"), ("a", "b"), ("▁a", "b"), ("ab", ">"), ("▁ab", ">")]
    core = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    folder = tmp_path_factory.mktemp("spm")
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    return str(folder)


def test_prefix_marker_tokenizer_scores_the_generated_ids_not_a_retokenisation(prefix_marker_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prefix_marker_tokenizer_dir)
    piece = tokenizer.convert_tokens_to_ids
    # The student engine sampled "▁b" "a" then EOS: a valid id sequence that BPE would not produce
    # for its own text. vLLM decodes it to "ba" (the decoder drops the leading marker).
    generated = [piece("▁b"), piece("a"), tokenizer.eos_token_id]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    assert text == "ba"
    retokenised = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert retokenised == [piece("▁ba")] != generated[:-1]  # the trap: text -> ids is not the identity here
    stage = PairTokenizer(prefix_marker_tokenizer_dir, max_length=16)
    batch = {
        "id": np.array(["a", "b"]),
        "heldout": np.array([False, False]),
        "prompt": np.array(["ab>", "ab>"]),
        "chosen": np.array(["ab", "ab"]),
        "rejected": np.array([text, text]),
        "chosen_finish_reason": np.array(["eos", "eos"]),
        "rejected_finish_reason": np.array(["eos", "eos"]),
        "rejected_token_ids": np.array([generated, None], dtype=object),
    }
    out = stage(batch)
    # ids -> text -> training ids: the generated ids come back exactly, EOS included where it was emitted.
    assert out["rejected_ids"][0].tolist() == generated
    # Without ids (text only, e.g. another tokenizer's output) the same text trains a different sequence.
    assert out["rejected_ids"][1].tolist() == retokenised + [tokenizer.eos_token_id] != generated


def test_byte_level_text_and_ids_paths_agree(tokenizer_dir):
    # Where text -> ids is the identity (the byte tokenizer of the tiny models), both paths give one sequence.
    tokenizer = tiny.build_tokenizer()
    texts = ["olleh", "a b", "ab\u00e9"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tiny.EOS_ID] for t in texts]
    assert [tokenizer.decode(i, skip_special_tokens=True) for i in ids] == texts
    stage = PairTokenizer(tokenizer_dir, max_length=32)
    n = len(texts)
    batch = {
        "id": np.array([f"p{i}" for i in range(n)]),
        "heldout": np.array([False] * n),
        "prompt": np.array(["x>"] * n),
        "chosen": np.array(texts),
        "rejected": np.array(texts),
        "chosen_finish_reason": np.array(["eos"] * n),
        "rejected_finish_reason": np.array(["eos"] * n),
        "rejected_token_ids": np.array(ids, dtype=object),
    }
    out = stage(batch)
    assert [c.tolist() for c in out["chosen_ids"]] == [r.tolist() for r in out["rejected_ids"]] == ids


def test_listwise_groups_one_prompts_samples_into_one_row_and_one_forward():
    from plad_ray.train.batching import collate_groups, group_samples

    # Prompt "a" has three pairs; the second is identical (no ranking signal) and is left out.
    pairs = {
        "id": np.array(["a", "a", "a"]),
        "status": np.array(["ok", "identical", "ok"]),
        "prompt_ids": np.array([np.array([10]), np.array([10]), np.array([10])], dtype=object),
        "chosen_ids": np.array([np.array([20, 2])] * 3, dtype=object),
        "rejected_ids": np.array([np.array([30]), np.array([20, 2]), np.array([31, 32, 2])], dtype=object),
    }
    row = group_samples(pairs)
    assert row["num_samples"].tolist() == [2]
    assert [r.tolist() for r in row["rejected_ids_list"][0]] == [[30], [31, 32, 2]]
    other = {
        "id": np.array(["b"]),
        "prompt_ids": ragged([np.array([11, 12])]),
        "chosen_ids": ragged([np.array([21])]),
        "rejected_ids_list": ragged([ragged([np.array([33])])]),
        "num_samples": np.array([1]),
    }
    batch = {k: np.concatenate([row[k], other[k]]) for k in ("prompt_ids", "chosen_ids", "rejected_ids_list")}
    out = collate_groups(batch, pad_id=0)
    # Rows: chosen a, chosen b, then K = 2 slots per prompt: a's two samples, b's one sample and an empty slot.
    assert out["input_ids"].tolist() == [
        [10, 20, 2, 0],
        [11, 12, 21, 0],
        [10, 30, 0, 0],
        [10, 31, 32, 2],
        [11, 12, 33, 0],
        [11, 12, 0, 0],
    ]
    assert out["response_mask"].tolist() == [
        [0, 1, 1, 0],
        [0, 0, 1, 0],
        [0, 1, 0, 0],
        [0, 1, 1, 1],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ]
    assert out["rejected_mask"].tolist() == [[1.0, 1.0], [1.0, 0.0]]


def test_collate_pairs_marks_identical_pairs_unranked():
    batch = {
        "prompt_ids": np.array([np.array([1]), np.array([1])], dtype=object),
        "chosen_ids": np.array([np.array([2]), np.array([3])], dtype=object),
        "rejected_ids": np.array([np.array([4]), np.array([3])], dtype=object),
        "status": np.array(["ok", "identical"]),
    }
    assert collate_pairs(batch, pad_id=0)["ranked"].tolist() == [1.0, 0.0]


def test_a_null_ids_column_falls_back_to_the_text(tokenizer_dir):
    # A column with no ids at all reaches the stage as NaN (how Ray Data and pandas spell an all-null list).
    stage = PairTokenizer(tokenizer_dir, max_length=16)
    batch = {
        "id": np.array(["a"]),
        "heldout": np.array([False]),
        "prompt": np.array(["ab>"]),
        "chosen": np.array(["ba"]),
        "rejected": np.array(["bb"]),
        "chosen_finish_reason": np.array(["eos"]),
        "rejected_finish_reason": np.array(["eos"]),
        "chosen_token_ids": np.array([np.nan], dtype=np.float32),
        "rejected_token_ids": np.array([None]),
    }
    out = stage(batch)
    assert out["chosen_ids"][0].tolist() == [68, 67, tiny.EOS_ID] and out["rejected_ids"][0].tolist() == [
        68,
        68,
        tiny.EOS_ID,
    ]


def test_length_grouping_on_or_off_trains_the_same_pairs_each_epoch_once_with_less_padding():
    # The worker's own feed (feed.optimizer_steps over a shard), grouping 16 micro-batches vs none.
    from dataclasses import replace

    from plad_ray.config import TrainConfig
    from plad_ray.train import feed
    from tests.support.training_paths import ListShard, synthetic_pairs

    rows = synthetic_pairs(256, vocab=200)
    padding = {}
    for grouping in (1, 16):
        t = replace(TrainConfig(), micro_batch_size=4, gradient_accumulation_steps=2, length_grouping=grouping)
        for epoch in (0, 1):
            steps = list(feed.optimizer_steps(ListShard(rows), t, 0, epoch))
            ids = [i for step in steps for batch in step for i in _chosen_rows(batch, rows)]
            assert len(steps) == 32 and all(len(step) == 2 for step in steps)
            assert sorted(ids) == sorted(range(256)), (grouping, epoch)  # every pair once per epoch
        masks = [batch["attention_mask"] for step in steps for batch in step]
        padding[grouping] = 1 - sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)
    assert padding[16] < padding[1]


def _chosen_rows(batch, rows):
    """Row numbers of a collated micro-batch's pairs (its chosen sequences are unique prompt+chosen ids)."""
    index = {tuple(np.concatenate([r["prompt_ids"], r["chosen_ids"]])): n for n, r in enumerate(rows)}
    b = batch["input_ids"].shape[0] // 2
    lengths = batch["attention_mask"][:b].sum(-1)
    return [index[tuple(batch["input_ids"][i, : lengths[i]].tolist())] for i in range(b)]
