"""The command line: one clear error line and a non-zero exit on bad input, traceback only with --debug."""
import json
import subprocess
import sys

import pytest

from shrinkrt.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "shrinkrt.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, msg", [
    (["generate", "hi", "--model", "/no/such/dir"], "model path '/no/such/dir' does not exist"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "hi", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["generate", "hi", "--top-k", "-3"], "top-k must be >= 0"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "hi", "--device", "tpu"], "unknown device 'tpu'"),
    (["eval", "--passkey-lengths", "1k"], "--passkey-lengths must be comma-separated integers"),
])
def test_bad_input_is_one_line(args, msg):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shrinkrt: error: {msg}"), r.stderr


def test_debug_shows_traceback():
    r = run("--debug", "generate", "hi", "--model", "/no/such/dir")
    assert r.returncode != 0 and "Traceback" in r.stderr and "does not exist" in r.stderr


def test_prompt_longer_than_context(tiny_dir, capsys):
    code = main(["generate", " ".join(["w5"] * 200), "--raw", "--model", str(tiny_dir)])
    assert code == 2
    assert "the prompt has 200 tokens; the model's context is 128" in capsys.readouterr().err


def test_generate_streams_to_stdout(tiny_dir, capsys):
    assert main(["generate", "w1 w2 w3", "--raw", "--model", str(tiny_dir), "--max-new-tokens", "5", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 5 and all(w.startswith("w") or w in ("<unk>", "<s>") for w in out.split())
    assert "prompt 3 tok" in err and "stop: max_new_tokens" in err


def test_help_explains_options():
    r = run("generate", "--help")
    assert r.returncode == 0
    for opt in ("--model", "--temperature", "--top-k", "--top-p", "--seed", "--stop", "--max-new-tokens", "--device"):
        assert opt in r.stdout
