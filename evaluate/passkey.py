"""Passkey retrieval: a 5-digit key hidden at a given depth of repetitive filler text.

The prompt is the one of Mohtashami & Jaggi (2023, "Landmark Attention") as plain text ending in
"The pass key is"; a trial passes when the first 5-digit number the model continues with (greedy)
is the key. Plain text, not the chat template: on SmolLM2-135M-Instruct the chat form retrieved
1 of 6 keys at 2k/3k where the plain form retrieved 4 of 6 (same keys).
Keys come from a seeded RNG, so the set of trials is fixed for a given seed.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tqdm import tqdm

from shrinkrt.runtime.generate import generate

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
