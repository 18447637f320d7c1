"""`shrinkrt quality`: long-context perplexity of a checkpoint's model (both compressions, and each
alone) as a ratio to the FP model, on a tiny model calibrated by the CLI itself."""
import json

import pytest

from conftest import tiny_hf_model, word_tokenizer
from shrinkrt.cli import main
from shrinkrt.evaluate.perplexity import long_perplexity
from shrinkrt.runtime.loader import load


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    model = root / "tiny"
    tiny_hf_model("llama").save_pretrained(model, safe_serialization=True)
    word_tokenizer(model)
    ck = root / "ck"
    assert main(["calibrate", "--model", str(model), "--kv-ratio", "0.3", "--window", "4", "--kv-bits", "8",
                 "--weight-budget", "4bpw", "--calib-tokens", "256", "--kv-fit-steps", "2", "--out", str(ck),
                 "--quiet"]) == 0
    import random

    rng = random.Random(0)
    text = root / "words.txt"
    text.write_text(" ".join(f"w{rng.randrange(94)}" for _ in range(400)))
    return {"model": model, "ck": ck, "text": text, "root": root}


def test_quality_scores_fp_and_each_compression_on_the_same_tokens(setup, capsys):
    out = setup["root"] / "q.json"
    assert main(["quality", "--model", str(setup["model"]), "--checkpoint", str(setup["ck"]), "--parts",
                 "--text", str(setup["text"]), "--long-context", "96", "--score-from", "32", "--max-segments", "0",
                 "--out", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    (name,) = r["texts"]
    fp = r["texts"][name]["fp"]
    # The FP figure is long_perplexity's own on the text's token ids (4 segments of 96, 64 scored each).
    lm = load(str(setup["model"]), progress=False)
    ids = lm.tokenizer.encode(setup["text"].read_text(), add_special_tokens=False)
    direct = long_perplexity(lm.model, ids, context=96, score_from=32, progress=False)
    assert fp["long_perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert fp["scored_tokens"] == 4 * 64 and fp["kv_bytes_fraction"] == pytest.approx(2.0)  # fp32 cache
    rows = {v["name"]: v["texts"][name] for v in r["variants"]}
    assert list(rows) == ["kv+weights", "kv only", "weights only"]
    for row in rows.values():
        assert row["ratio_to_fp"] == pytest.approx(row["long_perplexity"] / fp["long_perplexity"])
        assert row["long_perplexity"] != pytest.approx(fp["long_perplexity"], rel=1e-6)  # each compression moves it
    # The KV compression alone shrinks the cache; the weights alone leave it as FP's.
    assert rows["kv only"]["kv_bytes_fraction"] < 1.0
    assert rows["kv+weights"]["kv_bytes_fraction"] == pytest.approx(rows["kv only"]["kv_bytes_fraction"])
    assert rows["weights only"]["kv_bytes_fraction"] == pytest.approx(2.0)
    printed = capsys.readouterr().out
    assert "kv+weights" in printed and f"(x{rows['kv+weights']['ratio_to_fp']:.3f})" in printed


@pytest.mark.parametrize("args, message", [
    (["--score-from", "96", "--long-context", "96"], "--score-from must be in"),
    (["--text", "/nonexistent/t.txt"], "--text /nonexistent/t.txt: no such file"),
    (["--out", "q.txt"], "must end in .json"),
    (["--max-segments", "-1"], "--max-segments must be >= 0"),
])
def test_quality_bad_input_is_one_line(setup, capsys, args, message):
    assert main(["quality", "--model", str(setup["model"]), "--checkpoint", str(setup["ck"]), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
