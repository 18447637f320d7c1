"""Passkey retrieval: a 5-digit key hidden at a given depth of repetitive filler text.

The prompt is the one of Mohtashami & Jaggi (2023, "Landmark Attention") as plain text ending in
"The pass key is"; a trial passes when the first 5-digit number the model continues with (greedy)
is the key. Plain text, not the chat template: on SmolLM2-135M-Instruct the chat form retrieved
1 of 6 keys at 2k/3k where the plain form retrieved 4 of 6 (same keys).
Keys come from a seeded RNG, so the set of trials is fixed for a given seed.

`retrieval` is the instrument `shrinkrt eval` reports: per trial one teacher-forced pass over the
prompt followed by the true answer (" " + key) gives both the key's NLL and greedy correctness (see
its docstring), with a Wilson 95% interval on the accuracy.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shrinkrt.runtime.generate import generate

from .stats import wilson_interval

INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class Trial:
    length: int  # target prompt length in tokens
    depth: float  # needle position as a fraction of the filler
    key: str


def trials(lengths=(1024, 2048, 3072), depths=(0.1, 0.5, 0.9), per_cell: int = 1, seed: int = 0) -> list[Trial]:
    rng = random.Random(seed)
    return [Trial(n, d, f"{rng.randrange(10000, 100000)}") for n in lengths for d in depths for _ in range(per_cell)]


def build_prompt(tokenizer, trial: Trial) -> list[int]:
    """Chat prompt of about trial.length tokens with the needle at trial.depth of the filler."""
    def prompt(n_filler: int) -> list[int]:
        at = round(n_filler * trial.depth)
        text = INTRO + FILLER * at + NEEDLE.format(key=trial.key) + FILLER * (n_filler - at) + QUESTION
        return tokenizer.encode(text, add_special_tokens=True)

    per = len(tokenizer.encode(FILLER, add_special_tokens=False))
    n = max(1, trial.length // per)
    while n > 1 and len(prompt(n)) > trial.length:
        n -= 1
    return prompt(n)


def score(text: str, key: str) -> bool:
    m = re.search(r"\d{5}", text.replace(",", ""))
    return bool(m) and m.group(0) == key


def passkey(model, tokenizer, trial_list: list[Trial], progress: bool = True, prefill_chunk: int = 0) -> dict:
    rows = []
    for t in tqdm(trial_list, desc="passkey", disable=not progress, leave=False):
        ids = build_prompt(tokenizer, t)
        g = generate(model, tokenizer, ids, max_new_tokens=8, prefill_chunk=prefill_chunk)
        rows.append({"length": t.length, "prompt_tokens": len(ids), "depth": t.depth, "key": t.key,
                     "stored_tokens": model.cache_length(), "cache_bytes": g.cache_bytes,
                     "decode_step_median_s": sorted(g.step_s)[len(g.step_s) // 2] if g.step_s else 0.0,
                     "answer": g.text.strip(), "correct": score(g.text, t.key)})
    model.clear_caches()
    acc = sum(r["correct"] for r in rows) / len(rows)
    return {"passkey_accuracy": acc, "trials": rows}


def retrieval_trials(lengths=(1024, 2048, 3072, 4096), per_length: int = 20, seed: int = 0) -> list[Trial]:
    """per_length trials at each length, the needle at evenly spaced depths (i + 0.5) / per_length,
    so every length covers the whole prompt rather than three fixed points."""
    rng = random.Random(seed)
    return [Trial(n, (i + 0.5) / per_length, f"{rng.randrange(10000, 100000)}")
            for n in lengths for i in range(per_length)]


def key_completion(tokenizer, key: str) -> tuple[list[int], list[bool]]:
    """The answer's tokens (" " + key, as the prompt's "The pass key is" is continued) and which of
    them carry the key: tokens that decode to whitespace only (SmolLM2's lone " ") are conditioned
    on, not scored, so the NLL is per key token whatever the tokenizer does with the space."""
    ids = tokenizer.encode(" " + key, add_special_tokens=False)
    scored = [bool(tokenizer.decode([i]).strip()) for i in ids]
    if not any(scored):
        raise ValueError(f"the tokenizer encodes the key {key!r} to whitespace only")
    return ids, scored


@torch.inference_mode()
def retrieval(model, tokenizer, trial_list: list[Trial], progress: bool = True) -> dict:
    """Teacher-forced passkey retrieval: per trial, the prompt as one prefill (its last row predicts
    the answer's first token), then the answer's tokens but the last at the next positions (each row
    predicts the following answer token) -- one pass over prompt + answer, as decoding would feed it.

    key_nll: mean NLL of the key's tokens given the prompt and the true earlier digits (continuous:
    it moves before the accuracy flips). correct: the argmax is the true token at every answer
    position. Greedy decoding takes the argmax given the tokens so far, so this is exactly "greedy
    decoding starts with ' ' + key" without a generation; it is stricter than `score` on generated
    text, which also passes an answer that reaches the key by another path (" 12,345", ": 12345").
    """
    device = model.embed_tokens.weight.device
    rows = []
    for t in tqdm(trial_list, desc="passkey", disable=not progress, leave=False):
        ids = build_prompt(tokenizer, t)
        answer, scored = key_completion(tokenizer, t.key)
        n = len(ids)
        model.setup_caches(1, n + len(answer) - 1)
        logits = [model(torch.tensor([ids], device=device), 0, last_only=True)[0]]
        if len(answer) > 1:
            logits.append(model(torch.tensor([answer[:-1]], device=device), n)[0])
        logits = torch.cat(logits)  # row i predicts answer[i]
        target = torch.tensor(answer, device=device)
        nll = F.cross_entropy(logits, target, reduction="none")
        mask = torch.tensor(scored, device=device)
        miss = (logits.argmax(-1) != target).nonzero()
        rows.append({"length": t.length, "prompt_tokens": n, "depth": t.depth, "key": t.key,
                     "key_tokens": int(mask.sum()), "key_nll": nll[mask].mean().item(),
                     "correct": len(miss) == 0,
                     # where greedy decoding would leave the answer (0: its leading space, e.g. " the pass key")
                     "first_miss": int(miss[0, 0]) if len(miss) else None,
                     "stored_tokens": model.cache_length(), "cache_bytes": model.cache_nbytes()})
    model.clear_caches()
    return {"method": "teacher-forced", **summary(rows),
            "by_length": {str(n): summary([r for r in rows if r["length"] == n])
                          for n in sorted({r["length"] for r in rows})},
            "trials": rows}


def summary(rows: list[dict]) -> dict:
    """Accuracy with its Wilson 95% interval and the mean key NLL per key token over the trials."""
    k = sum(r["correct"] for r in rows)
    tokens = sum(r["key_tokens"] for r in rows)
    return {"accuracy": k / len(rows), "ci95": list(wilson_interval(k, len(rows))), "n": len(rows),
            "key_nll": sum(r["key_nll"] * r["key_tokens"] for r in rows) / tokens}
