"""Scoring through a black-box teacher (plad_ray.generate.endpoint_scores): the probe that refuses an endpoint
which cannot score the student's ids, and the reading of an answer. On a stub server on loopback, for the
servers vLLM's is not (no prompt log-probs, another vocabulary, no /tokenize); the real vLLM server scores
whole runs in tests/integration/test_http_teacher.py."""

import pytest
from support.openai_stub import Stub

from plad_ray.config import EndpointConfig, TeacherEngineConfig
from plad_ray.errors import ConfigError, DataError
from plad_ray.generate.endpoint import check_endpoint
from plad_ray.generate.endpoint_scores import PROBE_TEXT, ScoringWorker, check_scoring, scoring_params


def _entry(ranked: dict, token: int | None = None, token_lp: float = -9.0) -> dict:
    """vLLM's JSON for one position: {"id": {"logprob", "rank", "decoded_token"}}; ranked = {id: logprob}."""
    out = {str(t): {"logprob": lp, "rank": r, "decoded_token": "x"} for r, (t, lp) in enumerate(ranked.items(), 1)}
    if token is not None and str(token) not in out:
        out[str(token)] = {"logprob": token_lp, "rank": 99, "decoded_token": "y"}
    return out


@pytest.fixture(scope="module")
def student(tiny_models):
    from transformers import AutoTokenizer

    return tiny_models["student"], AutoTokenizer.from_pretrained(tiny_models["student"])


def scored(body):
    """A vLLM-like answer: the top-k of every prompt position after the first."""
    k, ids = body["prompt_logprobs"], body["prompt"]
    positions = [None] + [
        _entry({t: -0.1 * r for r, t in enumerate(range(100, 100 + k), 1)}, ids[i]) for i in range(1, len(ids))
    ]
    return 200, {"choices": [{"text": "", "prompt_logprobs": positions}], "usage": {"prompt_tokens": len(ids)}}


def tokenized(tokenizer, shift=0):
    def answer(body):
        ids = tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
        return 200, {"tokens": [i + shift for i in ids], "token_strs": tokenizer.convert_ids_to_tokens(ids)}

    return answer


def check(stub, student_path, k=5, max_model_len=64):
    engine = TeacherEngineConfig(
        model="stub-teacher", max_model_len=max_model_len, score_top_k=k, endpoint=EndpointConfig(url=stub.url)
    )
    check_scoring(engine, check_endpoint(engine.endpoint, engine.model), student_path)


def test_an_endpoint_that_scores_and_tokenizes_as_the_student_passes(student):
    path, tokenizer = student
    stub = Stub(scored, tokenized(tokenizer))
    check(stub, path)
    stub.close()
    (where, probe), (where2, tokenize) = stub.requests
    assert where == "/v1/completions" and {k: probe[k] for k in scoring_params(5)} == scoring_params(5)
    assert probe["prompt"] == tokenizer(PROBE_TEXT + tokenizer.eos_token, add_special_tokens=False)["input_ids"][:63]
    assert where2 == "/tokenize" and tokenize["prompt"].startswith(PROBE_TEXT) and tokenize["return_token_strs"]


@pytest.mark.parametrize(
    "case, error, start",
    [
        (
            "no prompt_logprobs",
            ConfigError,
            "config key teacher.score_samples: teacher endpoint {url} returns no prompt log-probs",
        ),
        (
            "k refused",
            ConfigError,
            "config key teacher.score_top_k: teacher endpoint {url} refuses 5 prompt log-probs "
            "per token (HTTP 400: Requested prompt logprobs of 5, which is greater than max "
            "allowed: 4",
        ),
        (
            "fewer than k",
            ConfigError,
            "config key teacher.score_top_k: teacher endpoint {url} returned prompt log-probs "
            "plad-ray cannot read as the top 5 per token",
        ),
        (
            "ids refused",
            DataError,
            "teacher endpoint {url}: a scoring request (token ids as the prompt, "
            "prompt_logprobs=5) was refused (HTTP 400: prompt must be a string)",
        ),
        (
            "another vocabulary",
            ConfigError,
            "config key teacher.score_samples: the teacher's and the student's tokenizers map ids to different tokens",
        ),
        (
            "no /tokenize",
            ConfigError,
            "config key teacher.score_samples: teacher endpoint http://127.0.0.1:{port}/tokenize "
            "did not tokenize a probe (HTTP 404: Not Found)",
        ),
        (
            "shorter context",
            ConfigError,
            "config key teacher.max_model_len: 64 is more than the 32 tokens the endpoint admits per request",
        ),
    ],
)
def test_an_endpoint_that_cannot_score_the_students_ids_is_refused_with_one_line(student, case, error, start):
    path, tokenizer = student

    def completions(body):
        if case == "no prompt_logprobs":  # a server that ignores the parameter (OpenAI's own does)
            return 200, {"choices": [{"text": "x", "finish_reason": "length"}]}
        if case == "k refused":
            return 400, {
                "error": {
                    "message": f"Requested prompt logprobs of {body['prompt_logprobs']}, which is "
                    "greater than max allowed: 4"
                }
            }
        if case == "fewer than k":
            status, answer = scored({**body, "prompt_logprobs": 3})
            return status, answer
        if case == "ids refused":
            return 400, {"error": {"message": "prompt must be a string"}}
        return scored(body)

    tokenize = None if case == "no /tokenize" else tokenized(tokenizer, shift=1 if case == "another vocabulary" else 0)
    stub = Stub(
        completions,
        tokenize or (lambda body: (404, {"detail": "Not Found"})),
        max_model_len=32 if case == "shorter context" else 64,
    )
    with pytest.raises(error) as failure:
        check(stub, path)
    stub.close()
    line = str(failure.value)
    assert "\n" not in line
    assert line.startswith(start.format(url=stub.url, port=stub.server.server_port)), line


def test_an_answer_becomes_the_sequences_score_row_or_the_reason_it_cannot():
    engine = TeacherEngineConfig(
        model="stub-teacher", score_top_k=2, endpoint=EndpointConfig(url="http://h/v1/chat/completions")
    )
    worker = ScoringWorker(engine, stats=None)
    assert worker.url == "http://h/v1/completions"  # token ids go to the completions URL, even for a chat teacher
    row = {"id": "p1", "sample_index": 1, "side": "rejected", "prompt_len": 2, "tokenized_prompt": [5, 6, 7, 8]}
    assert worker.payload(row) == {"model": "stub-teacher", "prompt": [5, 6, 7, 8], **scoring_params(2)}
    positions = [None, _entry({9: -0.5, 6: -1.5}), _entry({7: -0.2, 3: -2.0}), _entry({4: -0.3, 5: -1.6}, 8, -4.0)]
    out = worker.read(row, {"choices": [{"prompt_logprobs": positions}]})
    assert out == {
        "id": "p1",
        "sample_index": 1,
        "side": "rejected",
        "num_tokens": 2,
        "prompt_tokens": 2,
        "token_ids": [7, 8],
        "logprobs": [-0.2, -4.0],
        "topk_ids": [7, 3, 4, 5],
        "topk_logprobs": [-0.2, -2.0, -0.3, -1.6],
    }
    assert worker.read(row, {"choices": [{"text": ""}]}) == "the answer has no prompt_logprobs"
    short = positions[:3] + [_entry({4: -0.3})]
    assert worker.read(row, {"choices": [{"prompt_logprobs": short}]}).startswith("unreadable prompt_logprobs")
