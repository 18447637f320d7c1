"""Bad input and faults against every command: exit code 2 (130 when interrupted), one
`shrinkrt: error:` line naming the problem (no traceback), and nothing written or lost.

Each case snapshots the files around it (the tiny model, earlier artifacts, the user's own files)
before the command and compares after: a refused command must leave every byte as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shrinkrt.cli import main

from conftest import tiny_hf_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers
def tree(root: Path) -> dict[str, str]:
    """Every entry under root -> a digest of its content ('dir' for folders, the target for links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(args: list[str], msg: str, capsys, *roots: Path, code: int = 2) -> str:
    """Run the CLI in-process; assert the exit code, one error line containing `msg`, and that every
    file under `roots` is exactly as before."""
    before = [tree(r) for r in roots]
    capsys.readouterr()
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    lines = [l for l in err if l.startswith("shrinkrt:")]
    assert len(lines) == 1 and lines[0].startswith("shrinkrt: error: "), err
    assert msg in lines[0], lines[0]
    assert not any("Traceback" in l for l in err), err
    for r, b in zip(roots, before):
        assert tree(r) == b, f"files under {r} changed"
    return lines[0]


def no_temps(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if ".shrinkrt-tmp-" in p.name]
    assert not left, f"temp artifacts left behind: {left}"


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "shrinkrt.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# ---------------------------------------------------------------- fixtures (built once per module)
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model, a checkpoint (kv + weights) and an export of it, made by the CLI itself."""
    root = tmp_path_factory.mktemp("bad-input")
    model = root / "tiny"
    tiny_hf_model("llama").save_pretrained(model, safe_serialization=True)
    word_tokenizer(model)
    ck, exp = root / "ck", root / "exp"
    assert main(["calibrate", "--model", str(model), "--kv-ratio", "0.5", "--window", "4", "--kv-bits", "8",
                 "--weight-budget", "4bpw", "--calib-tokens", "256", "--kv-fit-steps", "2", "--out", str(ck),
                 "--quiet"]) == 0
    assert main(["export", "--model", str(model), "--checkpoint", str(ck), "--out", str(exp), "--no-validate"]) == 0
    return {"root": root, "model": model, "ck": ck, "exp": exp}


@pytest.fixture
def user(tmp_path):
    """A folder of the user's: a file and a directory with a file in it."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep")
    (tmp_path / "notes.txt").write_text("my notes")
    return tmp_path


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- outputs: never replace what is not ours
OUTPUT_COMMANDS = {
    "export": lambda b, out: ["export", "--model", str(b["model"]), "--out", str(out), "--no-validate"],
    "build": lambda b, out: ["build", "--model", str(b["model"]), "--out", str(out), "--max-prefill", "16"],
    "calibrate": lambda b, out: ["calibrate", "--model", str(b["model"]), "--kv-ratio", "0.5", "--window", "4",
                                 "--kv-bits", "8", "--calib-tokens", "256", "--kv-fit-steps", "1", "--out", str(out), "--quiet"],
    "kernels": lambda b, out: ["kernels", "--out", str(out)],
}


@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
def test_out_is_a_users_folder(command, base, user, capsys):
    refused(OUTPUT_COMMANDS[command](base, user / "mine"), "exists and was not written by shrinkrt", capsys,
            user, base["root"])


@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
def test_out_is_a_users_file(command, base, user, capsys):
    refused(OUTPUT_COMMANDS[command](base, user / "notes.txt"), "is an existing file; refusing to replace it",
            capsys, user, base["root"])


@pytest.mark.parametrize("command", ["export", "calibrate"])
def test_out_is_a_symlink(command, base, user, capsys):
    os.symlink(user / "mine", user / "link")
    refused(OUTPUT_COMMANDS[command](base, user / "link"), "is a symbolic link", capsys, user, base["root"])


@pytest.mark.parametrize("command", ["export", "calibrate", "build", "kernels"])
def test_out_below_a_file(command, base, user, capsys):
    refused(OUTPUT_COMMANDS[command](base, user / "notes.txt" / "sub"), "notes.txt is not a directory", capsys,
            user, base["root"])


def unwritable_root() -> Path:
    import tempfile

    try:
        fd, p = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(p)
    pytest.skip("/sys is writable here: no unwritable location to test against")


@pytest.mark.parametrize("command", ["export", "calibrate", "build", "kernels"])
def test_out_not_writable(command, base, capsys):
    refused(OUTPUT_COMMANDS[command](base, unwritable_root() / "shrinkrt-out"), "is not writable", capsys, base["root"])


def test_eval_out_not_writable(base, capsys):
    refused(["eval", "--model", str(base["model"]), "--out", str(unwritable_root() / "ev.json")], "is not writable",
            capsys, base["root"])


def test_calibrate_checks_the_location_before_work(base, user, capsys, monkeypatch):
    """The location fails before the model even loads (it used to fail after minutes of fitting)."""
    import shrinkrt.runtime.loader as loader

    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    refused(OUTPUT_COMMANDS["calibrate"](base, user / "mine"), "refusing to replace it", capsys, user)


def test_export_without_room(base, user, capsys, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1000))
    refused(OUTPUT_COMMANDS["export"](base, user / "exp"), "needs about", capsys, user, base["root"])


def test_calibrate_without_room_for_the_weights(base, user, capsys, monkeypatch):
    import shutil as sh

    import shrinkrt.calib.cskv as cskv

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=100))
    monkeypatch.setattr(cskv, "calibrate_kv", lambda *a, **k: pytest.fail("calibrated before the space check"))
    refused(["calibrate", "--model", str(base["model"]), "--kv-ratio", "0.5", "--weight-budget", "4bpw",
             "--out", str(user / "ck"), "--quiet"], "needs about", capsys, user, base["root"])


def test_disk_full_while_writing(base, capsys, monkeypatch, tmp_path):
    """A write that fails half-way (ENOSPC) ends in one line; the earlier checkpoint stays whole."""
    import errno

    import shrinkrt.calib.checkpoint as checkpoint

    ck = copy(base["ck"], tmp_path / "ck")

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "save_file", full)
    refused(["calibrate", "--model", str(base["model"]), "--kv-ratio", "0.5", "--window", "4", "--kv-bits", "8",
             "--calib-tokens", "256", "--kv-fit-steps", "1", "--out", str(ck), "--quiet"], "No space left on device",
            capsys, tmp_path)
    no_temps(tmp_path)


def test_failed_build_leaves_nothing(base, tmp_path, capsys, monkeypatch):
    """The export and the engine appear together: a failed engine build leaves no export behind."""
    from shrinkrt.errors import ShrinkError
    from shrinkrt.export import trt_build

    def fail(*a, **k):
        raise ShrinkError("build: TensorRT failed to build the engine (see the log above)")

    monkeypatch.setattr(trt_build, "build", fail)
    refused(OUTPUT_COMMANDS["build"](base, tmp_path / "deep" / "b"), "failed to build the engine", capsys, tmp_path)
    assert not (tmp_path / "deep").exists()  # parents it created are gone too


def test_replacing_an_earlier_export_keeps_it_whole_until_done(base, tmp_path, capsys, monkeypatch):
    """An existing export (ours) is replaced, but only once the new one is complete."""
    from shrinkrt.export import artifact

    exp = copy(base["exp"], tmp_path / "exp")
    old = tree(exp)
    seen = {}
    real = artifact.write

    def spy(lm, directory, *a, **k):
        seen["old_still_there"] = tree(exp) == old
        return real(lm, directory, *a, **k)

    monkeypatch.setattr(artifact, "write", spy)
    assert main(["export", "--model", str(base["model"]), "--out", str(exp), "--no-validate", "--target",
                 "ort-cpu"]) == 0
    assert seen["old_still_there"] and json.loads((exp / "export.json").read_text())["target"] == "ort-cpu"
    no_temps(tmp_path)


def test_an_empty_folder_is_taken(base, tmp_path):
    (tmp_path / "exp").mkdir()
    assert main(OUTPUT_COMMANDS["export"](base, tmp_path / "exp")) == 0
    assert (tmp_path / "exp" / "model.onnx").is_file()


# ---------------------------------------------------------------- results files
def test_eval_out_md_is_refused(base, user, capsys):
    """The markdown report used to be written over the JSON named .md."""
    refused(["eval", "--model", str(base["model"]), "--out", str(user / "ev.md")], "must end in .json", capsys, user)


def test_eval_out_is_a_users_json(base, user, capsys):
    (user / "data.json").write_text('{"mine": 1}')
    refused(["eval", "--model", str(base["model"]), "--out", str(user / "data.json")],
            "exists and was not written by shrinkrt", capsys, user)


def test_eval_markdown_beside_is_a_users_file(base, user, capsys):
    (user / "report.md").write_text("# my report")
    refused(["eval", "--model", str(base["model"]), "--out", str(user / "report.json")],
            "report.md exists and was not written by shrinkrt", capsys, user)


def test_eval_out_is_a_directory(base, user, capsys):
    refused(["eval", "--model", str(base["model"]), "--out", str(user / "mine")], "is a directory", capsys, user)


def test_profile_out_png_is_a_users_file(base, user, capsys):
    (user / "prof.png").write_bytes(b"\x89PNG my picture")
    refused(["profile", "--model", str(base["model"]), "--contexts", "64", "--decode-steps", "4",
             "--out", str(user / "prof")], "prof.png exists and was not written by shrinkrt", capsys, user)


# ---------------------------------------------------------------- no code from a model folder
PAYLOAD = "import pathlib; pathlib.Path(__file__).with_name('RAN').write_text('ran')\n"


def ask_for_code(folder: Path, file: str = "tokenizer_config.json") -> Path:
    """Plant a payload and point `file`'s auto_map at it (what a hostile model folder does)."""
    (folder / "evil.py").write_text(PAYLOAD + "class EvilTokenizer: pass\n")
    cfg = json.loads((folder / file).read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / file).write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("file", ["tokenizer_config.json", "config.json"])
def test_remote_code_is_refused(base, tmp_path, capsys, file):
    model = ask_for_code(copy(base["model"], tmp_path / "m"), file)
    refused(["generate", "hi", "--raw", "--model", str(model)], "asks to run custom code", capsys, tmp_path)
    assert not (model / "RAN").exists()


def test_remote_code_in_an_export_is_refused(base, tmp_path, capsys):
    exp = ask_for_code(copy(base["exp"], tmp_path / "exp"))
    refused(["generate", "hi", "--raw", "--backend", "ort", "--model", str(exp)], "asks to run custom code",
            capsys, tmp_path)
    assert not (exp / "RAN").exists()


def test_remote_code_asks_nothing(base, tmp_path):
    """transformers used to ask "run the custom code? [y/N]" (and ran it on 'y'); now nothing is
    asked: the 'y' waiting on stdin is never read and the payload never runs."""
    model = ask_for_code(copy(base["model"], tmp_path / "m"))
    r = subprocess.run([sys.executable, "-m", "shrinkrt.cli", "generate", "hi", "--raw", "--model", str(model)],
                       input="y\n", capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().startswith("shrinkrt: error:") and "custom code" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (model / "RAN").exists()


# ---------------------------------------------------------------- threads, contexts, sizes
def test_absurd_thread_count_does_not_crash():
    """`--threads 100000` used to segfault inside torch (exit 139)."""
    r = run_cli("generate", "hi", "--threads", "100000")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("shrinkrt: error: --threads must be in [0, ") and \
        len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["eval", "generate", "export", "calibrate", "profile", "validate"])
def test_threads_bounded(command, base, tmp_path, capsys):
    args = {"eval": ["eval"], "generate": ["generate", "hi"],
            "export": ["export", "--out", str(tmp_path / "e")],
            "calibrate": ["calibrate", "--kv-ratio", "0.5", "--out", str(tmp_path / "c")],
            "profile": ["profile", "--contexts", "64", "--out", str(tmp_path / "p")],
            "validate": ["validate", str(base["exp"]), "--checkpoint", str(base["ck"])]}[command]
    refused(args + ["--model", str(base["model"]), "--threads", str(10 ** 6)], "--threads must be in [0, ", capsys,
            tmp_path, base["root"])


def test_negative_threads(base, capsys):
    refused(["generate", "hi", "--model", str(base["model"]), "--threads", "-1"], "--threads must be in", capsys)


def test_profile_checks_every_context_first(base, tmp_path, capsys, monkeypatch):
    """A context the model cannot serve fails before the first (costly) measurement."""
    import shrinkrt.runtime.profile as profile

    monkeypatch.setattr(profile, "isolated", lambda *a, **k: pytest.fail("measured before checking contexts"))
    refused(["profile", "--model", str(base["model"]), "--contexts", "64,8192", "--decode-steps", "4",
             "--out", str(tmp_path / "p")], "context 8192 + 4 decode steps + 2 warm-up steps exceed the model's 128 "
            "tokens: the longest context is 122", capsys, tmp_path)


def test_profile_max_context_is_the_longest_that_fits(base, tmp_path, capsys, monkeypatch):
    import shrinkrt.runtime.profile as profile

    seen = []

    def fake(argv, timeout=0):  # the measurement itself is not the point here
        seen.append(argv[-1])
        return {"backend": "shrinkrt-torch", "context": 122, "ttft_s": 0.1, "prefill_tokens_per_s": 1.0,
                "decode_median_ms": 1.0, "decode_p90_ms": 1.0, "decode_tokens_per_s": 1.0, "decode_steps": 4,
                "prefill_chunk": 512, "kv_bytes": 1, "peak_rss_mb": 1.0}

    monkeypatch.setattr(profile, "isolated", fake)
    assert main(["profile", "--model", str(base["model"]), "--contexts", "max", "--decode-steps", "4",
                 "--out", str(tmp_path / "p")]) == 0
    assert seen == ["--context=122"] and (tmp_path / "p.json").is_file()


@pytest.mark.parametrize("args, msg", [
    (["--contexts", "abc"], "--contexts must be comma-separated integers or 'max'"),
    (["--contexts", "32"], "--contexts must be integers >= 64"),
    (["--decode-steps", "2"], "--decode-steps must be >= 4"),
    (["--prefill-chunk", "0"], "--prefill-chunk >= 1"),
    (["--backend", "ort"], "--backend ort needs --model DIR"),
])
def test_profile_options(args, msg, base, tmp_path, capsys):
    model = [] if "ort" in args else ["--model", str(base["model"])]
    refused(["profile", *model, *args, "--out", str(tmp_path / "p")], msg, capsys, tmp_path)


@pytest.mark.parametrize("args, msg", [
    (["--capacity", "0"], "--capacity must be >= 2 tokens"),
    (["--capacity", "100000"], "--capacity 100000 exceeds the model's context of 128 tokens"),
    (["--max-prefill", "0"], "--max-prefill must be >= 1"),
    (["--max-prefill", "100"], "--max-prefill must be in [1, 64]"),
    (["--target", "sm61"], "unknown build target 'sm61'"),
    (["--plugins", "/no/such/lib.so"], "--plugins needs standard TensorRT"),
])
def test_build_options(args, msg, base, tmp_path, capsys):
    refused(["build", "--model", str(base["model"]), "--out", str(tmp_path / "b"), *args], msg, capsys, tmp_path)


@pytest.mark.parametrize("args, msg", [
    (["--kv-ratio", "0"], "--kv-ratio must be in (0, 1]"),
    (["--kv-ratio", "1.5"], "--kv-ratio must be in (0, 1]"),
    (["--kv-ratio", "0.5", "--window", "-1"], "--window must be >= 0"),
    (["--kv-ratio", "0.5", "--window", "1000"], "--window 1000 must be below the model's context of 128"),
    (["--kv-ratio", "0.5", "--kv-fit-steps", "-1"], "--kv-fit-steps must be >= 0"),
    (["--kv-ratio", "0.5", "--calib-tokens", "10"], "--calib-tokens must be >= 256"),
    ([], "nothing to calibrate"),
    (["--weight-budget", "3 apples"], "weight budget '3 apples' is not understood"),
    (["--weight-budget", "4bpw", "--weight-bits", "5"], "unknown bit width 5"),
    (["--weight-budget", "4bpw", "--weight-bits", "4,x"], "--weight-bits must be comma-separated integers"),
    (["--weight-budget", "4bpw", "--outlier-fraction", "0.9"], "outlier"),
])
def test_calibrate_options(args, msg, base, tmp_path, capsys):
    refused(["calibrate", "--model", str(base["model"]), "--out", str(tmp_path / "c"), "--quiet", *args], msg,
            capsys, tmp_path)


def test_calibrate_refuses_factors_the_cache_cannot_hold(tmp_path, capsys):
    """Degenerate activations (a tokenizer that maps the calibration text to <unk> only) made CSKV's
    whitening explode at this shape: the factors were written with NaN and the model produced NaN.
    Now the run stops with one line and writes nothing."""
    m = tmp_path / "m"
    tiny_hf_model("llama", attention_bias=True, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=192, max_position_embeddings=256).save_pretrained(m)
    word_tokenizer(m)
    refused(["calibrate", "--model", str(m), "--kv-ratio", "0.5", "--window", "16", "--kv-bits", "4",
             "--calib-tokens", "256", "--kv-fit-steps", "3", "--out", str(tmp_path / "ck"), "--quiet"],
            "unusable factors", capsys, tmp_path)


def test_calibrate_checks_the_weight_budget_before_the_kv_fit(base, tmp_path, capsys, monkeypatch):
    import shrinkrt.calib.cskv as cskv

    monkeypatch.setattr(cskv, "calibrate_kv", lambda *a, **k: pytest.fail("ran the KV fit before the weight checks"))
    refused(["calibrate", "--model", str(base["model"]), "--kv-ratio", "0.5", "--weight-budget", "1bpw",
             "--out", str(tmp_path / "c"), "--quiet"], "is below the floor", capsys, tmp_path)


@pytest.mark.parametrize("args, msg", [
    (["--memory-context", "100000"], "requested lengths exceed the model's context of 128 tokens"),
    (["--context", "0"], "--context must be >= 1"),
    (["--max-segments", "-1"], "--max-segments must be >= 0"),
    (["--passkey-trials", "0"], "--passkey-trials must be >= 1"),
    (["--score-from", "0"], "--score-from must be >= 1"),
    (["--long-context", "1024", "--score-from", "1024"], "--score-from 1024 must be below --long-context 1024"),
    (["--long-context", "4096"], "requested lengths exceed the model's context of 128 tokens"),
])
def test_eval_options(args, msg, base, tmp_path, capsys):
    refused(["eval", "--model", str(base["model"]), "--out", str(tmp_path / "ev.json"), *args], msg, capsys, tmp_path)


def test_eval_text_refused(base, tmp_path, capsys):
    """--text FILE: missing, a folder, not UTF-8, empty, or too short for one segment: one line each."""
    small = ["--context", "32", "--long-context", "96", "--score-from", "48", "--passkey-lengths", "64",
             "--memory-context", "100"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "short.txt").write_text(" ".join(f"w{i}" for i in range(40)))
    (tmp_path / "folder").mkdir()
    for name, msg in [("nothere.txt", "nothere.txt: no such file"), ("folder", "folder is not a file"),
                      ("latin1.txt", "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
                      ("blank.txt", "blank.txt holds no text"),
                      ("short.txt", "short.txt encodes to 40 tokens with this model's tokenizer: too short for one "
                                    "segment (needs >= 49")]:
        refused(["eval", "--model", str(base["model"]), "--text", str(tmp_path / name), *small,
                 "--out", str(tmp_path / "ev.json")], msg, capsys, tmp_path)


def test_kernels_arch(tmp_path, capsys):
    refused(["kernels", "--out", str(tmp_path / "k"), "--arch", "60"], "--arch must be >= 75", capsys, tmp_path)


# ---------------------------------------------------------------- corrupt model folders
def corrupt_model(base, tmp_path, how):
    m = copy(base["model"], tmp_path / "m")
    w = m / "model.safetensors"
    if how == "truncated weights":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "garbled weights":
        w.write_bytes(os.urandom(4096))
    elif how == "empty weights":
        w.write_bytes(b"")
    elif how == "index without weight_map":
        (m / "model.safetensors.index.json").write_text('{"metadata": {}}')
    elif how == "index escaping the folder":
        (m / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    elif how == "index not JSON":
        (m / "model.safetensors.index.json").write_text("{weight_map")
    elif how == "config not JSON":
        (m / "config.json").write_text("{not json")
    elif how == "config a list":
        (m / "config.json").write_text("[1, 2]")
    elif how.startswith("config "):
        key, value = how.split()[1].split("=")
        cfg = json.loads((m / "config.json").read_text())
        cfg[key] = json.loads(value)
        (m / "config.json").write_text(json.dumps(cfg))
    elif how == "tokenizer garbled":
        (m / "tokenizer.json").write_text("{garbled")
    elif how == "chat template broken":
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }"
        (m / "tokenizer_config.json").write_text(json.dumps(cfg))
        (m / "chat_template.jinja").unlink(missing_ok=True)
    return m


@pytest.mark.parametrize("how, msg", [
    ("truncated weights", "model.safetensors is not a readable safetensors file"),
    ("garbled weights", "model.safetensors is not a readable safetensors file"),
    ("empty weights", "model.safetensors is not a readable safetensors file"),
    ("index without weight_map", "has no valid 'weight_map'"),
    ("index escaping the folder", "has no valid 'weight_map'"),
    ("index not JSON", "model.safetensors.index.json is not valid JSON"),
    ("config not JSON", "config.json is not valid JSON"),
    ("config a list", "config.json must hold a JSON object"),
    ("config hidden_size=0", "hidden_size must be a positive integer (got 0)"),
    ("config num_attention_heads=0", "num_attention_heads must be a positive integer (got 0)"),
    ("config hidden_size=\"abc\"", "hidden_size must be a positive integer (got 'abc')"),
    ("config num_key_value_heads=3", "is not a multiple of n_kv_heads=3"),
    ("config model_type=\"gpt2\"", "model type 'gpt2' is not supported"),
    ("tokenizer garbled", "the tokenizer cannot be loaded"),
])
def test_corrupt_model_folder(how, msg, base, tmp_path, capsys):
    m = corrupt_model(base, tmp_path, how)
    refused(["generate", "hi", "--raw", "--model", str(m)], msg, capsys, tmp_path)


def test_broken_chat_template(base, tmp_path, capsys):
    m = corrupt_model(base, tmp_path, "chat template broken")
    refused(["generate", "hi", "--model", str(m)], "the model's chat template fails", capsys, tmp_path)


def test_corrupt_gguf(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + os.urandom(200))
    refused(["generate", "hi", "--model", str(tmp_path / "m.gguf")], "is not a readable GGUF file", capsys, tmp_path)


def test_model_file_not_gguf(user, capsys):
    refused(["generate", "hi", "--model", str(user / "notes.txt")], "is not a .gguf file", capsys, user)


# ---------------------------------------------------------------- corrupt checkpoints
def edit_manifest(ck: Path, edit) -> None:
    m = json.loads((ck / "manifest.json").read_text())
    edit(m)
    (ck / "manifest.json").write_text(json.dumps(m))


def set_layer0(key, value):
    return lambda m: m["kv"]["layers"][0].__setitem__(key, value)


@pytest.mark.parametrize("how, msg", [
    ("truncated tensors", "tensors.safetensors is not a readable safetensors file"),
    ("manifest not JSON", "manifest.json is not valid JSON"),
    ("manifest a list", "is not a ShrinkRT checkpoint"),
    ("window -1", "window must be an integer in [0, 128] (got -1)"),
    ("window text", "window must be an integer in [0, 128] (got 'x')"),
    ("sinks -2", "sinks must be an integer in [0, 128] (got -2)"),
    ("rank 0", "layer 0 rank_k must be an integer in [1, 32] (got 0)"),
    ("rank text", "layer 0 rank_v must be an integer in [1, 32] (got 'x')"),
    ("bits 3", "does not describe a CSKV cache"),
    ("tensors spec malformed", "'tensors' must map each name to its dtype and shape"),
    ("section not an object", "section 'kv' must be an object"),
    ("weights bits 5", "unsupported bits 5"),
    ("another base model", "was calibrated on another base model"),
])
def test_corrupt_checkpoint(how, msg, base, tmp_path, capsys):
    ck = copy(base["ck"], tmp_path / "ck")
    if how == "truncated tensors":
        t = ck / "tensors.safetensors"
        t.write_bytes(t.read_bytes()[: t.stat().st_size // 3])
    elif how == "manifest not JSON":
        (ck / "manifest.json").write_text("{oops")
    elif how == "manifest a list":
        (ck / "manifest.json").write_text("[]")
    elif how == "window -1":
        edit_manifest(ck, lambda m: m["kv"].__setitem__("window", -1))
    elif how == "window text":
        edit_manifest(ck, lambda m: m["kv"].__setitem__("window", "x"))
    elif how == "sinks -2":
        edit_manifest(ck, lambda m: m["kv"].__setitem__("sinks", -2))
    elif how == "rank 0":
        edit_manifest(ck, set_layer0("rank_k", 0))
    elif how == "rank text":
        edit_manifest(ck, set_layer0("rank_v", "x"))
    elif how == "bits 3":
        edit_manifest(ck, lambda m: m["kv"].__setitem__("bits", 3))
    elif how == "tensors spec malformed":
        edit_manifest(ck, lambda m: m.__setitem__("tensors", {"a": 1}))
    elif how == "section not an object":
        edit_manifest(ck, lambda m: m.__setitem__("kv", [1]))
    elif how == "weights bits 5":
        edit_manifest(ck, lambda m: m["weights"]["layers"][0].__setitem__("bits", 5))
    elif how == "another base model":
        edit_manifest(ck, lambda m: m["base_model"].__setitem__("weights_sha256", "0" * 64))
    refused(["generate", "hi", "--raw", "--model", str(base["model"]), "--checkpoint", str(ck)], msg, capsys,
            tmp_path, base["root"])


def test_checkpoint_is_a_file(base, user, capsys):
    refused(["generate", "hi", "--model", str(base["model"]), "--checkpoint", str(user / "notes.txt")],
            "is not a directory", capsys, user)


# ---------------------------------------------------------------- corrupt exports and builds
@pytest.mark.parametrize("how, msg", [
    ("truncated model.onnx", "does not match the sha256 in export.json"),
    ("export.json not JSON", "export.json is not valid JSON"),
    ("export.json a list", "unsupported export format"),
    ("model_args missing", "model_args is missing or malformed"),
    ("model_args wrong", "model_args is missing or malformed"),
    ("no export.json", "is not a ShrinkRT export"),
    ("io missing", "'io' is missing or not version 1"),
    ("io malformed", "io cache 0 (win_k.0) is not a valid cache tensor"),
    ("tokenizer garbled", "the tokenizer cannot be loaded"),
])
def test_corrupt_export(how, msg, base, tmp_path, capsys):
    exp = copy(base["exp"], tmp_path / "exp")
    meta = json.loads((exp / "export.json").read_text())
    if how == "truncated model.onnx":
        m = exp / "model.onnx"
        m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    elif how == "export.json not JSON":
        (exp / "export.json").write_text("{garbled")
    elif how == "export.json a list":
        (exp / "export.json").write_text("[]")
    elif how == "model_args missing":
        meta.pop("model_args")
        (exp / "export.json").write_text(json.dumps(meta))
    elif how == "model_args wrong":
        meta["model_args"]["no_such_field"] = 1
        (exp / "export.json").write_text(json.dumps(meta))
    elif how == "io missing":
        meta.pop("io")
        (exp / "export.json").write_text(json.dumps(meta))
    elif how == "io malformed":
        meta["io"]["caches"][0]["update"] = "rows"  # the window ring has no capacity axis to write rows along
        (exp / "export.json").write_text(json.dumps(meta))
    elif how == "no export.json":
        (exp / "export.json").unlink()
    elif how == "tokenizer garbled":
        (exp / "tokenizer.json").write_text("{garbled")
    refused(["generate", "hi", "--raw", "--backend", "ort", "--model", str(exp)], msg, capsys, tmp_path)


def test_validate_truncated_model(base, tmp_path, capsys):
    exp = copy(base["exp"], tmp_path / "exp")
    m = exp / "model.onnx"
    m.write_bytes(m.read_bytes()[:1000])
    refused(["validate", str(exp), "--model", str(base["model"]), "--checkpoint", str(base["ck"])],
            "does not match the sha256", capsys, tmp_path)


def test_trt_build_json_garbled(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the engine itself is loaded (tests/gpu)")
    (tmp_path / "build.json").write_text("{garbled")
    refused(["generate", "hi", "--backend", "trt", "--model", str(tmp_path)], "build.json", capsys, tmp_path)


def test_plugin_library_not_a_library(base, user, capsys):
    """A plugin path that is not a TensorRT plugin library is named before any export work."""
    from shrinkrt.errors import ShrinkError
    from shrinkrt.export import trt_build

    class FakeRegistry:
        def load_library(self, path):
            raise RuntimeError(f"{path}: invalid ELF header")

    class FakeTrt:
        __name__ = "tensorrt"

        @staticmethod
        def get_plugin_registry():
            return FakeRegistry()

    with pytest.raises(ShrinkError, match="TensorRT cannot load the plugin library .*notes.txt .*invalid ELF header"):
        trt_build.check_plugins(FakeTrt(), user / "notes.txt")


# ---------------------------------------------------------------- interruption and concurrency
def test_sigint_mid_export_keeps_the_old_export(base, tmp_path):
    """Ctrl-C while the new export is half written (model.onnx done, validation running): exit 130,
    one line, the earlier export untouched, no temp folder left."""
    exp = copy(base["exp"], tmp_path / "exp")
    old = tree(exp)
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import sys, time, pathlib
        import shrinkrt.cli as cli
        def slow(path, lm, threads):
            assert (path / "model.onnx").is_file()
            pathlib.Path({str(ready)!r}).write_text(str(path))
            time.sleep(120)
        cli.run_validation = slow
        sys.exit(cli.main(["export", "--model", {str(base["model"])!r}, "--out", {str(exp)!r}, "--target", "ort-cpu"]))
    """)
    # a shell without job control starts background jobs with SIGINT ignored, and Python then keeps it
    # ignored: the child gets the default action back, as a user's terminal gives it
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not ready.exists():
        assert p.poll() is None and time.time() - t0 < 240, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.1)
    assert Path(ready.read_text()).is_dir()  # the half-written export exists, as a temp sibling
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().splitlines() == ["shrinkrt: interrupted (partial output removed)"], err
    assert tree(exp) == old
    no_temps(tmp_path)


def test_sigterm_mid_calibration_leaves_nothing(base, tmp_path):
    ready, out = tmp_path / "ready", tmp_path / "ck"
    script = textwrap.dedent(f"""
        import sys, time, pathlib
        import shrinkrt.calib.checkpoint as checkpoint
        real = checkpoint.save_file
        def slow(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            pathlib.Path({str(ready)!r}).write_text("x")
            time.sleep(120)
        checkpoint.save_file = slow
        import shrinkrt.cli as cli
        sys.exit(cli.main(["calibrate", "--model", {str(base["model"])!r}, "--kv-ratio", "0.5", "--window", "4",
                           "--kv-bits", "8", "--calib-tokens", "256", "--kv-fit-steps", "1", "--out", {str(out)!r}, "--quiet"]))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    t0 = time.time()
    while not ready.exists():
        assert p.poll() is None and time.time() - t0 < 240, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.1)
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "shrinkrt: interrupted" in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ready"]


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from shrinkrt.atomic import write_dir
    target, me, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    def fill(tmp):
        for i in range(20):
            (tmp / f"part{i}").write_text(me)
            time.sleep(0.01)
        (tmp / "manifest.json").write_text('{"writer": "%s"}' % me)
    write_dir(target, fill, lambda p: (p / "manifest.json").is_file())
""")


def test_two_writers_racing_on_one_path(tmp_path):
    """Both complete; what is left is wholly one writer's artifact; no temp left."""
    target, go = tmp_path / "art", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), name, str(go)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for name in ("A", "B")]
    time.sleep(1.0)
    go.write_text("go")
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    writer = json.loads((target / "manifest.json").read_text())["writer"]
    assert {(target / f"part{i}").read_text() for i in range(20)} == {writer}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art", "go"]


def test_a_users_folder_appearing_during_the_write_is_kept(tmp_path):
    """Checked again at the swap: a folder that appeared meanwhile and is not ours stays."""
    from shrinkrt.atomic import write_dir
    from shrinkrt.errors import ShrinkError

    target = tmp_path / "art"

    def fill(tmp):
        (tmp / "manifest.json").write_text("{}")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")

    with pytest.raises(ShrinkError, match="appeared meanwhile"):
        write_dir(target, fill, lambda p: (p / "manifest.json").is_file())
    assert (target / "theirs.txt").read_text() == "theirs" and sorted(os.listdir(target)) == ["theirs.txt"]
    no_temps(tmp_path)


def test_temp_of_a_killed_run_is_swept(tmp_path):
    """A SIGKILLed writer cannot clean up; the next write to the same path removes its temp."""
    from shrinkrt.atomic import TMP_TAG, write_dir

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that is gone
    stale = tmp_path / f".art{TMP_TAG}{p.pid}-abcd"
    stale.mkdir()
    (stale / "half").write_text("x")
    write_dir(tmp_path / "art", lambda tmp: (tmp / "f").write_text("ok"))
    assert sorted(os.listdir(tmp_path)) == ["art"]
