"""Tiny teacher and student models the project builds itself (no downloads).

The demo and the tests need a real teacher that is better than a real student, on a
machine with no model hub and no GPU. Both are Llama-architecture models (so vLLM and
transformers load them like any HF folder) over a byte-level tokenizer, briefly
fine-tuned from scratch on a verifiable task: string reversal, "abcde>" -> "edcba".
The teacher has ~9x the parameters and is trained to convergence (it reverses every word);
the student is stopped early, at about two words in five, so it has some skill and a gap
to the teacher to close.

This is a fixture builder, not the training path: a plain single-process torch loop
over synthetic data is the simplest thing that produces the two folders.

Built on first use and cached under ~/.cache/plad-ray; `python -m jobs.tiny_models` builds them
(or writes a prompt set) ahead of time.
"""

import hashlib
import json
import os
import random
import shutil
import string
import tempfile
from pathlib import Path

PREFIX = "tiny:"
RECIPES = {
    # head_dim 64: vLLM's CPU attention rejects smaller heads.
    # 600 steps: a fresh 400-step build reverses only 0.81 of fresh words (a cache built by older code had
    # hidden that); 600 reverse all 64 of the build's check.
    "teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2, steps=600),
    # Partly SFT-ed: stopped at step 700 of a 3000-step schedule, mid-learning (~0.3 greedy accuracy), so
    # there is a skill to distil and the demo shows it rise (the benchmark's student is SFT-ed to convergence).
    "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, steps=700,
                    schedule_steps=3000),
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 264  # 3 special + 256 byte tokens, padded to a multiple of 8
_BUILD_VERSION = 1  # bump when the recipe or task changes, to invalidate cached builds


def reversal_example(rng: random.Random, min_len: int = 3, max_len: int = 8,
                     alphabet: str = string.ascii_lowercase) -> tuple[str, str]:
    """A prompt and its exact answer: a word of min_len-max_len letters of `alphabet`, then '>'."""
    word = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
    return f"{word}>", word[::-1]


def addition_example(rng: random.Random, digits: int = 3) -> tuple[str, str]:
    """"a+b=" and its sum, a and b below 10**digits."""
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return f"{a}+{b}=", str(a + b)


def task_example(recipe: dict, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of a recipe's task: reverse (default; `min_len`, `max_len`, `alphabet`), or
    reverse+add (half each)."""
    task = recipe.get("task", "reverse")
    if task == "reverse+add" and rng.random() < 0.5:
        return addition_example(rng, recipe.get("digits", 3))
    if task not in ("reverse", "reverse+add"):
        raise ValueError(f"unknown tiny task {task!r}: expected reverse or reverse+add")
    return reversal_example(rng, recipe.get("min_len", 3), recipe.get("max_len", 8),
                            recipe.get("alphabet", string.ascii_lowercase))


def reversal_answer(prompt: str) -> str:
    """The verifier's reference: the word before '>' reversed."""
    return prompt.rstrip(">")[::-1]


def write_prompts(path: str, num_prompts: int, seed: int = 1234) -> None:
    rng = random.Random(seed)
    examples = [reversal_example(rng) for _ in range(num_prompts)]
    lines = [json.dumps({"id": f"rev-{i:05d}", "prompt": p, "reference": a}) for i, (p, a) in enumerate(examples)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def build_tokenizer():
    """Byte-level BPE with no merges: every UTF-8 byte is one token, nothing is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def is_tiny(spec: str) -> bool:
    return spec.startswith(PREFIX)


def cache_dir() -> Path:
    return Path(os.environ.get("PLAD_RAY_CACHE", Path.home() / ".cache" / "plad-ray")) / "tiny"


def materialize(spec: str, log=print) -> str:
    """The folder of a tiny model spec ("tiny:teacher" / "tiny:student"), built once and cached."""
    role = spec[len(PREFIX):]
    if role not in RECIPES:
        from plad_ray.errors import ConfigError

        raise ConfigError(f"model {spec!r}: unknown tiny model; use one of {', '.join(PREFIX + r for r in RECIPES)}")
    recipe = {**RECIPES[role], "version": _BUILD_VERSION}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / f"{role}-{digest}"
    if (target / "model.safetensors").is_file():
        return str(target)
    log(f"[plad-ray] building tiny {role} model into {target} (once; about a minute on 2 CPU cores)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{role}-", dir=target.parent))
    try:
        accuracy = build(RECIPES[role], tmp, seed=0)
        (tmp / "plad_ray_tiny.json").write_text(json.dumps({"role": role, "recipe": recipe, "accuracy": accuracy}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[plad-ray] tiny {role}: greedy reversal accuracy {accuracy:.2f}")
    return str(target)


def build(recipe: dict, out: Path, seed: int, on_step=None) -> float:
    """Train a model of `recipe` (sizes, steps, task) into folder `out`; its greedy accuracy.

    `on_step(step, model, tokenizer)`, if given, is called after every optimizer step (e.g. to
    record an accuracy curve that shows the model has converged).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    heads = recipe["num_attention_heads"]
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    model = LlamaForCausalLM(config)
    _fit(model, tokenizer, recipe, seed=seed, on_step=on_step)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return greedy_accuracy(model, tokenizer, recipe, num=64, seed=seed + 1)


def _fit(model, tokenizer, recipe: dict, seed: int, batch_size: int = 64, on_step=None) -> None:
    """Supervised fine-tuning on the recipe's task: cross-entropy on answer + EOS tokens only,
    `steps` steps of a one-cycle schedule at peak learning rate `lr` planned for `schedule_steps`
    (default `steps`: trained to the end; more: stopped part-way, mid-learning)."""
    import torch

    rng = random.Random(seed)
    steps, lr = recipe["steps"], recipe.get("lr", 3e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=recipe.get("schedule_steps", steps),
                                                   pct_start=0.1)
    model.train()
    for step in range(1, steps + 1):
        rows = []
        for _ in range(batch_size):
            prompt, answer = task_example(recipe, rng)
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
            rows.append((p + a, [-100] * len(p) + a))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        loss = model(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, model, tokenizer)
            model.train()
    model.eval()


def greedy_accuracy(model, tokenizer, recipe: dict, num: int, seed: int) -> float:
    """Share of `num` fresh task examples the model answers exactly, greedy (HF generate)."""
    import torch

    rng = random.Random(seed)
    correct = 0
    with torch.no_grad():
        for _ in range(num):
            prompt, answer = task_example(recipe, rng)
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            out = model.generate(ids, max_new_tokens=len(answer) + 4, do_sample=False, pad_token_id=PAD_ID)
            correct += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == answer
    return correct / num
