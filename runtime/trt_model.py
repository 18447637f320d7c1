"""A TensorRT engine built by `shrinkrt build` run behind the reference runtime's model interface
(setup_caches / forward(tokens, start, last_only) / cache_length / cache_nbytes / clear_caches).

Buffers are torch CUDA tensors allocated once at setup_caches and bound by address (no per-step
allocation for the caches); the graph returns this call's cache rows, written into the buffers at
the call's positions on the same stream; the CSKV ring comes back whole and is copied into its
buffer. Profile 0 serves prefill (T > 1), profile 1 decode (T = 1). `past_length` is a shape input of
the no-plugin engine (it sizes the cache slices), read from host memory, so a decode step cannot be
replayed as a CUDA graph there; the plugin engine's attention reads it on the device: its location is
the engine's (`get_tensor_location`), never assumed. The caches' capacity and a call's length are
checked against the engine's profiles (build.json) before TensorRT sees them, and every shape TensorRT
refuses is named.

Written for the TensorRT 10 Python API (`tensorrt`, or `tensorrt_rtx` which shares it). No machine of
this project has run it: the lent GPU has no TensorRT, and this machine has no GPU (docs/deploy.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from shrinkrt.errors import ShrinkError
from shrinkrt.runtime.config import ModelArgs
from shrinkrt.runtime.exported import ExportedCaches
from shrinkrt.runtime.graph_io import GraphIO



class LayerTimes:
    """Per-layer times of the last runs (TensorRT IProfiler), for `shrinkrt profile --backend trt`."""

    def __init__(self, trt):
        class _P(trt.IProfiler):
            def __init__(inner):
                trt.IProfiler.__init__(inner)
                inner.ms = {}

            def report_layer_time(inner, name, ms):
                inner.ms[name] = inner.ms.get(name, 0.0) + ms

        self.profiler = _P()

    def top(self, n: int = 20) -> list[tuple[str, float]]:
        return sorted(self.profiler.ms.items(), key=lambda kv: -kv[1])[:n]


def check_device(target: str) -> None:
    from shrinkrt.export.trt_build import TARGETS

    if not torch.cuda.is_available():
        raise ShrinkError("--backend trt runs a TensorRT engine on an NVIDIA GPU: no CUDA device is visible "
                          "(torch.cuda.is_available() is False)")
    cc = torch.cuda.get_device_capability()
    if target in TARGETS and TARGETS[target] != cc:
        raise ShrinkError(f"the engine was built for {target} (compute capability {TARGETS[target]}), this GPU is "
                          f"{cc[0]}.{cc[1]}: rebuild with `shrinkrt build --target sm{cc[0]}{cc[1]}`")


def profile_limits(info: dict, where) -> dict:
    """The engine's ranges from build.json: cache capacity [lo, hi] and tokens per prefill call."""
    try:
        prof = info["profiles"]
        cap, seq = prof["capacity"], prof["prefill"]["seq"]
        return {"capacity": (int(cap[0]), int(cap[-1])), "prefill_tokens": int(seq[-1])}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ShrinkError(f"{where} has no engine profiles ({type(e).__name__}: {e}): build it again") from None


def check_capacity(limits: dict, batch: int, max_seq_len: int) -> None:
    lo, hi = limits["capacity"]
    if batch != 1:
        raise ShrinkError(f"the engine's profiles are for batch 1 (asked for {batch})")
    if not lo <= max_seq_len <= hi:
        raise ShrinkError(f"a cache of {max_seq_len} tokens is outside the engine's capacity range {lo}..{hi} "
                          f"(shrinkrt build --capacity sets it)")


def check_call_length(limits: dict, T: int) -> None:
    if T > limits["prefill_tokens"]:
        raise ShrinkError(f"a call of {T} tokens exceeds the engine's prefill profile ({limits['prefill_tokens']} "
                          f"tokens per call): prefill in chunks of at most that")


def bind_inputs(ctx, profile: int, tensors: list) -> None:
    """(name, shape, address) for each input; a shape TensorRT refuses is named with the profile."""
    for name, shape, address in tensors:
        if not ctx.set_input_shape(name, shape):
            raise ShrinkError(f"TensorRT refused input {name} of shape {list(shape)} for profile {profile} "
                              f"({'prefill' if profile == 0 else 'decode'})")
        ctx.set_tensor_address(name, address)


class TrtModel(ExportedCaches):
    def __init__(self, build_dir: Path, trt_module: str | None = None, layer_times: bool = False):
        from shrinkrt.export.trt_build import import_trt

        build_dir = Path(build_dir)
        info_path = build_dir / "build.json"
        if not info_path.is_file():
            raise ShrinkError(f"{build_dir} has no build.json: pass the --out directory of `shrinkrt build`")
        try:
            info = json.loads(info_path.read_text())
            info["target"], info["trt_module"]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError) as e:
            raise ShrinkError(f"{info_path} is not a build description written by `shrinkrt build` "
                              f"({type(e).__name__}: {e})") from None
        check_device(info["target"])
        trt = import_trt(trt_module or info.get("trt_module"))
        try:
            self.meta = json.loads((build_dir / "export.json").read_text())
            self.args = ModelArgs(**self.meta["model_args"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ShrinkError(f"{build_dir / 'export.json'} is missing or malformed ({type(e).__name__}: {e})") from None
        self.io = GraphIO.from_json(self.meta.get("io"), str(build_dir / "export.json"))
        self.limits = profile_limits(info, info_path)
        logger = trt.Logger(trt.Logger.WARNING)
        if info.get("plugins"):
            lib = Path(info["plugins"])
            if not lib.is_file():
                raise ShrinkError(f"the engine uses the plugin library {lib}, which is missing")
            trt.get_plugin_registry().load_library(str(lib))
        runtime = trt.Runtime(logger)
        engine_path = build_dir / f"engine.{info['target']}.plan"
        if not engine_path.is_file():
            raise ShrinkError(f"{build_dir} has no engine {engine_path.name}: build it again")
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ShrinkError(f"TensorRT could not load {engine_path} (built by {info['trt_module']} "
                              f"{info.get('trt_version')}: rebuild it with this TensorRT)")
        self.trt = trt
        self.context = self.engine.create_execution_context()
        self.times = LayerTimes(trt) if layer_times else None
        if self.times:
            self.context.profiler = self.times.profiler
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        missing = [c.input for c in self.io.caches if c.input not in self.inputs]
        if missing:
            raise ShrinkError(f"{engine_path} lacks the cache input {missing[0]} that export.json describes")
        self.buffers: dict[str, torch.Tensor] = {}
        self.length = self.capacity = 0
        self.profile = -1
        self.past_on_host = self.engine.get_tensor_location(self.io.past_length) == trt.TensorLocation.HOST

    def _dtype(self, name):
        return {self.trt.float16: torch.float16, self.trt.float32: torch.float32, self.trt.int8: torch.int8,
                self.trt.int64: torch.int64, self.trt.int32: torch.int32}[self.engine.get_tensor_dtype(name)]

    def setup_caches(self, batch: int, max_seq_len: int, dtype=None) -> None:
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} tokens exceeds the model's context {self.args.max_seq_len}")
        check_capacity(self.limits, batch, max_seq_len)
        self.buffers = {}
        for c in self.io.caches:  # shapes from the graph description; the dtype as the engine has it
            self.buffers[c.input] = torch.zeros(c.buffer_shape(batch, max_seq_len), dtype=self._dtype(c.input),
                                                device="cuda")
        # where the engine reads it: host (a shape input of the no-plugin engine) or device (the plugins)
        self.past = torch.zeros(1, dtype=torch.int64, device="cpu" if self.past_on_host else "cuda")
        self.length, self.capacity, self.batch = 0, max_seq_len, batch

    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = True) -> torch.Tensor:
        T = tokens.shape[1]
        self.check_call(start, T)
        check_call_length(self.limits, T)
        ctx, s = self.context, self.stream
        profile = 1 if T == 1 else 0
        if profile != self.profile:
            ctx.set_optimization_profile_async(profile, s.cuda_stream)
            self.profile = profile
        ids = tokens.to("cuda", torch.int64).contiguous()
        with torch.cuda.stream(s):
            self.past.fill_(start)  # a device past_length is written on the stream the engine reads it on
        bind_inputs(ctx, profile, [(self.io.input_ids, tuple(ids.shape), ids.data_ptr()),
                                   (self.io.past_length, (1,), self.past.data_ptr())]
                    + [(n, tuple(b.shape), b.data_ptr()) for n, b in self.buffers.items()])
        outs = {}
        for name in self.outputs:
            outs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtype(name), device="cuda")
            ctx.set_tensor_address(name, outs[name].data_ptr())
        with torch.cuda.stream(s):
            if not ctx.execute_async_v3(s.cuda_stream):
                raise RuntimeError("TensorRT enqueue failed (see the log above)")
            self.store_outputs(outs, start, T)
        s.synchronize()
        return outs[self.io.logits].float().cpu()
