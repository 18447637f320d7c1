"""Calibration presets side by side on the long-context quality instrument (`shrinkrt quality --parts`).

Each preset: `shrinkrt calibrate COMMON FLAGS` into build/presets/NAME, then `shrinkrt quality --parts`
(one 4096-token segment per text, positions >= 1024 scored, perplexity over FP, each compression alone
and both together) into build/presets/NAME.json; the table and JSON go to docs/results/quality_presets.
`--collect` only tabulates the per-preset files already there. About 8 minutes per preset on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from shrinkrt.atomic import MD_MARKER, write_atomic

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "presets"
OUT = ROOT / "docs" / "results" / "quality_presets"
COMMON = ["--window", "64", "--kv-bits", "4", "--key-mode", "pre-rope", "--kv-fit-steps", "20", "--calib-tokens", "2048"]
# name -> (calibration text, flags); licenses-only rows predate the two-domain calibration (bf9932c)
PRESETS = {
    "kv20-w40-g128-gptq-lic": ("licenses", "--kv-ratio 0.2 --weight-budget 4.0bpw --group-size 128 --quantizer gptq"),
    "kv20-w40-auto-gptq-lic": ("licenses", "--kv-ratio 0.2 --weight-budget 4.0bpw --group-size auto --quantizer gptq"),
    "kv20-w40-auto-gptq": ("licenses,code", "--kv-ratio 0.2 --weight-budget 4.0bpw --group-size auto --quantizer gptq"),
    "kv20-w40-auto-act": ("licenses,code", "--kv-ratio 0.2 --weight-budget 4.0bpw --group-size auto "
                                            "--quantizer gptq-act-order"),
    "kv20-w40-auto-act-seq": ("licenses,code", "--kv-ratio 0.2 --weight-budget 4.0bpw --group-size auto "
                                                "--quantizer gptq-act-order --sequential"),
    "kv20-w45-auto-act": ("licenses,code", "--kv-ratio 0.2 --weight-budget 4.5bpw --group-size auto "
                                            "--quantizer gptq-act-order"),
    "kv30-w45-auto-act-p8": ("licenses,code", "--kv-ratio 0.3 --weight-budget 4.5bpw --group-size auto "
                                               "--quantizer gptq-act-order"),
    "kv30-w45-auto-act-post (main job)": ("licenses,code", "--kv-ratio 0.3 --weight-budget 4.5bpw --group-size auto "
                                                         "--quantizer gptq-act-order --key-mode post-rope"),
    "kv30-w50-auto-act": ("licenses,code", "--kv-ratio 0.3 --weight-budget 5.0bpw --group-size auto "
                                            "--quantizer gptq-act-order"),
    # KV alone at 20%, the rank allocation's key weight swept (issue 19); weight 1 is kv20-w45-auto-act's KV part
    "kv20-kw0.5": ("licenses,code", "--kv-ratio 0.2 --key-weight 0.5"),
    "kv20-kw2": ("licenses,code", "--kv-ratio 0.2 --key-weight 2"),
    "kv20-kw4": ("licenses,code", "--kv-ratio 0.2 --key-weight 4"),
}


def slug(name: str) -> str:
    return name.split(" ")[0]


def run(name: str, text: str, flags: str) -> None:
    ckpt = WORK / slug(name)
    if not (ckpt / "manifest.json").exists():
        subprocess.run(["shrinkrt", "calibrate", *COMMON, "--calib-text", text, *flags.split(), "--out", str(ckpt),
                        "--quiet"], check=True)
    subprocess.run(["shrinkrt", "quality", "--checkpoint", str(ckpt), "--parts", "--quiet",
                    "--out", str(WORK / f"{slug(name)}.json")], check=True)


def collect() -> dict:
    """Rows from build/presets/*.json; a preset measured before (another machine) and not rerun here keeps
    its row from the results file, so a partial rerun drops no other row (retired presets' rows last)."""
    out = {"format": "shrinkrt-preset-quality-1", "common_flags": " ".join(COMMON), "presets": []}
    earlier = {}
    if OUT.with_suffix(".json").exists():
        earlier = {slug(p["name"]): p for p in json.loads(OUT.with_suffix(".json").read_text())["presets"]}
    for name, (text, flags) in PRESETS.items():
        path = WORK / f"{slug(name)}.json"
        if not path.exists():
            if slug(name) in earlier and earlier[slug(name)]["flags"] == flags:
                out["presets"].append({**earlier[slug(name)], "name": name})
            continue
        r = json.loads(path.read_text())
        ratios = {v["name"]: {t: x["ratio_to_fp"] for t, x in v["texts"].items()} for v in r["variants"]}
        first = r["variants"][0]["texts"]
        out["presets"].append({"name": name, "calibration_text": text, "flags": flags, "ratios": ratios,
                               "kv_bytes_fraction": next(iter(first.values()))["kv_bytes_fraction"],
                               "fp": {t: x["fp"]["long_perplexity"] for t, x in r["texts"].items()}})
    known = {slug(n) for n in PRESETS}
    out["presets"] += [p for s, p in earlier.items() if s not in known]  # rows of retired presets, as measured
    return out


def markdown(r: dict) -> str:
    lines = ["# Calibration presets: long-context quality vs FP", MD_MARKER, "",
             f"Each row: `shrinkrt calibrate {r['common_flags']} --calib-text TEXT FLAGS`, then `shrinkrt quality "
             "--parts` (one 4096-token segment per text, positions >= 1024 scored; perplexity over FP). `licenses` = "
             "the calibration licenses only; `licenses,code` = 1024-token pieces of those and of Python stdlib source "
             "in turn (evaluate/corpus.py).", "",
             "| preset | text | flags | both: licenses | python docs | KV alone: licenses | python docs | "
             "weights alone: licenses | python docs | KV bytes kept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["presets"]:
        def cell(v):
            return " | ".join(f"x{x:.3f}" for x in p["ratios"][v].values()) if v in p["ratios"] else "- | -"
        lines.append(f"| {p['name']} | {p['calibration_text']} | `{p['flags']}` | {cell('kv+weights')} | "
                     f"{cell('kv only')} | {cell('weights only')} | {p['kv_bytes_fraction']:.3f} |")
    lines += ["", "One segment per text: differences of a few percent between neighbouring rows are within the noise "
              "of one 3072-token score.", "", "Regenerate: `python benchmarks/quality_presets.py` (`--collect` only "
              "tabulates build/presets/*.json).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collect", action="store_true", help="only tabulate the per-preset results already there")
    ap.add_argument("--only", default="", help="comma-separated preset names to run (default: all)")
    a = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    if not a.collect:
        unknown = [n for n in a.only.split(",") if n and n not in {slug(k) for k in PRESETS}]
        if unknown:
            sys.exit(f"--only: unknown preset {', '.join(unknown)} (known: {', '.join(slug(k) for k in PRESETS)})")
        for name, (text, flags) in PRESETS.items():
            if not a.only or slug(name) in a.only.split(","):
                try:
                    run(name, text, flags)
                except subprocess.CalledProcessError as e:  # shrinkrt said why on stderr
                    sys.exit(f"preset {slug(name)}: `{' '.join(e.cmd[:2])}` failed (exit {e.returncode})")
    r = collect()
    if not r["presets"]:
        sys.exit(f"no preset results under {WORK}")
    write_atomic(json.dumps(r, indent=1) + "\n", OUT.with_suffix(".json"))
    write_atomic(markdown(r), OUT.with_suffix(".md"))
    print(f"wrote {OUT}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
