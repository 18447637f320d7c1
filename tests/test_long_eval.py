"""The long-context instrument (issue 19, part 1): Wilson intervals, long-context perplexity scored past
score_from, the KV byte fraction at the scored length, and teacher-forced passkey retrieval.

The stub LM below is a bigram model: the logits at a position are a fixed (seeded) row of a table
indexed by the token at that position, so every expected NLL is computed here by hand from the table,
independently of the code under test. It also checks that calls arrive contiguously through its cache.
"""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from shrinkrt.evaluate.memory import fp16_full_kv_bytes
from shrinkrt.evaluate.passkey import Trial, build_prompt, key_completion, retrieval, retrieval_trials
from shrinkrt.evaluate.perplexity import long_perplexity
from shrinkrt.evaluate.stats import wilson_interval


class BigramLM:
    def __init__(self, vocab: int, seed: int = 0, fixed_bytes: int = 100, bytes_per_token: int = 7):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g) * 2
        self.args = SimpleNamespace(n_layers=1, kv_dim=4, max_seq_len=1 << 16)
        self.embed_tokens = SimpleNamespace(weight=torch.zeros(1))
        self.fixed_bytes, self.bytes_per_token = fixed_bytes, bytes_per_token
        self.length, self.capacity, self.calls = 0, 0, []

    def setup_caches(self, batch, max_seq_len):
        self.length, self.capacity = 0, max_seq_len

    def clear_caches(self):
        self.length, self.capacity = 0, 0

    def cache_length(self):
        return self.length

    def cache_nbytes(self):  # a bi-branch-like cache: a fixed part plus a per-token part
        return self.fixed_bytes + self.bytes_per_token * self.length if self.length else 0

    def __call__(self, tokens, start=0, last_only=False):
        T = tokens.shape[1]
        assert start == self.length and start + T <= self.capacity, (start, T, self.length, self.capacity)
        self.length += T
        self.calls.append((start, T, last_only))
        out = self.table[tokens]
        return out[:, -1:] if last_only else out


def bigram_nll(table: list[list[float]], prev: int, nxt: int) -> float:
    row = table[prev]
    m = max(row)
    return -(row[nxt] - m - math.log(sum(math.exp(x - m) for x in row)))


# ---------------------------------------------------------------- Wilson interval
@pytest.mark.parametrize("k, n, lo, hi", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (10, 10, 0.7225, 1.0), (0, 10, 0.0, 0.2775)])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_wilson_interval_is_symmetric_and_rejects_bad_counts():
    lo, hi = wilson_interval(7, 20)
    assert (1 - hi, 1 - lo) == pytest.approx(wilson_interval(13, 20))
    assert lo < 7 / 20 < hi
    for k, n in [(3, 2), (-1, 5), (0, 0)]:
        with pytest.raises(ValueError):
            wilson_interval(k, n)


# ---------------------------------------------------------------- long-context perplexity
def test_long_perplexity_scores_only_positions_past_score_from():
    rng = random.Random(1)
    V, context, score_from, n_seg = 23, 1300, 1024, 2
    tokens = [rng.randrange(V) for _ in range(n_seg * context + 57)]  # a partial third segment: dropped
    lm = BigramLM(V)
    r = long_perplexity(lm, tokens, context=context, score_from=score_from, chunk=100, progress=False)
    table = lm.table.tolist()
    expected = [bigram_nll(table, tokens[s * context + t - 1], tokens[s * context + t])
                for s in range(n_seg) for t in range(score_from, context)]
    assert r["segments"] == n_seg and r["scored_tokens"] == len(expected) == n_seg * (context - score_from)
    assert r["nll_per_token"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(sum(expected) / len(expected)), rel=1e-6)
    # every segment: one prefill of the unscored prefix (last row only), then chunks to the segment's end
    per_seg = [(0, score_from, True)] + [(a, min(100, context - a), False) for a in range(score_from, context, 100)]
    assert lm.calls == per_seg * n_seg
    # the byte fraction is measured where the cache holds the whole segment, and after the prefix
    assert r["kv_bytes_at"] == {str(score_from): 100 + 7 * score_from, str(context): 100 + 7 * context}
    assert r["kv_bytes_fraction"] == pytest.approx((100 + 7 * context) / fp16_full_kv_bytes(lm.args, context))
    assert r["kv_bytes_fraction_at_score_from"] == pytest.approx((100 + 7 * score_from) / (16 * score_from))


def test_long_perplexity_uses_the_whole_text_when_shorter_than_a_segment():
    rng = random.Random(2)
    tokens = [rng.randrange(11) for _ in range(1500)]
    lm = BigramLM(11, seed=3)
    r = long_perplexity(lm, tokens, context=4096, score_from=1024, chunk=1024, progress=False)
    table = lm.table.tolist()
    expected = [bigram_nll(table, tokens[t - 1], tokens[t]) for t in range(1024, 1500)]
    assert (r["context"], r["segments"], r["scored_tokens"]) == (1500, 1, 476)
    assert r["nll_per_token"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    with pytest.raises(ValueError, match="score_from"):
        long_perplexity(lm, tokens[:1024], context=4096, score_from=1024, progress=False)


def tiny_model(tiny_dir):
    from shrinkrt.runtime.loader import load

    return load(str(tiny_dir), progress=False).model


def test_long_perplexity_on_a_real_model_equals_one_pass(tiny_dir):
    """Chunked through the cache = one causal pass over the segment, scored on the same targets; a
    sinks+window cache holds (sinks + window) FP16 tokens: its fraction is exactly that share."""
    import torch.nn.functional as F

    from shrinkrt.runtime.kv_baselines import apply_sink_window

    model = tiny_model(tiny_dir)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 97, (256,), generator=g).tolist()
    for sinks_window in (None, (4, 16)):
        if sinks_window:
            apply_sink_window(model, *sinks_window)
        r = long_perplexity(model, tokens, context=128, score_from=40, chunk=32, progress=False)
        want = 0.0
        with torch.inference_mode():
            for s in range(2):
                seg = torch.tensor([tokens[s * 128:(s + 1) * 128]])
                model.setup_caches(1, 128)  # one call over the whole segment through the same cache type
                logits = model(seg, 0)[0]
                want += F.cross_entropy(logits[39:127], seg[0, 40:], reduction="sum").item()
        model.clear_caches()
        assert r["scored_tokens"] == 2 * 88
        assert r["nll_per_token"] == pytest.approx(want / (2 * 88), rel=1e-5, abs=1e-6)
        if sinks_window:
            assert r["kv_bytes_fraction"] == pytest.approx(20 / 128)
            assert r["kv_bytes_fraction_at_score_from"] == pytest.approx(20 / 40)
            assert r["perplexity"] != pytest.approx(full_ppl, rel=1e-3)  # the window does cut the past
        else:  # the tiny model's full cache is FP32: twice the FP16 reference
            assert r["kv_bytes_fraction"] == pytest.approx(2.0)
            full_ppl = r["perplexity"]


# ---------------------------------------------------------------- teacher-forced passkey retrieval
class CharTokenizer:
    """One token per ASCII character (no specials): the key's digits are single tokens after a ' '."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_retrieval_key_nll_and_greedy_correctness_by_hand():
    tok = CharTokenizer()
    lm = BigramLM(128, seed=5)
    # Make greedy decoding after "...is" spell " 12345": a large logit on each step of that chain.
    chain = " 12345"
    lm.table[ord("s"), ord(" ")] = 40.0
    for a, b in zip(chain, chain[1:]):
        lm.table[ord(a), ord(b)] = 40.0
    trials = [Trial(500, 0.5, "12345"), Trial(500, 0.1, "12346"), Trial(800, 0.9, "71345")]
    r = retrieval(lm, tok, trials, progress=False)
    table = lm.table.tolist()
    for t, row in zip(trials, r["trials"]):
        prompt = build_prompt(tok, t)
        assert prompt[-2:] == [ord("i"), ord("s")] and row["prompt_tokens"] == len(prompt) <= t.length
        answer = " " + t.key
        digit_nll = [bigram_nll(table, ord(answer[i - 1]), ord(answer[i])) for i in range(1, len(answer))]
        assert row["key_tokens"] == 5
        assert row["key_nll"] == pytest.approx(sum(digit_nll) / 5, rel=1e-5)
        # one pass: the prompt as a prefill, then the answer but its last token
        assert row["stored_tokens"] == len(prompt) + 5
    assert [row["correct"] for row in r["trials"]] == [True, False, False]
    # greedy leaves " 12346" at its '6' (answer index 5) and " 71345" at its '7' (index 1)
    assert [row["first_miss"] for row in r["trials"]] == [None, 5, 1]
    assert r["accuracy"] == pytest.approx(1 / 3) and r["ci95"] == pytest.approx(list(wilson_interval(1, 3)))
    assert r["key_nll"] == pytest.approx(sum(row["key_nll"] for row in r["trials"]) / 3)
    assert r["by_length"]["500"]["n"] == 2 and r["by_length"]["800"]["accuracy"] == 0.0
    assert r["by_length"]["500"]["ci95"] == pytest.approx(list(wilson_interval(1, 2)))
    assert r["trials"][0]["key_nll"] < 1e-6 < r["trials"][1]["key_nll"]  # the chain's key is near-certain


def test_key_completion_skips_whitespace_tokens_of_the_embedded_tokenizer():
    from shrinkrt.runtime.loader import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir(None, progress=False))
    ids, scored = key_completion(tok, "40213")
    assert tok.decode(ids) == " 40213"
    # SmolLM2 writes the space alone and then one token per digit: five scored tokens after it
    assert len(ids) == 6 and scored == [False] + [True] * 5


def test_retrieval_trials_cover_depths_and_are_seeded():
    t = retrieval_trials((1024, 2048, 3072, 4096), per_length=20, seed=7)
    assert len(t) == 80 and {x.length for x in t} == {1024, 2048, 3072, 4096}
    depths = [x.depth for x in t if x.length == 2048]
    assert depths == pytest.approx([(i + 0.5) / 20 for i in range(20)])
    assert [x.key for x in t] == [x.key for x in retrieval_trials(per_length=20, seed=7)]
    assert [x.key for x in t] != [x.key for x in retrieval_trials(per_length=20, seed=8)]
    assert all(len(x.key) == 5 and x.key.isdigit() for x in t)
