"""Every check that runs before the expensive work, in one place.

Config values are checked when the config loads (plad_ray.config); what needs the world
outside the config is checked here, before Ray starts: the prompt source's files, model
folders, the teacher endpoint, external pairs, a shared vocabulary for token_kd, a teacher
vocabulary within the student's embedding rows for the objectives that read teacher token ids. What reads
every prompt row runs as the first Ray Data stage, before any engine starts
(plad_ray.data.prompt_checks): rows and their lengths (data.bad_rows, data.too_long), and
cached teacher outputs against the prompts they answer. A failing check raises ConfigError
or DataError with one line naming the input and the fix.
"""

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs  # noqa: F401 - pa.fs below

from plad_ray.config import Config
from plad_ray.data import parquet, storage
from plad_ray.data.limits import Limit
from plad_ray.data.prompt_checks import check_cached_prompts, check_prompts, source_files
from plad_ray.errors import ConfigError, DataError
from plad_ray.models.cache import is_remote, local_model
from plad_ray.models.folders import embedding_rows, resolve_model, shares_vocabulary, tokenizer_size
from plad_ray.run_context import RunContext
from plad_ray.teacher_logprobs import CROSS_VOCABULARY


def model_folder(cfg: Config, role: str, log=lambda _: None) -> str:
    """The local folder of the teacher's or the student's model: checked, a URI fetched into cluster.model_cache."""
    engine = getattr(cfg, role)
    return resolve_model(
        engine.model,
        f"{role}.model",
        engine.allow_pickle_weights,
        engine.chat_template,
        log=log,
        cache_root=cfg.cluster.model_cache,
    )


@dataclass
class Inputs:
    """Checked inputs; each field only when the stages run need it."""

    prompts: object | None = None  # checked prompts (id, prompt, reference): a Ray Dataset over materialised rows
    num_prompts: int = 0
    quarantine: object | None = None  # prompt rows set aside with their reasons (a Ray Dataset), or None
    quarantined: int = 0
    truncated: int = 0  # prompts cut to fit (data.too_long=truncate)
    teacher_path: str | None = None
    student_path: str | None = None

    def student_for_round(self, run: RunContext, round: int) -> str:
        """The student a round starts from: the checked student in round 1, round r-1's export after (a local
        folder on every node: a URI output_dir's export is fetched to cluster.model_cache)."""
        return self.student_path if round == 1 else run.student_after(round - 1)


def check_inputs(
    cfg: Config,
    prompts: bool = True,
    teacher: bool = True,
    student: bool = True,
    pairs_written: bool = False,
    log=print,
) -> Inputs:
    """Read prompts, resolve model folders, find earlier outputs; raises before any expensive work."""
    if pairs_written and cfg.train.pairs is not None:
        check_external_pairs(cfg.train.pairs)
        if cfg.train.teacher_scores is not None and storage.manifest(cfg.train.teacher_scores) is None:
            raise DataError(
                f"config key train.teacher_scores: {cfg.train.teacher_scores} is not a finished "
                "teacher_scores folder; point it at the teacher_scores/ of the run that made train.pairs "
                "(jobs.generate_pairs with teacher.score_samples=true)"
            )
    elif pairs_written and storage.manifest(cfg.layout().pairs()) is None:
        raise DataError(
            f"pairs {cfg.layout().pairs()}: missing or incomplete; run jobs.generate_pairs first, "
            "or point train.pairs at a pairs dataset"
        )
    inputs = Inputs()
    if teacher and cfg.teacher.endpoint is None:  # an endpoint teacher: plad_ray.generate.endpoint.check_teacher
        inputs.teacher_path = model_folder(cfg, "teacher", log)
    if student:
        inputs.student_path = model_folder(cfg, "student", log)
    if (
        cfg.teacher.score_samples
        and inputs.teacher_path
        and inputs.student_path
        and not shares_vocabulary(inputs.teacher_path, inputs.student_path, cfg.student.trust_remote_code)
    ):
        raise ConfigError(CROSS_VOCABULARY)
    objective = cfg.train.loss.objective
    if objective.needs_local_teacher and inputs.teacher_path and inputs.student_path:
        check_shared_vocabulary(inputs.teacher_path, inputs.student_path, cfg.student.trust_remote_code)
    reads_ids = cfg.teacher.score_samples or objective.needs_local_teacher or objective.reads_topk
    if reads_ids and inputs.teacher_path and inputs.student_path:
        check_teacher_ids_fit(
            inputs.teacher_path,
            inputs.student_path,
            "teacher.score_samples" if cfg.teacher.score_samples else "train.loss.type",
            (cfg.teacher.trust_remote_code, cfg.student.trust_remote_code),
        )
    if cfg.teacher.sampling.stop is not None and cfg.student.sampling.stop != cfg.teacher.sampling.stop:
        log(
            f"[plad-ray] warning: the teacher stops at {cfg.teacher.sampling.stop!r} but the student at "
            f"{cfg.student.sampling.stop!r}: the student is trained to end its answers with "
            f"{cfg.teacher.sampling.stop!r}, "
            "which will not end its own generations; give student.sampling.stop the same string"
        )
    if prompts:
        source_files(cfg.data.prompts)  # the rows are read by check_prompt_rows, once Ray is up
    return inputs


def fetch_models_to_nodes(cfg: Config, inputs: Inputs) -> None:
    """Models given as URIs were fetched to this node's cluster.model_cache by the checks; once Ray is up, to every
    node's (the same folder: the engines and trainer ranks anywhere open the path the checks gave)."""
    for role, path in (("teacher", inputs.teacher_path), ("student", inputs.student_path)):
        spec = getattr(cfg, role).model
        if path is not None and is_remote(spec):
            local_model(spec, cfg.cluster.model_cache)


def check_prompt_rows(cfg: Config, inputs: Inputs, log=print) -> None:
    """Read and check every prompt row in Ray Data (data.bad_rows, data.too_long); the checked prompts
    go to `inputs`. Needs Ray; runs before any engine starts."""
    import ray

    limits = prompt_limits(cfg, inputs.teacher_path, inputs.student_path)
    checked = check_prompts(
        cfg.data.prompts,
        cfg.data.max_prompts,
        cfg.data.bad_rows,
        cfg.data.too_long,
        limits,
        tokenizers=int(ray.cluster_resources().get("CPU", 1)),
    )
    inputs.prompts, inputs.num_prompts = checked.prompts, checked.count
    inputs.quarantine, inputs.quarantined, inputs.truncated = checked.quarantine, checked.quarantined, checked.truncated
    log(
        f"[plad-ray] {inputs.num_prompts} prompts from {cfg.data.prompts}"
        + (f"; {inputs.quarantined} set aside" if inputs.quarantined else "")
        + (f"; {inputs.truncated} truncated to fit" if inputs.truncated else "")
    )


def check_teacher_cache(cfg: Config, inputs: Inputs, log=print) -> None:
    """Cached teacher outputs, committed or left by a crash, must still answer their ids' prompts (an
    id-less source with a row inserted shifts every id). Needs Ray."""
    uri = cfg.layout().teacher()
    check_cached_prompts(parquet.done_keys_dataset(uri, ["id", "prompt"], log), inputs.prompts, cfg.data.prompts, uri)


def check_external_pairs(uri: str) -> None:
    """train.pairs: a Parquet file or folder with TRL's string columns prompt, chosen, rejected."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem_and_path(uri)
    if not storage.list_files(fs, path, uri):
        raise DataError(f"config key train.pairs: {uri} not found; give a Parquet file or folder of pairs")
    try:
        schema = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"config key train.pairs: {uri} is not readable Parquet ({e})") from None
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in schema.names]
    if missing:
        raise DataError(
            f"config key train.pairs: {uri} has no {', '.join(missing)} column(s) "
            f"(columns: {', '.join(schema.names)}); pairs use TRL's prompt/chosen/rejected"
        )
    for column in ("prompt", "chosen", "rejected"):
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(
                f"config key train.pairs: {uri} column {column} holds {kind}, not text; pairs use "
                "TRL's string columns prompt/chosen/rejected (conversational lists are not read)"
            )


def check_step_budget(cfg: Config, generation: bool) -> None:
    """Arithmetic across keys, before anything starts: the most training rows the run can have (every prompt
    the source holds, up to data.max_prompts, times student.num_samples, none held out, no row refused)
    must fill one optimizer step; otherwise training would refuse them after all the generation.

    Row counts come only from what the files state cheaply: Parquet metadata, or the lines of a local JSON
    Lines file (read in chunks); other sources are counted when the run reads them."""
    train = cfg.train
    if generation:
        rows = _rows_stated(cfg.data.prompts)
        if rows is None:
            return
        prompts = rows if cfg.data.max_prompts is None else min(rows, cfg.data.max_prompts)
        grouped = train.loss.objective.groups_samples
        most = prompts if grouped else prompts * cfg.student.num_samples
        what = (
            f"{prompts} prompts"
            if grouped
            else f"{most} pairs ({prompts} prompts x student.num_samples {cfg.student.num_samples})"
        )
        source = f"data.prompts {cfg.data.prompts}"
    elif train.pairs is not None and not train.loss.objective.groups_samples:
        most = _rows_stated(train.pairs)
        if most is None:
            return
        what, source = f"{most} pairs", f"train.pairs {train.pairs}"
    else:
        return
    per_worker = (train.gradient_accumulation_steps - 1) * train.micro_batch_size + 1
    need = train.num_workers * per_worker  # the fewest rows steps_per_epoch turns into one step
    if most < need:
        raise ConfigError(
            f"{source}: gives at most {what}, before any is held out; one optimizer step needs {need} "
            f"(train.num_workers {train.num_workers} x ((train.gradient_accumulation_steps "
            f"{train.gradient_accumulation_steps} - 1) x train.micro_batch_size {train.micro_batch_size} + 1)); "
            "add prompts or lower those"
        )


def _rows_stated(uri: str) -> int | None:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_and_path(uri)
    total = 0
    for f in storage.list_files(fs, path, uri):
        if f.endswith(".parquet"):
            with fs.open_input_file(f) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        elif f.endswith(".jsonl") and isinstance(fs, pa.fs.LocalFileSystem):
            with open(f, "rb") as handle:
                total += sum(1 for line in handle if line.strip())
        else:
            return None
    return total


def check_shared_vocabulary(teacher_path: str, student_path: str, trust_remote_code: bool = False) -> None:
    """token_kd compares token distributions position by position: both tokenizers must be one vocabulary."""
    if not shares_vocabulary(teacher_path, student_path, trust_remote_code):
        raise ConfigError(
            "config key train.loss.type: token_kd needs teacher and student to share a vocabulary "
            "(their tokenizers map ids to different tokens); "
            "use hinge, logistic or seqkd, which only need the teacher's text"
        )
    # One tokenizer can sit on embedding matrices of different heights (vocabularies padded to a multiple
    # of 64 or 128): the two logit rows then differ in width, and position-wise KL has no meaning.
    rows = [embedding_rows(p, trust_remote_code) for p in (teacher_path, student_path)]
    if rows[0] != rows[1]:
        raise ConfigError(
            f"config key train.loss.type: token_kd needs logits of one width, but the teacher has "
            f"{rows[0]} embedding rows and the student {rows[1]} (a padded vocabulary); "
            f"use seqkd or a PLaD loss, which only need the teacher's text"
        )


def check_teacher_ids_fit(
    teacher_path: str, student_path: str, key: str, trust_remote_code: tuple[bool, bool] = (False, False)
) -> None:
    """The teacher's token ids (its top-k, the tokens it scores) index the student's logits: every id the
    teacher's tokenizer can write must have a student embedding row, or the gather runs past the end (a
    device-side assert on GPU). Tokenizer size, not embedding rows: padded rows differ between model sizes
    of one family (Qwen2.5-7B 152,064, 0.5B 151,936) around one tokenizer of 151,665 tokens. The ids in a
    teacher_scores/ folder are checked again against the student when training reads them
    (plad_ray.train.score_joins.with_teacher_topk)."""
    tokens = tokenizer_size(teacher_path, trust_remote_code[0])
    rows = embedding_rows(student_path, trust_remote_code[1])
    if tokens > rows:
        raise ConfigError(
            f"config key {key}: the teacher's tokenizer ({teacher_path}) holds {tokens} tokens but the "
            f"student ({student_path}) has {rows} embedding rows, so teacher token ids {rows} and up "
            "have no student logit; use a student whose embedding covers the teacher's vocabulary, "
            "or train on the pairs' text (hinge, logistic, seqkd)"
        )


def prompt_limits(cfg: Config, teacher_path: str | None, student_path: str) -> list[Limit]:
    """The limits to check; a black-box teacher (no tokenizer here) is checked by its server."""
    t, s = cfg.teacher, cfg.student
    limits = [
        Limit(
            "student.max_model_len - student.sampling.max_tokens",
            student_path,
            s.chat_template,
            s.max_model_len - s.sampling.max_tokens,
            s.trust_remote_code,
        ),
        Limit("train.max_length - 1", student_path, s.chat_template, cfg.train.max_length - 1, s.trust_remote_code),
    ]
    if teacher_path is not None:
        limits.insert(
            0,
            Limit(
                "teacher.max_model_len - teacher.sampling.max_tokens",
                teacher_path,
                t.chat_template,
                t.max_model_len - t.sampling.max_tokens,
                t.trust_remote_code,
            ),
        )
    return limits
