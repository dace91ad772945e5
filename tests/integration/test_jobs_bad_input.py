"""Every job refuses bad input before starting an engine: one line naming the input and the fix, a
distinct exit code (2 config, 3 data), no traceback, and no output left as if complete. Everything but
the prompt rows is refused before Ray starts; the rows are read by Ray Data (ROW_CASES), the other
row messages are checked on the stage itself in test_prompt_checks.py."""

import json
import shutil

import pytest
from conftest import ROOT
from support.jobs import run_job

pytestmark = pytest.mark.integration  # jobs in subprocesses, some on a Ray cluster: seconds each
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_models):
    """A folder of bad inputs: prompt files, model folders, configs, output folders."""
    d = tmp_path_factory.mktemp("bad")
    (d / "dupes.jsonl").write_text('{"id": "x", "prompt": "abc>"}\n{"id": "x", "prompt": "cde>"}\n')
    (d / "broken.jsonl").write_text('{"prompt": "abc>"}\n{"prompt": "abc>"\n')
    (d / "long.jsonl").write_text('{"prompt": "abc>"}\n' + json.dumps({"prompt": "x" * 60 + ">"}) + "\n")
    student = tiny_models["student"]
    for name in ("bert", "notok", "pickle", "narrow"):
        shutil.copytree(student, d / name)
    # A student with fewer embedding rows (256) than the tokenizer both share has tokens (259).
    config = json.loads((d / "narrow" / "config.json").read_text())
    (d / "narrow" / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    config = json.loads((d / "bert" / "config.json").read_text())
    (d / "bert" / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / "notok" / f).unlink()
    (d / "pickle" / "model.safetensors").rename(d / "pickle" / "pytorch_model.bin")
    # A teacher whose tokenizer has as many ids as the student's, two of them swapped: one size, two vocabularies.
    shutil.copytree(tiny_models["teacher"], d / "swapped")
    tokenizer = json.loads((d / "swapped" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (d / "swapped" / "tokenizer.json").write_text(json.dumps(tokenizer))
    (d / "bad.yaml").write_text("output_dir: x\ntrain: [\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Conversational pairs (TRL's other format), which plad-ray does not read: chosen is a list of messages.
    messages = [[{"role": "assistant", "content": "cba"}]]
    pq.write_table(pa.table({"prompt": ["abc>"], "chosen": messages, "rejected": messages}), d / "chat-pairs.parquet")
    pq.write_table(pa.table({"prompt": ["abc>"], "chosen": ["cba"], "rejected": ["abc"]}), d / "pairs.parquet")
    (d / "a-file").write_text("not a folder")
    (d / "other").mkdir()
    (d / "other" / "notes.txt").write_text("someone's files")
    return d


# (job, config file or None for tiny-cpu.yaml, overrides, exit code, text in the one line)
CASES = {
    "unknown key": ("distill", None, ["train.loss.betta=1"], 2, "config key train.loss.betta: unknown key"),
    "wrong type": ("distill", None, ["train.num_workers=two"], 2, "config key train.num_workers: expected an integer"),
    "out of range": ("distill", None, ["data.heldout_fraction=1.5"], 2, "config key data.heldout_fraction: must be in"),
    "no such ZeRO stage": (
        "train",
        None,
        ["train.zero_stage=5"],
        2,
        "config key train.zero_stage: must be a DeepSpeed",
    ),
    "engine restarts < -1": (
        "generate_pairs",
        None,
        ["student.max_restarts=-2"],
        2,
        "config key student.max_restarts: must be >= 0, or -1 for no limit",
    ),
    "beta <= 0": (
        "distill",
        None,
        ["train.loss.beta=0"],
        2,
        "config key train.loss.beta: the hinge margin must be > 0",
    ),
    "TP without GPUs": (
        "generate_pairs",
        None,
        ["teacher.tensor_parallel_size=2"],
        2,
        "config key teacher.tensor_parallel_size: tensor parallelism needs GPUs",
    ),
    "offload without ZeRO": (
        "distill",
        None,
        ["train.offload_optimizer=true", "train.zero_stage=0"],
        2,
        "config key train.offload_optimizer: optimizer offload needs train.zero_stage >= 1",
    ),
    "more workers than CPUs": (
        "distill",
        None,
        ["train.num_workers=4"],
        2,
        "config key train.num_workers: 4 workers x 1 CPUs plus 1 CPU for the data",
    ),
    "too few prompts for one step": (
        "distill",
        None,
        ["data.max_prompts=2", "train.gradient_accumulation_steps=4"],
        2,
        "data.prompts {root}/configs/prompts/tiny-reverse.jsonl: gives at most 4 pairs "
        "(2 prompts x student.num_samples 2), before any is held out; one optimizer step "
        "needs 98 (train.num_workers 2 x ((train.gradient_accumulation_steps 4 - 1) x "
        "train.micro_batch_size 16 + 1)); add prompts or lower those",
    ),
    "conversational pairs": (
        "train",
        None,
        ["train.pairs={d}/chat-pairs.parquet"],
        3,
        "config key train.pairs: {d}/chat-pairs.parquet column chosen holds list<",
    ),
    "missing config": ("distill", "{d}/nope.yaml", [], 2, "config file {d}/nope.yaml: not found"),
    "malformed config": ("train", "{d}/bad.yaml", [], 2, "config file {d}/bad.yaml line 3: not valid YAML"),
    "missing prompts": (
        "distill",
        None,
        ["data.prompts={d}/missing.jsonl"],
        3,
        "prompt source {d}/missing.jsonl: not found",
    ),
    "duplicate ids": (
        "distill",
        None,
        ["data.prompts={d}/dupes.jsonl"],
        3,
        "prompt source {d}/dupes.jsonl rows 0 and 1: duplicate id 'x'",
    ),
    "malformed JSON line": (
        "distill",
        None,
        ["data.prompts={d}/broken.jsonl"],
        3,
        "prompt file {d}/broken.jsonl line 2: malformed JSON",
    ),
    "prompt over the context": (
        "distill",
        None,
        ["data.prompts={d}/long.jsonl", "data.too_long=error"],
        3,
        "prompt source {d}/long.jsonl row 1 (id p0000001): 61 prompt tokens exceed "
        "teacher.max_model_len - teacher.sampling.max_tokens = 48",
    ),
    "missing model": (
        "distill",
        None,
        ["teacher.model={d}/nowhere"],
        3,
        "config key teacher.model: model folder {d}/nowhere not found",
    ),
    "not a causal LM": (
        "distill",
        None,
        ["student.model={d}/bert"],
        3,
        "config key student.model: {d}/bert is not a causal LM (architectures: ['BertModel'])",
    ),
    "no tokenizer": (
        "distill",
        None,
        ["student.model={d}/notok"],
        3,
        "config key student.model: {d}/notok has no tokenizer files",
    ),
    "chat template missing": (
        "distill",
        None,
        ["student.chat_template=true"],
        3,
        "'s tokenizer has no chat template, but student.chat_template is on",
    ),
    "scoring k over vLLM's cap": (
        "generate_pairs",
        None,
        ["teacher.score_samples=true", "teacher.score_top_k=21"],
        2,
        "config key teacher.score_top_k: must be <= 20, the most log-probs vLLM returns per "
        "token; raise teacher.engine_kwargs.max_logprobs to score more",
    ),
    "scoring through an endpoint without log-probs": (
        "generate_pairs",
        None,
        ["teacher.score_samples=true", "teacher.model=stub-teacher", "teacher.endpoint.url={stub}"],
        2,
        "config key teacher.score_samples: teacher endpoint {stub} returns no prompt log-probs",
    ),
    "scoring across vocabularies": (
        "generate_pairs",
        None,
        ["teacher.score_samples=true", "teacher.model={d}/swapped"],
        2,
        "config key teacher.score_samples: the teacher's and the student's tokenizers map ids to different tokens",
    ),
    "teacher ids past the student's rows": (
        "generate_pairs",
        None,
        ["teacher.score_samples=true", "student.model={d}/narrow"],
        2,
        "holds 259 tokens but the student ({d}/narrow) has 256 embedding rows, so "
        "teacher token ids 256 and up have no student logit",
    ),
    "top-k loss on unscored pairs": (
        "train",
        None,
        ["train.pairs={d}/chat-pairs.parquet", "train.loss.type=onpolicy_kd"],
        2,
        "config key train.loss.type: onpolicy_kd trains on the teacher's top-k log-probs "
        "of the pairs: set teacher.score_samples=true (this run's pairs) or "
        "train.teacher_scores (beside train.pairs)",
    ),
    "missing teacher scores": (
        "train",
        None,
        ["train.pairs={d}/pairs.parquet", "train.teacher_scores={d}/nowhere", "train.loss.type=contrastive"],
        3,
        "config key train.teacher_scores: {d}/nowhere is not a finished teacher_scores folder; "
        "point it at the teacher_scores/ of the run that made train.pairs",
    ),
    "pickle weights": (
        "distill",
        None,
        ["teacher.model={d}/pickle"],
        3,
        "config key teacher.model: {d}/pickle has only pickle (.bin/.pt) weights",
    ),
    "output is a file": ("distill", None, ["output_dir={d}/a-file"], 3, "output_dir {d}/a-file: is a file"),
    "output under a file": (
        "distill",
        None,
        ["output_dir={d}/a-file/run"],
        3,
        "output_dir {d}/a-file/run: cannot be created under {d}/a-file",
    ),
    "output holds other files": (
        "distill",
        None,
        ["output_dir={d}/other"],
        3,
        "output_dir {d}/other: exists and holds something other than a plad-ray run",
    ),
}


ROW_CASES = ("duplicate ids", "malformed JSON line", "prompt over the context")  # found by Ray Data tasks


@pytest.fixture(scope="module")
def ray_cluster():
    """One Ray cluster the row cases' jobs join (cluster.address), instead of each starting its own: the rows are
    read by the same Ray Data tasks either way. The demo config's 4 logical CPUs, as its local cluster has."""
    from support.ray_head import RayHead

    cluster = RayHead(num_cpus=4)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def blackbox():
    """A completions server that ignores prompt_logprobs, as OpenAI's own API does."""
    from support.openai_stub import Stub

    stub = Stub(lambda body: (200, {"choices": [{"text": "x", "finish_reason": "length"}]}), None)
    yield stub.url
    stub.close()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, bad, blackbox, tmp_path, request):
    job, config, overrides, code, message = CASES[case]
    out = tmp_path / "run"
    env = None
    if case in ROW_CASES:
        cluster = request.getfixturevalue("ray_cluster")
        overrides, env = [*overrides, f"cluster.address={cluster.address}"], cluster.env
    sets = [o.format(d=bad, root=ROOT, stub=blackbox) for o in [f"output_dir={out}", *overrides]]
    proc = run_job(job, *sets, config=config.format(d=bad) if config else str(CONFIG), env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in lines if line.startswith("plad-ray: error: ")]
    if case in ROW_CASES:  # Ray ran (its start-up and Ray Data's log lines come first): the error is the last line
        assert errors == lines[-1:], proc.stderr[-2000:]
    else:
        assert errors == lines and len(lines) == 1, proc.stderr[-2000:]
    assert message.format(d=bad, root=ROOT, stub=blackbox) in lines[-1]
    assert "Traceback" not in proc.stderr + proc.stdout
    if case in ROW_CASES:
        assert "[generate]" not in proc.stdout  # refused before any engine started
    else:
        assert "Ray cluster" not in proc.stdout  # refused before Ray started
    assert not out.exists()
    assert not list(bad.rglob("_manifest.json")) and not list(bad.rglob("report.json"))


def test_output_of_a_different_run_is_refused_and_kept(tmp_path, tiny_models):
    out = tmp_path / "run"
    first = run_job("distill", f"output_dir={out}", flags=("--check",), config=str(CONFIG), timeout=300)
    assert first.returncode == 0 and not out.exists()  # --check writes nothing
    from plad_ray.config import load_config
    from plad_ray.outputs import prepare_output

    prepare_output(load_config(str(CONFIG), [f"output_dir={out}"]))  # a run of the shipped config
    (out / "teacher").mkdir()
    before = (out / "run.json").read_text()
    proc = run_job("distill", f"output_dir={out}", "teacher.sampling.temperature=0.5", config=str(CONFIG), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"plad-ray: error: output_dir {out}: its teacher outputs were made with a different config "
        "(teacher.sampling.temperature: 0.0 -> 0.5); use a new output_dir, or pass --overwrite to replace them"
    )
    assert (out / "run.json").read_text() == before and (out / "teacher").is_dir()


def test_debug_shows_the_traceback(tmp_path):
    debug = run_job("train", flags=("--debug",), config=str(tmp_path / "nope.yaml"), timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("plad-ray: error: config file")


def test_train_without_pairs_says_what_to_run_first(tmp_path):
    out = tmp_path / "run"
    proc = run_job("train", f"output_dir={out}", config=str(CONFIG), timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == (
        f"plad-ray: error: pairs {out}/pairs: missing or incomplete; run jobs.generate_pairs first, "
        "or point train.pairs at a pairs dataset"
    )


def test_the_step_budget_counts_parquet_rows_from_metadata(tmp_path):
    """External pairs (and Parquet prompt sources) are counted from their footers; JSON Lines by their lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from plad_ray.checks import check_step_budget
    from plad_ray.config import load_config
    from plad_ray.errors import ConfigError

    (tmp_path / "pairs").mkdir()
    for i in range(2):  # 2 files x 3 pairs
        pq.write_table(
            pa.table({"prompt": ["a>"] * 3, "chosen": ["a"] * 3, "rejected": ["b"] * 3}),
            tmp_path / "pairs" / f"part-{i}.parquet",
        )
    sets = [f"output_dir={tmp_path / 'run'}", f"train.pairs={tmp_path / 'pairs'}", "train.micro_batch_size=4"]
    check_step_budget(load_config(str(CONFIG), [*sets, "train.gradient_accumulation_steps=1"]), generation=False)
    with pytest.raises(
        ConfigError,
        match=r"train.pairs .*: gives at most 6 pairs, before any is held out; one "
        r"optimizer step needs 10 \(train.num_workers 2 x",
    ):
        check_step_budget(load_config(str(CONFIG), [*sets, "train.gradient_accumulation_steps=2"]), generation=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a>"}\n\n{"prompt": "b>"}\n')  # the blank line is no row
    with pytest.raises(ConfigError, match=r"gives at most 4 pairs \(2 prompts x student.num_samples 2\)"):
        check_step_budget(
            load_config(str(CONFIG), [f"data.prompts={prompts}", "train.gradient_accumulation_steps=2"]),
            generation=True,
        )
