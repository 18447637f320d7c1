"""The description of an exported graph's inputs and outputs, and of how its caches are kept.

export/llama.py derives it from the model (ModelArgs + each layer's attention: full-precision or
CSKV with its window, ranks and bits), declares the graph's inputs and outputs from it, and
export/artifact.py writes it into export.json ("io"). The backends (ONNX Runtime, TensorRT) and the
engine build read it back: buffer shapes, dtypes and how each output updates its buffer come from
here, never from parsing tensor names or guessing which dimension is the batch.

Dimensions are ints or one of the symbols BATCH, CAPACITY (cache rows, chosen by the caller at
setup) and SEQ (this call's tokens). Updates:
- "rows": the graph returns this call's rows (SEQ in place of CAPACITY); the caller writes them at
  `past_length` along `token_axis`.
- "ring": the graph returns the whole buffer (the CSKV window ring), copied over it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from shrinkrt.errors import ShrinkError

BATCH, CAPACITY, SEQ = "batch", "capacity", "seq"
DTYPES = ("float32", "float16", "int8", "int64")
ROLES = ("key", "value", "window_key", "window_value", "features_key", "features_value", "scales_key",
         "scales_value")
UPDATES = ("rows", "ring")
VERSION = 1


@dataclass(frozen=True)
class CacheTensor:
    layer: int
    role: str          # one of ROLES
    input: str         # graph input holding the stored state
    output: str        # graph output: this call's rows ("rows") or the whole buffer ("ring")
    dtype: str         # one of DTYPES
    shape: tuple       # of the input buffer: ints and BATCH / CAPACITY
    token_axis: int    # the axis along which tokens are stored
    update: str        # one of UPDATES

    def buffer_shape(self, batch: int, capacity: int) -> list[int]:
        return [batch if d == BATCH else capacity if d == CAPACITY else d for d in self.shape]

    def output_shape(self) -> list:
        return [SEQ if d == CAPACITY else d for d in self.shape] if self.update == "rows" else list(self.shape)

    def held_rows(self, length: int) -> int:
        """Token rows of the buffer that hold data when `length` tokens are stored."""
        return length if self.update == "rows" else min(length, self.shape[self.token_axis])


@dataclass(frozen=True)
class GraphIO:
    caches: tuple            # CacheTensor per cache buffer, in layer order
    input_ids: str = "input_ids"
    past_length: str = "past_length"
    logits: str = "logits"
    version: int = VERSION

    def to_json(self) -> dict:
        d = asdict(self)
        d["caches"] = [{**c, "shape": list(c["shape"])} for c in d["caches"]]
        return d

    @classmethod
    def from_json(cls, d, where: str = "export.json") -> "GraphIO":
        """Read back and check (one line naming what is wrong, never a crash later)."""
        if not isinstance(d, dict) or d.get("version") != VERSION or not isinstance(d.get("caches"), list):
            raise ShrinkError(f"{where}: 'io' is missing or not version {VERSION} (export again with this ShrinkRT)")
        caches = []
        for i, c in enumerate(d["caches"]):
            try:
                t = CacheTensor(**{**c, "shape": tuple(c["shape"])})
            except (TypeError, KeyError) as e:
                raise ShrinkError(f"{where}: io cache {i} is malformed ({e})") from None
            ok_dims = all(x in (BATCH, CAPACITY) or (isinstance(x, int) and x > 0) for x in t.shape)
            if (t.role not in ROLES or t.dtype not in DTYPES or t.update not in UPDATES or not ok_dims
                    or not 0 <= t.token_axis < len(t.shape)
                    or (t.update == "rows") != (t.shape[t.token_axis] == CAPACITY)):
                raise ShrinkError(f"{where}: io cache {i} ({c.get('input')}) is not a valid cache tensor")
            caches.append(t)
        names = [c.input for c in caches] + [c.output for c in caches]
        if len(set(names)) != len(names):
            raise ShrinkError(f"{where}: io names a cache tensor twice")
        return cls(tuple(caches), d.get("input_ids", "input_ids"), d.get("past_length", "past_length"),
                   d.get("logits", "logits"))

    def by_input(self) -> dict[str, CacheTensor]:
        return {c.input: c for c in self.caches}

    def by_output(self) -> dict[str, CacheTensor]:
        return {c.output: c for c in self.caches}
