"""`shrinkrt build`: a TensorRT engine for one GPU architecture from the exported graph.

Without a plugin library the custom ops' reference bodies are inlined and TensorRT builds them from
standard layers; the quantized linears enter as FP16 weights dequantized at export (target
"tensorrt": TensorRT cannot parse the bit unpacking, and there is nothing to fuse without our
plugin). Works with TensorRT-RTX (`tensorrt_rtx`, builds SM75 engines on a machine without a GPU)
and with standard TensorRT (`tensorrt`), whose Python APIs match for what is used here.

With `plugins` (the library built from plugins/tensorrt), the custom ops stay nodes and TensorRT's
parser maps them to the registered plugins (node op_type + plugin_namespace/plugin_version); the
quantized linears keep their packed weights. That needs standard TensorRT: TensorRT-RTX 1.7 aborts
the process once a plugin layer joins a network (FACTS.md), so it is refused here with a message.

Two optimization profiles: 0 = prefill (seq 1..max_prefill), 1 = decode (seq 1), both over caches
of up to `capacity` tokens.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

import onnx

from shrinkrt.errors import ShrinkError

TRT_MODULES = ("tensorrt_rtx", "tensorrt")
BUILD_FORMAT, BUILD_INFO = "shrinkrt-build", "build.json"


def is_build(path: Path) -> bool:
    """A directory `shrinkrt build` wrote (build.json beside an export): the only kind it replaces."""
    import json

    try:
        info = json.loads((Path(path) / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and (info.get("format") == BUILD_FORMAT
                                       or ("trt_module" in info and (Path(path) / "export.json").is_file()))
TARGETS = {"sm75": (7, 5), "sm80": (8, 0), "sm86": (8, 6), "sm89": (8, 9)}


def import_trt(name: str | None = None):
    for mod in ([name] if name else TRT_MODULES):
        try:
            return importlib.import_module(mod)
        except ImportError:
            continue
    raise ShrinkError("no TensorRT Python module: pip install tensorrt-rtx-cu12==1.7.1.116 (builds SM75 engines "
                      "without a GPU) or install TensorRT (`tensorrt`) on the GPU machine")


def inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """Model-local functions expanded into the graph (the no-plugin build)."""
    from onnx import inliner

    return inliner.inline_local_functions(model)


PLUGIN_OPS = ("QuantMatMul", "BiBranchAttention")


def check_plugins(trt, lib: Path) -> None:
    """The library exists, TensorRT loads it, and it registers every op of docs/ops.md."""
    if trt.__name__ == "tensorrt_rtx":
        raise ShrinkError("--plugins needs standard TensorRT (--trt-module tensorrt): TensorRT-RTX 1.7 aborts when a "
                          "network holds a plugin layer; without --plugins it builds the inlined reference graph")
    lib = Path(lib)
    if not lib.is_file():
        raise ShrinkError(f"plugin library {lib} not found (build it: cmake -S . -B build -DTensorRT_ROOT=...)")
    registry = trt.get_plugin_registry()
    try:
        handle = registry.load_library(str(lib.resolve()))
    except Exception as e:  # not a shared library, missing symbols, wrong architecture
        raise ShrinkError(f"TensorRT cannot load the plugin library {lib} ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or ['?'])[0]})") from None
    if handle is None:
        raise ShrinkError(f"TensorRT refused the plugin library {lib} (already loaded, or not a TensorRT plugin library)")
    missing = [op for op in PLUGIN_OPS if registry.get_creator(op, "1", "shrinkrt") is None]
    if missing:
        raise ShrinkError(f"plugin library {lib} does not register {', '.join(missing)} (namespace shrinkrt, version 1)")


def read_io(export_dir: Path):
    """The graph description of the export beside the model (export.json "io")."""
    import json

    from shrinkrt.runtime.graph_io import GraphIO

    f = Path(export_dir) / "export.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ShrinkError(f"build: {f} is missing or not JSON ({e})") from None
    return GraphIO.from_json(meta.get("io") if isinstance(meta, dict) else None, str(f))


def library_kernels(lib: Path) -> list[str]:
    """The kernel specializations a plugin library holds (its C entry points, no TensorRT needed)."""
    import ctypes

    try:
        so = ctypes.CDLL(str(Path(lib).resolve()))
        so.shrinkrt_kernel_name.restype = ctypes.c_char_p
        return [so.shrinkrt_kernel_name(i).decode() for i in range(so.shrinkrt_num_kernels())]
    except (OSError, AttributeError) as e:
        raise ShrinkError(f"cannot list the kernels of the plugin library {lib} ({e})") from None


def check_library_kernels(lib: Path, op_attributes: dict) -> None:
    """Every kernel the export's custom ops need is in the library: one line naming the first missing
    shape, at build time, never when the engine runs."""
    from shrinkrt.plugins.kernels.aot import needed_kernels

    have = set(library_kernels(lib))
    missing = [(n, shape) for n, shape in needed_kernels(op_attributes).items() if n not in have]
    if missing:
        name, shape = missing[0]
        raise ShrinkError(f"plugin library {lib} has no kernel {name} ({shape}; {len(missing)} missing): build it "
                          f"for this model with cmake -DSHRINKRT_EXPORT=<this export> (kernels: shrinkrt kernels "
                          f"--export DIR)")


def check_plugin_layers(trt, network, model) -> None:
    """Every shrinkrt node became a plugin layer: without ENABLE_PLUGIN_OVERRIDE (TensorRT < 10.15) the
    parser may import a node's function body instead, which builds but is not what the plugins run."""
    want = sum(1 for n in model.graph.node if n.domain == "shrinkrt")
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, k)}
    got = sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)
    if got < want:
        raise ShrinkError(f"build: TensorRT imported {got} of the model's {want} shrinkrt nodes as plugin layers "
                          f"(the others as their reference bodies): use TensorRT >= 10.15 (ENABLE_PLUGIN_OVERRIDE) "
                          f"with --plugins")


def build(onnx_path: Path, engine_path: Path, target: str = "sm75", capacity: int = 2048, max_prefill: int = 512,
          trt_module: str | None = None, plugins: Path | None = None) -> dict:
    if target not in TARGETS:
        raise ShrinkError(f"unknown build target '{target}' (use {', '.join(TARGETS)})")
    trt = import_trt(trt_module)
    try:  # the graph only: TensorRT reads the external weights itself (parse with the model's path)
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # truncated or not ONNX
        raise ShrinkError(f"{onnx_path} is not a readable ONNX model ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or ['?'])[0]})") from None
    if plugins:
        check_plugins(trt, plugins)  # custom-op nodes -> plugins
    else:
        model = inline(model)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # with plugins: strongly typed (the graph is FP16 already; a weakly typed FP16 network made TensorRT
    # ask for dynamic ranges of the int8 feature stores, which are network inputs and outputs)
    strong = bool(plugins) and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0)
    parser = trt.OnnxParser(network, logger)
    if plugins and hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)  # the plugin, not the function body
    if not parser.parse(model.SerializeToString(), str(Path(onnx_path).resolve())):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ShrinkError(f"build: TensorRT could not parse the model: {errs[0] if errs else '?'}")
    if plugins:
        check_plugin_layers(trt, network, model)
    config = builder.create_builder_config()
    if plugins and not strong and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)  # the plugins take FP16 linear tensors
    rtx = trt.__name__ == "tensorrt_rtx"
    if rtx:
        cc = getattr(trt.ComputeCapability, target.upper())
        config.num_compute_capabilities = 1
        config.set_compute_capability(cc, 0)
    io = read_io(Path(onnx_path).parent)
    caches = io.by_input()
    caps = (capacity // 4, capacity // 2, capacity)
    for seq in ((1, max_prefill // 2, max_prefill), (1, 1, 1)):
        prof = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            if t.name == io.past_length:  # a shape input (it sizes the cache slices): its values get a range,
                # every start a cache of `capacity` rows admits (runtime/trt_model.py checks start + T <= capacity)
                prof.set_shape_input(t.name, [0], [capacity // 2], [capacity - 1])
                continue
            if t.name == io.input_ids:
                lo, opt, hi = ([1, n] for n in seq)
            elif t.name in caches:  # batch 1; cache rows over the capacity range
                lo, opt, hi = (caches[t.name].buffer_shape(1, c) for c in caps)
            else:
                raise ShrinkError(f"build: the network has an input '{t.name}' that export.json does not describe")
            prof.set_shape(t.name, lo, opt, hi)
        config.add_optimization_profile(prof)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise ShrinkError("build: TensorRT failed to build the engine (see the log above)")
    engine_path = Path(engine_path)
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    tmp.write_bytes(bytes(plan))
    tmp.replace(engine_path)
    layers = network.num_layers
    return {"format": BUILD_FORMAT, "trt_module": trt.__name__, "trt_version": trt.__version__, "target": target,
            "plugins": str(Path(plugins).resolve()) if plugins else None,
            "engine_bytes": engine_path.stat().st_size, "layers": layers, "build_s": round(build_s, 2),
            "profiles": {"prefill": {"seq": [1, max_prefill // 2, max_prefill]}, "decode": {"seq": [1, 1, 1]},
                         "capacity": [capacity // 4, capacity // 2, capacity]}}
