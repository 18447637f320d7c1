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
