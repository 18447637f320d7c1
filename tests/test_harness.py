"""The evaluation harness end to end on a tiny model: figures, memory accounting, output files."""
import json

import pytest

from shrinkrt.cli import main
from shrinkrt.evaluate.harness import evaluate, write_results
from shrinkrt.evaluate.memory import fp16_full_kv_bytes
from shrinkrt.evaluate.passkey import score, trials
from shrinkrt.runtime.loader import load


def test_evaluate_reports_consistent_figures(tiny_dir, tmp_path):
    lm = load(str(tiny_dir), progress=False)
    r = evaluate(lm, context=32, max_segments=3, long_context=128, score_from=64, passkey_lengths=(80, 112),
                 passkey_trials=2, memory_context=100, progress=False)
    assert r["perplexity"]["segments"] == 3 and r["perplexity"]["scored_tokens"] == 3 * 31
    assert r["perplexity"]["perplexity"] > 1.0
    assert r["long_context"]["segments"] == 3 and r["long_context"]["scored_tokens"] == 3 * 64
    assert r["long_perplexity"] == r["long_context"]["perplexity"] > 1.0
    assert r["kv_bytes_fraction"] == 2.0  # an FP32 full cache: twice the FP16 reference at any length
    assert len(r["passkey"]["trials"]) == 4 and r["passkey_accuracy"] == r["passkey"]["accuracy"]
    lo, hi = r["passkey_ci95"]
    assert 0.0 <= lo <= r["passkey_accuracy"] <= hi <= 1.0 and hi - lo > 0.3  # 4 trials: a wide interval
    assert r["key_nll"] == pytest.approx(sum(t["key_nll"] for t in r["passkey"]["trials"]) / 4) and r["key_nll"] > 0
    mem = r["memory"]
    # tiny model: 2 layers x (K+V) x 2 kv heads x 16 dims x fp32
    assert mem["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert mem["kv_bytes_at_context"] == 100 * 2 * 2 * 2 * 16 * 4
    assert mem["kv_bytes_fp16_at_context"] == fp16_full_kv_bytes(lm.model.args, 100) == 100 * 2 * 2 * 2 * 16 * 2
    for t in r["passkey"]["trials"]:
        assert t["cache_bytes"] == t["stored_tokens"] * mem["kv_bytes_per_token"]
        assert t["prompt_tokens"] <= t["length"]
        # the word tokenizer reads " 12345" as one <unk>: the prefill alone predicts the whole answer
        assert t["key_tokens"] == 1 and t["stored_tokens"] == t["prompt_tokens"]

    out = tmp_path / "res" / "eval.json"
    write_results(r, out, "shrinkrt eval")
    assert json.loads(out.read_text())["memory"] == mem
    assert "| perplexity" in out.with_suffix(".md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json", "eval.md"]  # no temp files left


def test_passkey_trials_are_seeded():
    assert [t.key for t in trials(seed=3)] == [t.key for t in trials(seed=3)]
    assert [t.key for t in trials(seed=3)] != [t.key for t in trials(seed=4)]
    assert all(len(t.key) == 5 for t in trials(per_cell=5))
    assert len(trials()) == 9 and {t.length for t in trials()} == {1024, 2048, 3072}


@pytest.mark.parametrize("text, ok", [(" 12345.", True), (" 12,345", True), (" 54321", False),
                                      (" the pass key", False), (" 123456", True)])
def test_passkey_scoring(text, ok):
    assert score(text, "12345") is ok


def test_eval_cli_on_a_users_text(tiny_dir, tmp_path, capsys):
    """--text FILE replaces the license texts for both perplexities; the JSON names and hashes it."""
    import hashlib
    import random

    rng = random.Random(0)
    text = " ".join(f"w{rng.randrange(94)}" for _ in range(300)) + "\n"
    f = tmp_path / "mine.txt"
    f.write_text(text, encoding="utf-8")
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(tiny_dir), "--text", str(f), "--context", "32", "--long-context", "128",
                 "--score-from", "48", "--passkey-lengths", "96", "--passkey-trials", "3", "--memory-context", "100",
                 "--out", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["eval_text"] == {"source": str(f), "files": ["mine.txt"], "tokens": 300,
                              "sha256": hashlib.sha256(text.encode()).hexdigest()}
    assert r["perplexity"]["segments"] == 300 // 32 and r["long_context"]["segments"] == 2
    assert r["long_context"]["scored_tokens"] == 2 * (128 - 48)
    for k in ("long_perplexity", "passkey_accuracy", "passkey_ci95", "key_nll", "kv_bytes_fraction"):
        assert k in r
    assert len(r["passkey"]["trials"]) == 3 and "| long perplexity" in capsys.readouterr().out


def test_eval_cli_refuses_lengths_beyond_context(tiny_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(tiny_dir), "--passkey-lengths", "512", "--out", str(out)]) == 2
    assert "exceed the model's context of 128 tokens" in capsys.readouterr().err
    assert not out.exists()


def test_peak_rss_is_the_processs_own():
    """A benchmark worker reports its own peak, not its parent's (Linux carries ru_maxrss across exec)."""
    import subprocess
    import sys

    import numpy as np

    from shrinkrt.runtime.profile import peak_rss_mb

    held = np.ones(200 * 2**20 // 8)  # 200 MB touched by this process
    child = subprocess.run([sys.executable, "-c", "from shrinkrt.runtime.profile import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert peak_rss_mb() >= 200 and float(child.stdout) < 100, (peak_rss_mb(), child.stdout)
    del held
