"""The fixed evaluation/calibration split of the license texts."""
import pytest

from shrinkrt.errors import ShrinkError
from shrinkrt.evaluate import corpus


def ngrams(words, n=13):
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_split_is_disjoint_by_file():
    assert not set(corpus.EVAL_FILES) & set(corpus.CALIB_FILES)


def test_eval_text_barely_overlaps_calibration_text():
    ev, ca = corpus.eval_text().split(), corpus.calib_text().split()
    assert len(ev) > 7000 and len(ca) > 7000
    shared = ngrams(ev) & ngrams(ca)
    # Only generic legal phrasing is shared (measured: 0.23% of 13-word spans).
    assert len(shared) / len(ngrams(ev)) < 0.005


def test_digest_is_stable_and_content_addressed():
    assert corpus.digest(corpus.eval_text()) == corpus.digest(corpus.eval_text())
    assert corpus.digest("a") != corpus.digest("b")


def test_missing_text_is_a_clear_error(tmp_path):
    with pytest.raises(ShrinkError, match="evaluation text .*GPL-3 is missing"):
        corpus.read_texts(("GPL-3",), root=tmp_path)


def test_other_domain_text_is_long_and_shares_nothing_with_calibration():
    other = corpus.other_domain_text()
    assert other == corpus.other_domain_text()  # fixed order: the same digest every run
    words, ca = other.split(), corpus.calib_text().split()
    assert len(words) > 50_000  # enough for many 4096-token segments
    assert "def" in words and "Python" in words  # it is the Python reference
    shared = ngrams(words) & ngrams(ca)
    assert len(shared) / len(ngrams(words)) < 0.001


def test_code_calibration_text_shares_nothing_with_either_evaluation_text():
    code = corpus.code_text().split()
    assert len(code) > 20_000 and "def" in code and "return" in code
    grams = ngrams(code)
    for other in (corpus.eval_text().split(), corpus.other_domain_text().split()):
        assert len(grams & ngrams(other)) / len(grams) < 0.001


def test_calibration_tokens_alternate_domains_piece_by_piece():
    def encode(text):  # one id per character: offsets in the result map back to the texts
        return [ord(c) for c in text]
    sources = corpus.calib_sources()
    tokens, record = corpus.calib_tokens(encode, 1000, 300)
    assert len(tokens) == 1000
    lic, code = encode(sources["licenses"]["text"]), encode(sources["code"]["text"])
    assert tokens[:300] == lic[:300] and tokens[300:600] == code[:300]
    assert tokens[600:900] == lic[300:600] and tokens[900:] == code[300:400]
    assert [(d["name"], d["tokens"]) for d in record["domains"]] == [("licenses", 600), ("code", 400)]
    assert record["domains"][1]["text_sha256"] == corpus.digest(sources["code"]["text"])
    one, rec = corpus.calib_tokens(encode, 500, 300, ("code",))
    assert one == code[:500] and rec["domains"][0]["tokens"] == 500


def test_calibration_domains_are_checked():
    with pytest.raises(ShrinkError, match="calibration domains must be among licenses, code .got news"):
        corpus.calib_tokens(list, 10, 5, ("news",))
