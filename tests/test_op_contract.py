"""The ops' contract is defined once (runtime/op_contract.py) and the C++ side sees the same numbers
through the generated header: compiled here and compared value by value, split plan included."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shrinkrt.runtime import op_contract as oc

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

# every number and name of the contract, as Python and C++ spell them
SCALARS = {"kFeatureGroup": oc.FEATURE_GROUP, "kWordBits": oc.WORD_BITS, "kRankPad": oc.RANK_PAD,
           "kSplitsPad": oc.SPLITS_PAD, "kMinSplit": oc.MIN_SPLIT, "kQgemvBlockN": oc.QGEMV_BLOCK_N,
           "kQgemvMaxRows": max(oc.QGEMV_ROWS), "kDequantBlockN": oc.DEQUANT_BLOCK_N,
           "kDequantBlockK": oc.DEQUANT_BLOCK_K, "kUnscaledDrop": oc.UNSCALED_DROP,
           "kKeyModePreRope": oc.KEY_MODE["pre-rope"], "kKeyModePostRope": oc.KEY_MODE["post-rope"]}
PLANS = [(S, W) for S in (1, 2, 63, 64, 65, 300, 4096, 8192, 16384, 131072, 1 << 20) for W in (1, 16, 64, 128)]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if not CXX:
        pytest.skip("no C++ compiler on PATH (c++, g++, clang++)")
    d = tmp_path_factory.mktemp("contract")
    assert oc.main([str(d / "shrinkrt_ops.gen.h")]) == 0
    lines = [f'std::printf("{k} %.9g\\n", static_cast<double>(shrinkrt::contract::{k}));' for k in SCALARS]
    lines += ['std::printf("kScaleFloor %a\\n", static_cast<double>(shrinkrt::contract::kScaleFloor));',
              'std::printf("kDomain %s\\nkVersion %s\\n", shrinkrt::contract::kDomain, shrinkrt::contract::kVersion);']
    for op, (inputs, outputs, attrs) in oc.SCHEMAS.items():
        ns = f"shrinkrt::contract::{op}"
        lines.append(f'std::printf("{op}.inputs %d\\n{op}.outputs %d\\n", (int){ns}::kNbInputs, (int){ns}::kNbOutputs);')
        lines.append(f'for (auto a : {ns}::kAttributes) std::printf("{op}.attr %s\\n", a);')
        # the enum positions are the schema's: first and last of each list by name
        for kind, names in (("Input", inputs), ("Output", outputs)):
            for n in (names[0], names[-1]):
                camel = "k" + "".join(p[:1].upper() + p[1:] for p in n.split("_"))
                lines.append(f'std::printf("{op}.{kind}.{n} %d\\n", (int){ns}::{camel});')
    lines.append("int n, l;")
    for S, W in PLANS:
        lines.append(f'shrinkrt::contract::splitPlan({S}, {W}, n, l); std::printf("plan {S} {W} %d %d\\n", n, l);')
    src = d / "probe.cpp"
    src.write_text('#include "shrinkrt_ops.gen.h"\n#include <cstdio>\nint main()\n{\n' + "\n".join(lines) + "\nreturn 0;\n}\n")
    subprocess.run([CXX, "-std=c++17", "-Wall", "-Werror", "-I", str(d), str(src), "-o", str(d / "probe")], check=True)
    return subprocess.run([str(d / "probe")], capture_output=True, text=True, check=True).stdout.splitlines()


def test_cpp_header_numbers_are_the_python_ones(probe):
    got = dict(line.split(" ", 1) for line in probe if not line.startswith(("plan", "QuantMatMul.attr",
                                                                           "BiBranchAttention.attr")))
    for k, v in SCALARS.items():
        assert float(got[k]) == v, k
    assert float.fromhex(got["kScaleFloor"]) == oc.SCALE_FLOOR == 2.0 ** -14
    assert (got["kDomain"], got["kVersion"]) == (oc.DOMAIN, oc.PLUGIN_VERSION) == ("shrinkrt", "1")
    for op, (inputs, outputs, attrs) in oc.SCHEMAS.items():
        assert (int(got[f"{op}.inputs"]), int(got[f"{op}.outputs"])) == (len(inputs), len(outputs))
        assert [ln.split(" ", 1)[1] for ln in probe if ln.startswith(f"{op}.attr ")] == attrs
        for kind, names in (("Input", inputs), ("Output", outputs)):
            assert int(got[f"{op}.{kind}.{names[0]}"]) == 0
            assert int(got[f"{op}.{kind}.{names[-1]}"]) == len(names) - 1


def test_cpp_split_plan_is_the_python_one(probe):
    plans = {(int(a), int(b)): (int(c), int(d)) for _, a, b, c, d in (ln.split() for ln in probe if ln.startswith("plan"))}
    assert len(plans) == len(PLANS)
    for (S, W), got in plans.items():
        n, length = oc.split_plan(S, W)
        assert got == (n, length), (S, W)
        assert n <= oc.SPLITS_PAD - 1 and n * length >= S - W + 1  # every attendable row covered


def test_header_is_written_atomically_and_refuses_a_foreign_file(tmp_path):
    from shrinkrt.errors import ShrinkError

    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine")
    with pytest.raises(ShrinkError, match="notes.txt"):
        oc.main([str(foreign)])
    assert foreign.read_text() == "mine"


# Python names the contract's numbers went by before it existed, and its own: none may be assigned a
# literal outside op_contract.py (an alias that reads the contract, `NS_PAD = op_contract.SPLITS_PAD`, is fine)
PY_NAMES = ["DOMAIN", "PLUGIN_VERSION", "FEATURE_GROUP", "GROUP", "SCALE_FLOOR", "RANK_PAD", "R_PAD", "SPLITS_PAD",
            "NS_PAD", "MIN_SPLIT", "BLOCK_N", "BLOCK_K", "KEY_MODE", "SCHEMAS", "WORD_BITS"]


def _git_grep(pattern: str, *paths: str) -> list[str]:
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout: the once-defined check reads `git grep`")
    r = subprocess.run(["git", "-C", str(ROOT), "grep", "-n", "-E", pattern, "--", *paths], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    return r.stdout.splitlines()


def test_each_op_constant_is_defined_once():
    names = "|".join(PY_NAMES)
    py = [ln for ln in _git_grep(rf"^\s*({names})(\s*,\s*\w+)*\s*=\s*[-0-9\"'{{(]", "*.py")
          if not ln.startswith(("runtime/op_contract.py:", "tests/", "benchmarks/"))]
    assert py == [], "op constants defined outside runtime/op_contract.py:\n" + "\n".join(py)
    # the kernels' own BLOCK_N/BLOCK_K tiles of kv_baselines etc. are not op constants; the C++ side
    # defines none of the header's numbers itself
    cxx_names = "|".join(re.findall(r"constexpr \S+(?: const\*)? (k\w+) =", oc.cpp_header()))
    cxx = _git_grep(rf"constexpr [^=]*\b({cxx_names})\s*=\s*[-0-9\"]", "*.cpp", "*.h")
    assert cxx == [], "contract numbers typed into C++:\n" + "\n".join(cxx)
    # and each is defined exactly once in op_contract.py
    for n in ("FEATURE_GROUP", "SCALE_FLOOR", "RANK_PAD", "SPLITS_PAD", "MIN_SPLIT", "DOMAIN", "PLUGIN_VERSION"):
        assert len(_git_grep(rf"^{n}\s*=", "runtime/op_contract.py")) == 1, n
