"""What the runtimes of an exported graph share (ONNX Runtime, TensorRT): the cache buffers of the
graph's state inputs behind the reference model interface. The graph takes fixed-capacity caches and
returns this call's rows (export/llama.py); `store_outputs` writes them at the call's positions, and
the CSKV window ring, which comes back whole, over its buffer. Which is which, and every shape, comes
from the export's graph description (runtime/graph_io.py, export.json "io"). Works on numpy arrays
and torch tensors.
"""
from __future__ import annotations

from shrinkrt.runtime.graph_io import GraphIO


class ExportedCaches:
    io: GraphIO
    buffers: dict
    length: int
    capacity: int

    def clear_caches(self) -> None:
        self.buffers, self.length, self.capacity = {}, 0, 0

    def cache_length(self) -> int:
        return self.length

    def cache_nbytes(self) -> int:
        """Bytes held for the stored tokens: the token rows of each buffer that hold data."""
        total = 0
        for c in self.io.caches:
            buf = self.buffers[c.input]
            row = buf.nbytes // buf.shape[c.token_axis]
            total += row * c.held_rows(self.length)
        return total

    def __call__(self, tokens, start: int = 0, last_only: bool = True):
        return self.forward(tokens, start, last_only)

    def check_call(self, start: int, T: int) -> None:
        if not self.capacity:
            raise ValueError("call setup_caches before running the model")
        if start != self.length:
            raise ValueError(f"the cache holds {self.length} tokens; a call at position {start} would leave a gap")
        if start + T > self.capacity:
            raise ValueError(f"positions up to {start + T} exceed the cache of {self.capacity} tokens")

    def store_outputs(self, outs: dict, start: int, T: int) -> None:
        for c in self.io.caches:
            rows, buf = outs[c.output], self.buffers[c.input]
            if c.update == "ring":
                buf[...] = rows
            else:
                buf[(slice(None),) * c.token_axis + (slice(start, start + T),)] = rows
        self.length = start + T
