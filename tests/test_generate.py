"""Generation on a tiny random model with a word-level tokenizer: greedy, sampling, stops, streaming."""
import pytest
import torch

from shrinkrt.errors import ShrinkError
from shrinkrt.runtime.generate import Sampling, TextStream, generate, sample
from shrinkrt.runtime.loader import load


@pytest.fixture
def tiny(tiny_dir):
    return load(str(tiny_dir), progress=False)


def prompt(n=6):
    return [3 + (7 * i) % 90 for i in range(n)]


def test_greedy_equals_recomputed_argmax(tiny):
    g = generate(tiny.model, tiny.tokenizer, prompt(), max_new_tokens=12, eos_ids=[])
    assert g.stop_reason == "max_new_tokens" and len(g.tokens) == 12
    seq = prompt()
    tiny.model.clear_caches()
    with torch.no_grad():
        for _ in range(12):  # no cache: the whole sequence each step
            seq.append(int(tiny.model(torch.tensor([seq]))[0, -1].argmax()))
    assert g.tokens == seq[len(prompt()):]


def test_seeded_sampling_repeats_and_seeds_differ(tiny):
    run = lambda seed: generate(tiny.model, tiny.tokenizer, prompt(), 20, Sampling(1.0, 0, 1.0, seed), eos_ids=[]).tokens
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_top_k_1_and_tiny_top_p_are_greedy(tiny):
    greedy = generate(tiny.model, tiny.tokenizer, prompt(), 10, eos_ids=[]).tokens
    assert generate(tiny.model, tiny.tokenizer, prompt(), 10, Sampling(1.5, 1, 1.0, 3), eos_ids=[]).tokens == greedy
    assert generate(tiny.model, tiny.tokenizer, prompt(), 10, Sampling(1.5, 0, 1e-6, 3), eos_ids=[]).tokens == greedy


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    seen_k = {sample(logits, Sampling(5.0, 2, 1.0), gen) for _ in range(300)}
    assert seen_k == {0, 1}
    # probabilities at T=1: .64 .24 .09 .03 .01 -> top-p 0.8 keeps the first two
    seen_p = {sample(logits, Sampling(1.0, 0, 0.8), gen) for _ in range(300)}
    assert seen_p == {0, 1}


def test_eos_stops(tiny):
    greedy = generate(tiny.model, tiny.tokenizer, prompt(), 10, eos_ids=[]).tokens
    g = generate(tiny.model, tiny.tokenizer, prompt(), 10, eos_ids=[greedy[3]])
    first = greedy.index(greedy[3])
    assert g.stop_reason == "eos" and g.tokens == greedy[:first + 1]


def test_stop_string_is_not_printed(tiny):
    greedy = generate(tiny.model, tiny.tokenizer, prompt(), 10, eos_ids=[])
    words = greedy.text.split()
    stop = " ".join(words[4:6])
    printed = []
    g = generate(tiny.model, tiny.tokenizer, prompt(), 10, stop_strings=[stop], eos_ids=[], on_text=printed.append)
    assert g.stop_reason == "stop_string"
    assert stop not in g.text and greedy.text.startswith(g.text)
    assert "".join(printed) == g.text


def test_streamed_text_equals_final_text(tiny):
    printed = []
    g = generate(tiny.model, tiny.tokenizer, prompt(), 15, eos_ids=[], on_text=printed.append)
    assert len(printed) > 1 and "".join(printed) == g.text == tiny.tokenizer.decode(g.tokens)


def test_stream_holds_back_partial_utf8():
    class Bytes:  # decodes ids as bytes, like a byte-level BPE mid-character
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    out = []
    s = TextStream(Bytes(), [], out.append)
    for b in "é!".encode():
        s.add(b)
    s.finish()
    assert out == ["é", "!"]


@pytest.mark.parametrize("bad, msg", [
    (Sampling(temperature=-1), "temperature must be >= 0"),
    (Sampling(top_k=-2), "top-k must be >= 0"),
    (Sampling(top_p=0.0), r"top-p must be in \(0, 1\]"),
    (Sampling(top_p=1.5), r"top-p must be in \(0, 1\]"),
])
def test_invalid_sampling(bad, msg):
    with pytest.raises(ShrinkError, match=msg):
        bad.validate()


def test_prompt_longer_than_context(tiny):
    with pytest.raises(ShrinkError, match="the prompt has 128 tokens; the model's context is 128"):
        generate(tiny.model, tiny.tokenizer, [5] * 128, 4)


def test_generation_stops_at_context(tiny):
    g = generate(tiny.model, tiny.tokenizer, [5] * 120, 50, eos_ids=[])
    assert g.stop_reason == "context" and len(g.tokens) == 9
    assert tiny.model.cache_length() == 128
