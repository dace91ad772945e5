"""Teacher scoring through a black-box endpoint: the server's prompt log-probs of the student's token ids.

    scoring sequences (ids to prefill) --ScoringWorker x concurrency--> rows of schemas.SCORE_SCHEMA

A scoring request posts prompt + response as token ids to the completions URL with `max_tokens: 1` and
`prompt_logprobs: k` (vLLM's OpenAI server returns them; OpenAI's own API does not). The ids are the
student's, so the server must read them as the student's tokenizer wrote them: `check_scoring` asks the
server, before the run, to score a probe and to tokenize a probe text, and compares. The request workers
are the teacher's (plad_ray.generate.endpoint_worker): the same retries, canaries, outage budget, refusal
window and rate limits. Unlike a prompt, a sequence cannot be set aside: every pair needs its scores, so a
refused request, or one whose retries are spent while a canary is answered, ends the run with one line naming
the sequence and the server's last words (the rows scored so far are kept; the same command resumes).
"""

from plad_ray.config import EngineConfig
from plad_ray.errors import ConfigError, DataError
from plad_ray.generate.endpoint import call, check_endpoint, completions_url, server_root
from plad_ray.generate.endpoint_policy import error_text, verdict
from plad_ray.generate.endpoint_worker import EndpointFailure, EndpointWorker
from plad_ray.generate.schemas import SCORE_SCHEMA
from plad_ray.teacher_logprobs import CROSS_VOCABULARY, read_prompt_logprobs

# Text the student tokenizes and the server must tokenize the same way (letters, digits, punctuation,
# white space, accents, CJK, emoji; the student's end-of-sequence token is appended).
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog; THE QUICK BROWN FOX! 0123456789 +-*/=<>()[]{}"
    ' "quoted" it\'s e.g.\n\tcafé naïve Zürich 東京 🙂 hello> olleh'
)


def scoring_params(k: int) -> dict:
    """A prefill: one sampled token (vLLM needs >= 1), greedy, and the top-k log-probs at every prompt position."""
    return {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}


class ScoringWorker(EndpointWorker):
    """A Ray Data callable class: a batch of (id, sample_index, side, prompt_len, tokenized_prompt) rows in,
    their rows of SCORE_SCHEMA out."""

    def __init__(self, engine: EngineConfig, stats):
        super().__init__(
            engine,
            scoring_params(engine.score_top_k),
            engine.model,
            "",
            "",
            stats,
            log_prefix="[generate] teacher scoring endpoint",
        )
        self.url = completions_url(engine.endpoint.url)

    def schema(self):
        return SCORE_SCHEMA

    def payload(self, row: dict) -> dict:
        return {"model": self.engine.model, "prompt": [int(t) for t in row["tokenized_prompt"]], **self.params}

    def read(self, row: dict, response: dict) -> dict | str:
        logprobs = (response.get("choices") or [{}])[0].get("prompt_logprobs")
        if not logprobs:
            return "the answer has no prompt_logprobs"
        try:
            read = read_prompt_logprobs(
                logprobs, [int(t) for t in row["tokenized_prompt"]], int(row["prompt_len"]), self.engine.score_top_k
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            return f"unreadable prompt_logprobs ({type(e).__name__}: {e})"
        return {"id": row["id"], "sample_index": int(row["sample_index"]), "side": row["side"], **read}

    def set_aside(self, results: list[dict]) -> None:
        first = results[0]
        key = f"({first['row']['id']}, {first['row']['sample_index']}, {first['row']['side']})"
        more = f" (and {len(results) - 1} more)" if len(results) > 1 else ""
        self.failure = (
            f"teacher endpoint {self.url}: scoring sequence {key}{more} {verdict(first)}; "
            "every pair needs its teacher scores"
        )
        self._flush(failure=self.failure)
        raise EndpointFailure(self.failure)


def scores_http(ids_ds, engine: EngineConfig, stats):
    """Rows with the ids to prefill -> rows of SCORE_SCHEMA from the endpoint's prompt log-probs."""
    import ray.data

    from plad_ray.generate.endpoint import REQUEST_WORKER_CPUS

    return ids_ds.map_batches(
        ScoringWorker,
        fn_constructor_kwargs=dict(engine=engine, stats=stats),
        batch_size=engine.batch_size,
        batch_format="pyarrow",
        num_cpus=REQUEST_WORKER_CPUS,
        compute=ray.data.ActorPoolStrategy(size=engine.endpoint.concurrency),
    )


def check_teacher(teacher, student_path: str | None, trust_remote_code: bool, log) -> None:
    """Before the run, a black-box teacher (teacher.endpoint): it answers and serves teacher.model, and with
    teacher.score_samples it can score the student's sequences (plad_ray.generate.endpoint_scores)."""
    card = check_endpoint(teacher.endpoint, teacher.model)
    log(f"[plad-ray] teacher: {teacher.model} at {teacher.endpoint.url}")
    if teacher.score_samples and student_path:
        check_scoring(teacher, card, student_path, trust_remote_code)
        log(
            f"[plad-ray] teacher scoring: the endpoint returns top-{teacher.score_top_k} prompt log-probs and "
            "tokenizes a probe as the student does"
        )


def check_scoring(engine: EngineConfig, card: dict, student_path: str, trust_remote_code: bool = False) -> None:
    """Before the run: the endpoint (its /models entry `card`) can score the student's sequences. It admits
    teacher.max_model_len tokens, returns top-k prompt log-probs of a probe, and tokenizes a probe text into
    the ids and token strings the student's tokenizer gives (the same id means the same token)."""
    from transformers import AutoTokenizer

    endpoint, k, url = engine.endpoint, engine.score_top_k, completions_url(engine.endpoint.url)
    served_len = card.get("max_model_len")
    if isinstance(served_len, int) and engine.max_model_len > served_len:
        raise ConfigError(
            f"config key teacher.max_model_len: {engine.max_model_len} is more than the {served_len} "
            f"tokens the endpoint admits per request, and a scoring request holds prompt and response; "
            f"set teacher.max_model_len={served_len}"
        )
    tokenizer = AutoTokenizer.from_pretrained(student_path, trust_remote_code=trust_remote_code)
    text = PROBE_TEXT + (tokenizer.eos_token or "")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    probe = ids[: max(2, min(len(ids), engine.max_model_len - 1))]
    status, body, raw = call(endpoint, url, {"model": engine.model, "prompt": probe, **scoring_params(k)})
    if status != 200:
        message = error_text(status, raw)
        if "logprobs" in message:
            raise ConfigError(
                f"config key teacher.score_top_k: teacher endpoint {url} refuses {k} prompt log-probs "
                f"per token ({message}); lower teacher.score_top_k, or start the server with a larger "
                "--max-logprobs"
            )
        raise DataError(
            f"teacher endpoint {url}: a scoring request (token ids as the prompt, prompt_logprobs={k}) "
            f"was refused ({message}); teacher.score_samples needs a completions server that returns "
            "prompt log-probs (vLLM's OpenAI server), or set teacher.score_samples=false"
        )
    logprobs = ((body or {}).get("choices") or [{}])[0].get("prompt_logprobs")
    if not logprobs:
        raise ConfigError(
            f"config key teacher.score_samples: teacher endpoint {url} returns no prompt log-probs (its "
            "completions carry no prompt_logprobs), and scoring reads the teacher's log-prob of every "
            "token; serve the teacher with vLLM's OpenAI server or run it as a vLLM teacher, or set "
            "teacher.score_samples=false"
        )
    try:
        read_prompt_logprobs(logprobs, probe, 1, k)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"config key teacher.score_top_k: teacher endpoint {url} returned prompt log-probs plad-ray "
            f"cannot read as the top {k} per token ({type(e).__name__}: {e}); set "
            "teacher.score_samples=false"
        ) from None
    tokenize = server_root(endpoint.url) + "/tokenize"
    status, body, raw = call(
        endpoint,
        tokenize,
        {"model": engine.model, "prompt": text, "add_special_tokens": False, "return_token_strs": True},
    )
    if status != 200:
        raise ConfigError(
            f"config key teacher.score_samples: teacher endpoint {tokenize} did not tokenize a probe "
            f"({error_text(status, raw)}), so plad-ray cannot check that the server reads token "
            "ids as the student's tokenizer writes them; serve the teacher with vLLM's OpenAI server, "
            "or set teacher.score_samples=false"
        )
    if (body or {}).get("tokens") != ids or (body or {}).get("token_strs") != tokenizer.convert_ids_to_tokens(ids):
        raise ConfigError(f"{CROSS_VOCABULARY} (the endpoint's /tokenize of a probe text differs from the student's)")
