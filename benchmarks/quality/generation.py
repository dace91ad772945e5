"""The benchmark's evaluator: batched transformers generation of a tiny model, greedy and sampled.

The benchmark evaluates ~40 trained students. The engine's evaluate stage (vLLM) computes the
same figures, but starts a vLLM engine per model (~25-40 s each here, more than the training
itself); batched `generate` of a 0.1M-parameter model takes seconds and is one evaluator for
every method. Greedy and T=1 samples, each with its mean token log-prob (EOS included, as the
engine's stage counts it).
"""

import threading

# One evaluation at a time: transformers' from_pretrained is not thread-safe (it sets process-wide
# defaults while it builds a model: two threads loading at once reported tied lm_head weights as
# missing), and sampling draws from torch's one global generator, seeded per model here.
_TURN = threading.Lock()


def generate(
    model_path: str, prompts: list[str], num_samples: int, max_new_tokens: int, seed: int, batch_size: int = 256
) -> list[dict]:
    """Per prompt: {text, mean_logprob, samples: [{text, mean_logprob}] * num_samples}."""
    with _TURN:
        return _generate(model_path, prompts, num_samples, max_new_tokens, seed, batch_size)


def _generate(
    model_path: str, prompts: list[str], num_samples: int, max_new_tokens: int, seed: int, batch_size: int
) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    if (
        model.config.tie_word_embeddings
        and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ):
        raise RuntimeError(f"{model_path}: lm_head is not tied to the embeddings after loading")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        greedy = _run(model, enc, eos, pad, max_new_tokens, do_sample=False, n=1)
        sampled = _run(model, enc, eos, pad, max_new_tokens, do_sample=True, n=num_samples) if num_samples else []
        for i in range(len(chunk)):
            text, logp = greedy[i]
            out.append(
                {
                    "text": tokenizer.decode(text, skip_special_tokens=True),
                    "mean_logprob": logp,
                    "samples": [
                        {"text": tokenizer.decode(t, skip_special_tokens=True), "mean_logprob": lp}
                        for t, lp in sampled[i * num_samples : (i + 1) * num_samples]
                    ],
                }
            )
    return out


def _run(model, enc, eos: int, pad: int, max_new_tokens: int, do_sample: bool, n: int) -> list[tuple[list, float]]:
    import torch

    with torch.no_grad():
        res = model.generate(
            **enc,
            do_sample=do_sample,
            temperature=1.0 if do_sample else None,
            num_return_sequences=n,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            output_scores=True,
            return_dict_in_generate=True,
        )
        # Log-softmax of the raw logits (T = 1, no top-p): the model's own log-prob of each generated token.
        logps = model.compute_transition_scores(res.sequences, res.scores, normalize_logits=True)
    new = res.sequences[:, enc["input_ids"].shape[1] :]
    rows = []
    for ids, lp in zip(new.tolist(), logps.tolist()):
        end = ids.index(eos) + 1 if eos in ids else len(ids)  # through the first EOS, which counts
        rows.append((ids[:end], sum(lp[:end]) / max(end, 1)))
    return rows
