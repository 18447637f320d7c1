"""One direction of imports (docs/ARCHITECTURE.md): a module may import its own layer or lower ones,
never a higher one; the stages (calib, export, evaluate) do not import each other. Read from the
source with `ast`, so a lazy import inside a function counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"shrinkrt": "shrinkrt", "calib": "shrinkrt.calib", "export": "shrinkrt.export",
           "runtime": "shrinkrt.runtime", "evaluate": "shrinkrt.evaluate", "plugins": "shrinkrt.plugins"}

# bottom to top; a module is matched by its longest listed prefix
LAYERS = [
    ("base", ["shrinkrt.errors", "shrinkrt.atomic"]),
    ("formats", ["shrinkrt.runtime.config", "shrinkrt.runtime.op_contract",
                 "shrinkrt.runtime.kv_quant", "shrinkrt.runtime.packing",
                 "shrinkrt.runtime.graph_io"]),
    ("kernels", ["shrinkrt.plugins"]),
    ("model", ["shrinkrt.runtime"]),
    ("stage:calib", ["shrinkrt.calib"]),
    ("stage:export", ["shrinkrt.export"]),
    ("stage:evaluate", ["shrinkrt.evaluate"]),
    # above the stages: the TensorRT backend reads the build's targets, profiling the evaluation text
    ("backends", ["shrinkrt.runtime.trt_model", "shrinkrt.runtime.profile"]),
    ("cli", ["shrinkrt.cli", "shrinkrt"]),
]
RANK = {"base": 0, "formats": 1, "kernels": 2, "model": 3, "stage:calib": 4, "stage:export": 4,
        "stage:evaluate": 4, "backends": 5, "cli": 6}


def layer_of(module: str) -> str:
    best, name = -1, None
    for layer, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, name = len(p), layer
    assert name, module
    return name


def modules():
    for folder, pkg in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg, *parts]), f, f.name == "__init__.py"


def imports(module: str, path: Path, is_package: bool):
    base = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:  # `from pkg import mod` is an import of pkg.mod (pkg/__init__ holds no code here)
                names = [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                yield n, node.lineno


def violations():
    found = []
    known = {m for m, _, _ in modules()}
    for module, path, is_pkg in modules():
        mine = layer_of(module)
        for target, line in imports(module, path, is_pkg):
            if not target.startswith("shrinkrt"):
                continue
            while target not in known and "." in target:  # `from pkg import name` of a non-module
                target = target.rpartition(".")[0]
            theirs = layer_of(target)
            up = RANK[theirs] > RANK[mine]
            sideways = RANK[theirs] == RANK[mine] and theirs != mine  # one stage into another
            if up or sideways:
                found.append(f"{path.relative_to(ROOT)}:{line}: {module} ({mine}) imports {target} ({theirs})")
    return found


def test_no_import_goes_up_or_between_stages():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The rule itself, on a made-up edge: the model layer importing the CLI is reported."""
    assert RANK[layer_of("shrinkrt.runtime.model")] < RANK[layer_of("shrinkrt.cli")]
    assert layer_of("shrinkrt.runtime.packing") == "formats" and layer_of("shrinkrt.runtime.trt_model") == "backends"
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from shrinkrt.cli import main\n")
    got = list(imports("shrinkrt.runtime.model", fake, False))
    assert got == [("shrinkrt.cli.main", 2)]  # resolved to the module shrinkrt.cli by violations()
