"""An exported ShrinkRT model run by ONNX Runtime, behind the reference runtime's model interface
(setup_caches / forward(tokens, start, last_only) / cache_length / cache_nbytes / clear_caches), so
generation, evaluation and profiling run unchanged on either backend.

Caches: every cache tensor of the export's graph description (export.json "io") gets one buffer of the capacity asked for
at setup_caches, allocated once and bound to the session by IO binding as an OrtValue over the same
memory (no copy, no per-step reallocation). The graph returns this call's rows, which are written
into the buffers at the call's positions; the CSKV window ring comes back whole and is copied into
its buffer. The shrinkrt ops run the CPU library's kernels when it is built (runtime/ort_ops.py),
else their reference bodies.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

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
        self.device = torch.device("cpu")
        self.io = GraphIO.from_json(meta.get("io"), str(export_dir / "export.json"))
        graph_inputs = {i.name for i in self.sess.get_inputs()}
        missing = [c.input for c in self.io.caches if c.input not in graph_inputs]
        if missing:
            raise ShrinkError(f"{export_dir / 'model.onnx'} lacks the cache input {missing[0]} that export.json describes")
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.buffers: dict[str, np.ndarray] = {}
        self.length = 0
        self.capacity = 0

    def setup_caches(self, batch: int, max_seq_len: int, dtype=None) -> None:
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} tokens exceeds the model's context {self.args.max_seq_len}")
        import onnxruntime as ort

        self.buffers, self.bound = {}, {}
        for c in self.io.caches:
            buf = np.zeros(c.buffer_shape(batch, max_seq_len), np.dtype(c.dtype))
            self.buffers[c.input] = buf
            self.bound[c.input] = ort.OrtValue.ortvalue_from_numpy(buf)  # shares the buffer's memory
        self.binding = self.sess.io_binding()
        for name, v in self.bound.items():
            self.binding.bind_ortvalue_input(name, v)
        self.length, self.capacity, self.batch = 0, max_seq_len, batch

    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = True) -> torch.Tensor:
        """Logits of the last position, (B, 1, vocab) float32 (the graph computes only that row)."""
        T = tokens.shape[1]
        self.check_call(start, T)
        self.binding.bind_cpu_input(self.io.input_ids, np.ascontiguousarray(tokens.cpu().numpy().astype(np.int64)))
        self.binding.bind_cpu_input(self.io.past_length, np.array([start], np.int64))
        self.binding.clear_binding_outputs()  # outputs are this call's rows: their shapes follow T
        for name in self.outputs:
            self.binding.bind_output(name, "cpu")
        self.sess.run_with_iobinding(self.binding)
        outs = dict(zip(self.outputs, self.binding.copy_outputs_to_cpu()))
        self.store_outputs(outs, start, T)
        return torch.from_numpy(outs[self.io.logits])
