"""Generation over the reference runtime: prefill, decode one token at a time, sample, stream.

Generation only calls `model.setup_caches()` and `model(tokens, start)`, so compressed attention
and caches (CSKV) and quantized linears (LLM-MQ) plug in underneath without changes here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from shrinkrt.errors import ShrinkError


@dataclass
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; seed makes sampling repeatable."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ShrinkError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise ShrinkError(f"top-k must be >= 0 (got {self.top_k})")
        if not (0.0 < self.top_p <= 1.0):
            raise ShrinkError(f"top-p must be in (0, 1] (got {self.top_p})")


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from a (vocab,) float32 logits row."""
    if s.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = cum - sorted_logits.softmax(-1) >= s.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Incremental detokenisation that never prints a stop string or half a UTF-8 character."""

    def __init__(self, tokenizer, stop_strings: list[str], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stop_strings, self.on_text = tokenizer, stop_strings, on_text
        self.holdback = max((len(s) for s in stop_strings), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""

    def add(self, token: int) -> str | None:
        """Append a token; returns the stop string if the text now contains one."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop_strings:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self._emit(len(self.text))
                return stop
        safe = len(self.text) - self.holdback
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # incomplete multi-byte char
            safe -= 1
        self._emit(safe)
        return None

    def finish(self) -> None:
        self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if upto > self.emitted:
            if self.on_text:
                self.on_text(self.text[self.emitted:upto])
            self.emitted = upto


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]
    text: str
    stop_reason: str  # "eos" | "stop_string" | "max_new_tokens" | "context"
    prefill_s: float
    decode_s: float
    cache_bytes: int
    step_s: list[float] = field(default_factory=list)


@torch.inference_mode()
def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 128,
             sampling: Sampling | None = None, stop_strings: list[str] | None = None,
             eos_ids: list[int] | None = None, on_text: Callable[[str], None] | None = None,
             cache_len: int | None = None, prefill_chunk: int = 0) -> Generation:
    """Generate up to max_new_tokens after prompt_ids (batch 1). prefill_chunk > 0 feeds the prompt in
    chunks of that many tokens through the cache (the same path a long prompt takes on a device)."""
    sampling = sampling or Sampling()
    sampling.validate()
    if max_new_tokens < 1:
        raise ShrinkError(f"max new tokens must be >= 1 (got {max_new_tokens})")
    ctx = model.args.max_seq_len
    if not prompt_ids:
        raise ShrinkError("the prompt is empty")
    if len(prompt_ids) >= ctx:
        raise ShrinkError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {ctx}")
    total = min(ctx, cache_len or ctx, len(prompt_ids) + max_new_tokens)
    model.setup_caches(1, total)
    device = model.device
    eos = set(eos_ids if eos_ids is not None else model.args.eos_token_ids)
    gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
    stream = TextStream(tokenizer, stop_strings or [], on_text)

    t0 = time.perf_counter()
    prompt = torch.tensor([prompt_ids], device=device)
    chunk = prefill_chunk or len(prompt_ids)
    for start in range(0, len(prompt_ids), chunk):
        logits = model(prompt[:, start:start + chunk], start, last_only=True)
    prefill_s = time.perf_counter() - t0

    out: list[int] = []
    steps: list[float] = []
    reason = "max_new_tokens"
    pos = len(prompt_ids)
    token = sample(logits[0, -1].cpu(), sampling, gen)
    while True:
        out.append(token)
        if token in eos:
            reason = "eos"
            break
        if stream.add(token) is not None:
            reason = "stop_string"
            break
        if len(out) >= max_new_tokens:
            break
        if pos >= total:
            reason = "context"
            break
        t = time.perf_counter()
        logits = model(torch.tensor([[token]], device=device), pos)
        token = sample(logits[0, -1].cpu(), sampling, gen)
        steps.append(time.perf_counter() - t)
        pos += 1
    stream.finish()
    return Generation(len(prompt_ids), out, stream.text, reason, prefill_s, sum(steps),
                      model.cache_nbytes(), steps)


def chat_prompt(tokenizer, user: str, system: str | None = None) -> list[int]:
    """The tokenizer's own chat template with the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ShrinkError("this tokenizer has no chat template: use --raw to send the prompt as plain text")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # a broken template in the model folder (jinja syntax, raise_exception, ...)
        raise ShrinkError(f"the model's chat template fails ({type(e).__name__}: {e}): fix it or use --raw") from None
    return list(ids)
