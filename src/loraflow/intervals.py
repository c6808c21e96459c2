"""Paired bootstrap intervals of tuned - base differences, over items that carry all their seeds.

    from loraflow import intervals

    # scores per item, shape (items, seeds); answers per seed, lists over items
    point, low, high = intervals.mean_delta_interval(base_scores, tuned_scores)
    point, low, high = intervals.corpus_bleu_delta_interval(base_answers, tuned_answers, references)
    std = intervals.std_over_seeds(per_seed_values)

Each resample is computed with the point estimate's own statistic: the mean of per-item scores, or
corpus BLEU (from summed sentence statistics) for ``sacrebleu``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np


def clip_bleu(value: float, high: float) -> float:
    """Clamp float noise (e.g. BLEU 100.00000000000004) into [0, high]."""
    return min(max(float(value), 0.0), high)


# --- paired bootstrap over items ---------------------------------------------


class DeltaInterval(NamedTuple):
    """A tuned - base difference and its bootstrap interval, with ``low <= point <= high``."""

    point: float
    low: float
    high: float


def mean_delta_interval(
    base_scores,
    tuned_scores,
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> DeltaInterval:
    """Paired percentile bootstrap of the mean per-item score difference, over items and seeds.

    Items are the resampled unit: each resample draws items with replacement and
    every drawn item brings its base and tuned scores of every seed. The
    statistic is the point estimate's: the mean over seeds of the mean over items
    of ``tuned - base``. Pooling item x seed pairs as independent draws instead
    would shrink the interval by about sqrt(seeds) when the seeds of an item agree.

    Args:
        base_scores: Per-item scores, shape ``(items,)`` (one seed) or ``(items, seeds)``.
        tuned_scores: The tuned model's scores, same shape and order.
        samples: Number of bootstrap resamples.
        seed: Seed of the resampling generator.
        confidence: Coverage of the percentile interval.

    Returns:
        ``DeltaInterval(point, low, high)``; report ``point`` as the delta.
        The bounds are widened to include ``point`` if needed, since a delta outside
        its own interval is meaningless: for the mean only float rounding can put it
        outside (a constant shift), for corpus BLEU the percentiles can truly miss it
        (see :func:`corpus_bleu_delta_interval`).

    Raises:
        ValueError: On misshapen, empty or non-finite scores, or invalid samples/confidence.
    """
    import numpy as np

    base, tuned = _score_matrices(base_scores, tuned_scores)
    _check_bootstrap_args(samples, confidence)
    point = float(np.mean(tuned.mean(axis=0) - base.mean(axis=0)))
    # The statistic is linear, so averaging the seeds of each item first is exact.
    item_deltas = (tuned - base).mean(axis=1)
    resampled = item_deltas[_resampled_items(len(item_deltas), samples, seed)].mean(axis=1)
    return _percentile_interval(point, resampled, confidence)


def paired_bootstrap_interval(
    base_scores, tuned_scores, *, samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """``(low, high)`` of :func:`mean_delta_interval`; 1-D scores are one seed."""
    _, low, high = mean_delta_interval(
        base_scores, tuned_scores, samples=samples, seed=seed, confidence=confidence
    )
    return low, high


def corpus_bleu_delta_interval(
    base_answers: list[list[str]],
    tuned_answers: list[list[str]],
    references: list[str],
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> DeltaInterval:
    """Paired percentile bootstrap of the corpus BLEU difference, over items and seeds.

    Same resampling as :func:`mean_delta_interval` (the same ``seed`` draws the same
    items), but each resample's statistic is the mean over seeds of
    ``corpus_bleu(tuned) - corpus_bleu(base)`` on the drawn items, computed from
    sacrebleu's per-sentence sufficient statistics summed over the draw.

    Args:
        base_answers: Base model answers, a list over seeds of lists over items.
        tuned_answers: Tuned model answers, same layout.
        references: One reference per item.
        samples: Number of bootstrap resamples.
        seed: Seed of the resampling generator.
        confidence: Coverage of the percentile interval.

    Returns:
        ``DeltaInterval(point, low, high)``; ``point`` is the mean over seeds of the
        :func:`corpus_bleu` differences. Corpus BLEU is not linear in the items, so
        the percentile interval can exclude it (e.g. answers half too long and half
        too short score best on the full set, where the lengths balance and the
        brevity penalty vanishes); the bounds are then widened to include it.

    Raises:
        ValueError: On misaligned or empty answers, or invalid samples/confidence.
    """
    import numpy as np

    _check_answer_layout(base_answers, tuned_answers, references)
    _check_bootstrap_args(samples, confidence)
    # (seeds, items, statistics) for each side
    base, tuned = (
        np.array([bleu_sentence_statistics(answers, references) for answers in side])
        for side in (base_answers, tuned_answers)
    )
    per_seed = corpus_bleu_from_statistics(tuned.sum(axis=1)) - corpus_bleu_from_statistics(base.sum(axis=1))
    point = float(np.mean(per_seed))
    resampled = _resampled_bleu_deltas(base, tuned, _resampled_items(len(references), samples, seed))
    return _percentile_interval(point, resampled, confidence)


def _resampled_bleu_deltas(base, tuned, indices):
    """Per resample (a row of `indices`), the mean over seeds of corpus BLEU tuned - base on the drawn items, from
    (seeds, items, statistics) arrays."""
    import numpy as np

    samples, items = indices.shape[0], base.shape[1]
    # How often each item is drawn per resample: summing statistics becomes a matmul.
    draws = np.zeros((samples, items), dtype=np.int64)
    np.add.at(draws, (np.arange(samples)[:, None], indices), 1)
    return np.mean(
        [corpus_bleu_from_statistics(draws @ t) - corpus_bleu_from_statistics(draws @ b) for b, t in zip(base, tuned)],
        axis=0,
    )


def corpus_bleu_interval(
    base_answers: list[list[str]],
    tuned_answers: list[list[str]],
    references: list[str],
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """``(low, high)`` of :func:`corpus_bleu_delta_interval`."""
    _, low, high = corpus_bleu_delta_interval(
        base_answers, tuned_answers, references, samples=samples, seed=seed, confidence=confidence
    )
    return low, high


def std_over_seeds(values) -> float:
    """Sample standard deviation (ddof=1) of per-seed values; 0.0 for a single seed.

    Raises:
        ValueError: On no values.
    """
    import numpy as np

    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError("cannot compute a standard deviation over zero seeds")
    return float(array.std(ddof=1)) if array.size > 1 else 0.0


def bleu_sentence_statistics(predictions: list[str], references: list[str]) -> list[list[int]]:
    """Per-item BLEU sufficient statistics: ``[hyp_len, ref_len, correct 1..4, total 1..4]``.

    Summed over items and passed to :func:`corpus_bleu_from_statistics`, they give exactly
    :func:`corpus_bleu` of those items.
    """
    from sacrebleu.metrics import BLEU

    # sacrebleu's own bootstrap reads these with the private _extract_corpus_statistics;
    # the public sentence_score runs that same code on one sentence and returns the
    # counts, totals and lengths. effective_order=True only silences its warning
    # about sentence-level BLEU: it changes the score, not the statistics.
    metric = BLEU(effective_order=True)
    stats = []
    for prediction, reference in zip(predictions, references):
        score = metric.sentence_score(prediction, [reference])
        stats.append([score.sys_len, score.ref_len, *score.counts, *score.totals])
    return stats


def corpus_bleu_from_statistics(summed_stats) -> np.ndarray:
    """Corpus BLEU, as :func:`corpus_bleu` computes it, of each row of summed sentence statistics.

    Args:
        summed_stats: :func:`bleu_sentence_statistics` rows summed over a multiset of
            items, shape ``(10,)`` or ``(rows, 10)``.

    Returns:
        One BLEU in [0, 100] per row.
    """
    import numpy as np
    from sacrebleu.metrics import BLEU

    corpus = BLEU()  # the settings of sacrebleu.corpus_bleu's defaults
    order = corpus.max_ngram_order
    return np.array([
        clip_bleu(
            BLEU.compute_bleu(
                row[2 : 2 + order], row[2 + order :], row[0], row[1],
                smooth_method=corpus.smooth_method, smooth_value=corpus.smooth_value,
                effective_order=corpus.effective_order, max_ngram_order=order,
            ).score,
            100.0,
        )
        for row in np.asarray(summed_stats, dtype=np.int64).reshape(-1, 2 + 2 * order).tolist()
    ])


def _resampled_items(items: int, samples: int, seed: int) -> np.ndarray:
    """``(samples, items)`` item indices drawn with replacement."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, items, size=(samples, items))


def _percentile_interval(point: float, resampled: np.ndarray, confidence: float) -> DeltaInterval:
    """Percentile bounds of ``resampled``, widened to include ``point``."""
    import numpy as np

    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return DeltaInterval(point, min(float(low), point), max(float(high), point))


def _score_matrices(base_scores, tuned_scores) -> tuple[np.ndarray, np.ndarray]:
    """Both score arrays as finite ``(items, seeds)`` float matrices of the same shape."""
    import numpy as np

    base = np.asarray(base_scores, dtype=float)
    tuned = np.asarray(tuned_scores, dtype=float)
    if base.shape != tuned.shape or base.ndim not in (1, 2) or base.size == 0:
        raise ValueError(
            f"need equal, non-empty (items,) or (items, seeds) scores (got shapes {base.shape} and {tuned.shape})"
        )
    if not (np.isfinite(base).all() and np.isfinite(tuned).all()):
        raise ValueError("scores must be finite")
    return (base[:, None], tuned[:, None]) if base.ndim == 1 else (base, tuned)


def _check_answer_layout(base_answers, tuned_answers, references) -> None:
    """Raise ValueError unless both sides have the same seeds, each with one answer per reference."""
    if not references or not base_answers or len(base_answers) != len(tuned_answers):
        raise ValueError(
            f"need references and equal, non-zero numbers of seeds "
            f"(got {len(references)} references, {len(base_answers)} and {len(tuned_answers)} seeds)"
        )
    lengths = {len(answers) for answers in [*base_answers, *tuned_answers]}
    if lengths != {len(references)}:
        raise ValueError(f"every seed needs {len(references)} answers, one per reference (got {sorted(lengths)})")


def _check_bootstrap_args(samples: int, confidence: float) -> None:
    if samples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need samples >= 1 and 0 < confidence < 1 (got {samples}, {confidence})")
