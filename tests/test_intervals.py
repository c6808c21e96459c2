"""Tests for loraflow.intervals: bootstrap intervals over items with all their seeds, by construction."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from loraflow.intervals import (
    bleu_sentence_statistics,
    corpus_bleu_delta_interval,
    corpus_bleu_from_statistics,
    corpus_bleu_interval,
    mean_delta_interval,
    paired_bootstrap_interval,
    std_over_seeds,
)
from loraflow.metrics import corpus_bleu

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


