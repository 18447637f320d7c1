"""An exported ShrinkRT model run by ONNX Runtime, behind the reference runtime's model interface
(setup_caches / forward(tokens, start, last_only) / cache_length / cache_nbytes / clear_caches), so
generation, evaluation and profiling run unchanged on either backend.

Caches: every cache tensor of the export's graph description (export.json "io") gets one buffer of the capacity asked for
at setup_caches, allocated once and bound to the session by IO binding as an OrtValue over the same
memory (no copy, no per-step reallocation). The graph returns this call's rows: each such output is
bound to the buffer's own slice at the call's positions where that slice is contiguous (batch 1), so
ONNX Runtime writes the rows in place (they never overlap the rows the call reads); otherwise they
are copied in. The CSKV window ring comes back whole, into a second buffer of its shape, and the two
swap roles each call. The logits go to one preallocated buffer. A decode step copies no cache byte
and creates no output array. The shrinkrt ops run the CPU library's kernels when it is built (runtime/ort_ops.py),
else their reference bodies.

`run` is the numpy core (token ids in, logits out) and needs neither torch nor transformers: a deployment
(and the latency benchmark's process, whose peak RSS is reported) loads ONNX Runtime and numpy only.
`forward` wraps it in torch tensors for the shared model interface (generation, evaluation, profiling).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shrinkrt.errors import ShrinkError
from shrinkrt.runtime.config import ModelArgs
from shrinkrt.runtime.exported import ExportedCaches
from shrinkrt.runtime import ort_ops
from shrinkrt.runtime.graph_io import GraphIO


def session(path: Path, threads: int = 0, providers: list[str] | None = None, profile_prefix: str | None = None,
            ops_library: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if ops_library is not None:
        ort_ops.register(opts, ops_library)
    if profile_prefix:  # ONNX Runtime's per-node trace (benchmarks/latency.py counts nodes per step with it)
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


class OrtModel(ExportedCaches):
    def __init__(self, export_dir: Path, threads: int = 0, providers: list[str] | None = None,
                 profile_prefix: str | None = None, ops_library: str | Path | None = "auto"):
        """ops_library: 'auto' (the built CPU library if present), 'off' (reference bodies) or a path;
        the one taken is self.ops_library (None: bodies)."""
        export_dir = Path(export_dir)
        self.ops_library = ort_ops.resolve(ops_library)
        meta = json.loads((export_dir / "export.json").read_text())
        self.meta = meta
        self.args = ModelArgs(**meta["model_args"])
        try:
            self.sess = session(export_dir / "model.onnx", threads, providers, profile_prefix, self.ops_library)
        except ShrinkError:
            raise
        except Exception as e:  # ORT's own errors (invalid protobuf, unknown op, ...): one line naming the file
            raise ShrinkError(f"{export_dir / 'model.onnx'}: ONNX Runtime cannot load it ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or ['?'])[0][:300]})") from None
        self.io = GraphIO.from_json(meta.get("io"), str(export_dir / "export.json"))
        graph_inputs = {i.name for i in self.sess.get_inputs()}
        missing = [c.input for c in self.io.caches if c.input not in graph_inputs]
        if missing:
            raise ShrinkError(f"{export_dir / 'model.onnx'} lacks the cache input {missing[0]} that export.json describes")
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.cache_of_output = {c.output: c for c in self.io.caches}
        self.buffers: dict[str, np.ndarray] = {}
        self.length = 0
        self.capacity = 0

    def setup_caches(self, batch: int, max_seq_len: int, dtype=None) -> None:
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} tokens exceeds the model's context {self.args.max_seq_len}")
        import onnxruntime as ort

        self.buffers, self.bound, self.spare = {}, {}, {}
        for c in self.io.caches:
            buf = np.zeros(c.buffer_shape(batch, max_seq_len), np.dtype(c.dtype))
            self.buffers[c.input] = buf
            self.bound[c.input] = ort.OrtValue.ortvalue_from_numpy(buf)  # shares the buffer's memory
            if c.update == "ring":  # the ring's next state is written here, then the two swap
                other = np.zeros_like(buf)
                self.spare[c.input] = (other, ort.OrtValue.ortvalue_from_numpy(other))
        self.binding = self.sess.io_binding()
        for name, v in self.bound.items():
            self.binding.bind_ortvalue_input(name, v)
        shape = next(o.shape for o in self.sess.get_outputs() if o.name == self.io.logits)
        if len(shape) == 3 and shape[1] == 1 and isinstance(shape[2], int):  # (B, 1, vocab) float32: preallocated
            self.logits_buf = np.zeros((batch, 1, shape[2]), np.float32)
            self.logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits_buf)
        else:
            self.logits_buf = None
        self.length, self.capacity, self.batch = 0, max_seq_len, batch
        # rows written in place: the buffer's address, bytes per token and the rows' shape with T = 1; a
        # call binds base + start * stride by pointer (no OrtValue built per output per step: 1.7 ms of
        # Python per decode step with 120 cache outputs)
        self.row_targets = {}
        for c in self.io.caches:
            buf = self.buffers[c.input]
            if c.update != "ring" and int(np.prod(buf.shape[:c.token_axis])) == 1:  # batch 1: a contiguous slice
                shape = list(buf.shape)
                shape[c.token_axis] = 1
                self.row_targets[c.output] = (buf.ctypes.data, buf.strides[c.token_axis], buf.dtype.type, shape,
                                              c.token_axis)

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    def forward(self, tokens, start: int = 0, last_only: bool = True):
        """`run` on a torch tensor of token ids, (B, T): the logits as a torch tensor (B, 1, vocab)."""
        import torch

        return torch.from_numpy(self.run(tokens.cpu().numpy(), start))

    def run(self, tokens: np.ndarray, start: int = 0) -> np.ndarray:
        """Logits of the last position, (B, 1, vocab) float32 (the graph computes only that row), for token
        ids (B, T) at positions start..start+T-1; a new array the next call does not overwrite."""
        T = tokens.shape[1]
        self.check_call(start, T)
        binding = self.binding
        binding.bind_cpu_input(self.io.input_ids, np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input(self.io.past_length, np.array([start], np.int64))
        binding.clear_binding_outputs()  # outputs are this call's rows: their shapes follow T
        copied = []  # outputs ONNX Runtime allocates (then copied in)
        for name in self.outputs:
            c = self.cache_of_output.get(name)
            if name == self.io.logits and self.logits_buf is not None and self.logits_buf.shape[0] == tokens.shape[0]:
                binding.bind_ortvalue_output(name, self.logits_value)
            elif c is not None and c.update == "ring":
                binding.bind_ortvalue_output(name, self.spare[c.input][1])
            elif c is not None and (target := self.row_targets.get(name)) is not None:
                base, stride, dtype, shape, axis = target
                shape[axis] = T  # rows start..start+T-1 fit: check_call bounds start + T by the capacity
                binding.bind_output(name, "cpu", 0, dtype, shape, base + start * stride)
            else:
                binding.bind_output(name, "cpu")
                copied.append(name)
        self.sess.run_with_iobinding(binding)
        for c in self.io.caches:  # the ring just written becomes the input of the next call
            if c.update == "ring":
                (new, new_value), old = self.spare[c.input], (self.buffers[c.input], self.bound[c.input])
                self.buffers[c.input], self.bound[c.input], self.spare[c.input] = new, new_value, old
                binding.bind_ortvalue_input(c.input, new_value)
        if copied:
            values = dict(zip(self.outputs, binding.get_outputs()))
            outs = {n: values[n].numpy() for n in copied}
            for c in self.io.caches:
                if c.output in outs:
                    self.buffers[c.input][(slice(None),) * c.token_axis + (slice(start, start + T),)] = outs[c.output]
        self.length = start + T
        if copied and self.io.logits in outs:
            return outs[self.io.logits]
        return self.logits_buf.copy()
