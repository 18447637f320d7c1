"""What the runtimes of an exported graph share (ONNX Runtime, TensorRT): the cache buffers of the
graph's state inputs behind the reference model interface. The graph takes fixed-capacity caches and
returns this call's rows (export/llama.py); `store_outputs` writes them at the call's positions, and
the CSKV window ring, which comes back whole, over its buffer. Works on numpy arrays and torch tensors.
"""
from __future__ import annotations


class ExportedCaches:
    buffers: dict
    length: int
    capacity: int

    def clear_caches(self) -> None:
        self.buffers, self.length, self.capacity = {}, 0, 0

    def cache_length(self) -> int:
        return self.length

    def cache_nbytes(self) -> int:
        """Bytes held for the stored tokens: rows of capacity-sized buffers, rings up to their size."""
        total = 0
        for name, buf in self.buffers.items():
            if name.startswith(("past_key", "past_value")):
                total += buf[:, :, :1].nbytes * self.length
            elif name.startswith("win_"):
                total += buf[:, :, :1].nbytes * min(self.length, buf.shape[2])
            else:  # feature rows (and their scales)
                total += buf[:, :1].nbytes * self.length
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
        for name, rows in outs.items():
            if name == "logits":
                continue
            if name.startswith("win_"):  # win_k_out.i -> win_k.i
                self.buffers[name.replace("_out", "")][...] = rows
            elif name.startswith(("key.", "value.")):
                self.buffers["past_" + name][:, :, start:start + T] = rows
            else:  # feat_k_new.i -> feat_k.i
                self.buffers[name.replace("_new", "")][:, start:start + T] = rows
        self.length = start + T
