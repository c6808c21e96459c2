"""Training throughput: loraflow's training path vs the plain Hugging Face way, side by side.

    .venv/bin/python benchmarks/bench_train.py [--smoke] [--pairs 5] [--steps 3] [--dtype auto|fp32]
                                              [--variants full_head,no_dropout,no_autocast,
                                              torch_dropout,sdpa_attention,peft_input_cast,own_masks,
                                              peft_forward,shared_head,unfused_head]
                                              [--shape tinyllama-1.1b]   # random weights of that architecture

A = loraflow: models.load_model + models.attach_lora with model.dtype=auto (bf16 weights and bf16
autocast on a CPU with AMX/AVX512-BF16), data.training_examples (completion-only labels) and
training.trainer.build_trainer (dynamic padding, group_by_length, MLflow logging into a throw-away store).
B = the way public notebooks do it: the model in fp32, PEFT LoRA with the same settings, the chat
text tokenised with padding="max_length", DataCollatorForLanguageModeling(mlm=False) (labels =
input_ids with pad masked), a default Trainer. Same model, rows, batch, steps, schedule and seed.

Both arms train one epoch over the same steps x batch training rows (a random sample of the data).
Useful tokens = target (completion) tokens inside max_length, counted the same way for both arms;
training seconds = Trainer.train() wall time minus its evaluation time (loraflow evaluates at the
end of training; the baseline has no evaluation). Loss check: each arm's trained adapter is scored
on the same held-out rows (completion-only loss, fp32), plus each arm's last training loss.
FLOP/s: 4 x N x positions / s, N = weights of every nn.Linear a token passes through (the frozen
base incl. lm_head, counted only at the positions where the head is computed; LoRA training costs forward 2N + activation gradients 2N, no weight gradients
for frozen weights; attention scores and LoRA matrices ignored), as a fraction of the ceiling:
torch.matmul FLOP/s at the model's own GEMM shapes (batch x max_length positions by each linear
layer's in x out features, weighted by how often each occurs), measured after the rounds in each
dtype the CPU runs natively (bf16 only with AMX / AVX512-BF16 and a fast probe), time-boxed.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


class TokenCounter:
    """Wraps a collator and hooks the model: counts label, real and padded tokens of trained batches only.

    The collator notes each batch's counts in a queue; a forward pre-hook takes the oldest one when the
    model runs in training mode. Batches fetched ahead and never trained on (the data loader looks one
    batch ahead) and evaluation batches are not counted.
    """

    def __init__(self, collate, model, target_key: str | None = None):
        self.collate, self.target_key, self.model, self.pending = collate, target_key, model, []
        self.label_tokens = self.real_tokens = self.positions = self.head_positions = 0
        model.register_forward_pre_hook(self.count_trained, with_kwargs=True)

    def __call__(self, features):
        targets = [f.pop(self.target_key) for f in features] if self.target_key else None
        batch = self.collate(features)
        if self.model.training:
            labels = sum(targets) if targets is not None else int((batch["labels"] != -100).sum())
            self.pending.append((labels, int(batch["attention_mask"].sum()), int(batch["input_ids"].numel()),
                                 common.head_positions(batch)))
        return batch

    def count_trained(self, module, args, kwargs):
        if module.training and self.pending:
            labels, real, positions, head = self.pending.pop(0)
            self.label_tokens, self.real_tokens = self.label_tokens + labels, self.real_tokens + real
            self.positions, self.head_positions = self.positions + positions, self.head_positions + head


def linear_weights(model) -> int:
    """Weights of every nn.Linear a token passes through (LoRA matrices excluded)."""
    import torch

    return sum(module.weight.numel() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and "lora_" not in name)


PROBE_SIZE = 256  # a dtype whose 256^3 matmul runs below PROBE_MIN_FLOPS is emulated, not native: not measured
PROBE_MIN_FLOPS = 20e9
CEILING_SECONDS = 60.0  # time box of one dtype's ceiling measurement


def gemm_shapes(model, positions: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of the forward GEMMs of every frozen nn.Linear for a batch of `positions` tokens: the
    model's own shapes (e.g. 1024 x 576 x 1536 for SmolLM2's MLP), with how often each occurs."""
    import collections

    import torch

    counts = collections.Counter((module.in_features, module.out_features) for name, module in model.named_modules()
                                 if isinstance(module, torch.nn.Linear) and "lora_" not in name)
    return [(positions, k, n, count) for (k, n), count in sorted(counts.items())]


def native(dtype) -> bool:
    """Whether this CPU runs `dtype` matmuls natively (fp32 always; bf16 with AMX or AVX512-BF16 and a probe at
    least PROBE_MIN_FLOPS), so a ceiling measurement finishes in seconds and not hours."""
    import torch

    from loraflow import models

    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16 and not models.cpu_has_bf16():
        return False
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, dtype=dtype)
    torch.matmul(a, a)  # the first call also builds the kernel (oneDNN): 1.7 ms against 0.13 ms with AMX
    seconds = min(common.timed(lambda: torch.matmul(a, a))[0] for _ in range(5))
    return 2 * PROBE_SIZE ** 3 / seconds >= PROBE_MIN_FLOPS


def gemm_ceiling(dtype, shapes: list[tuple[int, int, int, int]], budget: float = CEILING_SECONDS) -> dict:
    """FLOP/s of torch.matmul over the model's GEMM shapes in `dtype`, each shape timed (best of 3 after a warm-up)
    and weighted by its count: what the forward's linear layers could reach back to back. Not measured (None)
    where the dtype is not native here or the time box runs out."""
    import time

    import torch

    if not native(dtype):
        return {"flops_per_second": None, "why": f"{dtype} matmul is not native on this CPU: not measured"}
    deadline, total_flops, total_seconds, per_shape = time.monotonic() + budget, 0.0, 0.0, []
    for m, k, n, count in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.matmul(a, b)
        best = min(common.timed(lambda: torch.matmul(a, b))[0] for _ in range(3))
        per_shape.append({"m": m, "k": k, "n": n, "count": count, "flops_per_second": 2 * m * k * n / best})
        total_flops, total_seconds = total_flops + 2 * m * k * n * count, total_seconds + best * count
        if time.monotonic() > deadline:
            return {"flops_per_second": None, "why": f"time box of {budget:g} s passed", "shapes": per_shape}
    return {"flops_per_second": total_flops / total_seconds, "shapes": per_shape}


def train_seconds(trainer, wall: float) -> tuple[float, float]:
    """(training seconds, evaluation seconds) of one Trainer.train() call that took `wall` seconds."""
    evaluation = sum(entry.get("eval_runtime", 0.0) for entry in trainer.state.log_history)
    return wall - evaluation, evaluation


def last_train_loss(trainer) -> float:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1]


def measurement(trainer, counter: TokenCounter, wall: float, setup: float) -> dict:
    seconds, evaluation = train_seconds(trainer, wall)
    return {"train_seconds": seconds, "eval_seconds": evaluation, "setup_seconds": setup,
            "label_tokens": counter.label_tokens, "real_tokens": counter.real_tokens,
            "positions": counter.positions, "tokens_per_second": counter.label_tokens / seconds,
            "positions_per_second": counter.positions / seconds, "real_tokens_per_second": counter.real_tokens / seconds,
            "head_positions_per_second": counter.head_positions / seconds,
            "tokens_per_second_with_eval": counter.label_tokens / wall, "last_train_loss": last_train_loss(trainer)}


def time_mlflow_logging(trainer) -> list:
    """Wrap loraflow's MLflow callback so the seconds its on_log spends are added to the returned cell."""
    spent = [0.0]
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "MlflowMetrics":
            original = callback.on_log

            def on_log(*args, original=original, **kwargs):
                seconds, result = common.timed(lambda: original(*args, **kwargs))
                spent[0] += seconds
                return result
            callback.on_log = on_log
    return spent


def without_autocast(make_arguments):
    """training.trainer.training_arguments with bf16 (autocast) off; the weights stay as load_model made them."""
    def make(cfg, output_dir, bf16):
        return make_arguments(cfg, output_dir, False)
    return make


def loraflow_arm(name: str, cfg, model_path: str, prepared, kept: dict, autocast: bool = True,
                 head_trim: bool = True, sixteen_bit_dropout: bool = True, attention_probe: bool = True,
                 skip_input_casts: bool = True, shared_masks: bool = True, fused_forward: bool = True,
                 per_token_head: bool = True, fused_head_loss: bool = True):
    """One loraflow training run of cfg.train.max_steps steps, through its own code path (with `autocast`,
    `head_trim`, `sixteen_bit_dropout`, `attention_probe`, `skip_input_casts`, `shared_masks`, `fused_forward`,
    `per_token_head` or `fused_head_loss` off: that lever left out)."""
    from unittest import mock

    import mlflow
    import torch

    from loraflow import models
    from loraflow.kernels import fused_lora, head_loss
    from loraflow.training.callback import count_trained_tokens
    from loraflow.training.trainer import build_trainer, training_arguments

    def run() -> dict:
        torch.manual_seed(cfg.train.seed)
        model, tokenizer = models.load_model(cfg, model_path)
        with mock.patch.object(models, "use_sixteen_bit_dropout", models.use_sixteen_bit_dropout
                               if sixteen_bit_dropout else lambda model: 0), \
                mock.patch.object(models, "skip_input_casts_under_autocast", models.skip_input_casts_under_autocast
                                  if skip_input_casts else lambda model: 0), \
                mock.patch.object(fused_lora, "install", fused_lora.install if fused_forward else lambda model: 0), \
                mock.patch.object(head_loss, "install", head_loss.install if fused_head_loss else lambda m, c: False):
            model = models.attach_lora(model, cfg)
        if not shared_masks:
            from loraflow.kernels.dropout import SixteenBitDropout

            for module in model.modules():
                if isinstance(module, SixteenBitDropout):
                    module.shared = None
        attention = models.faster_cpu_attention(model, cfg) if attention_probe else "sdpa"
        output_dir = Path(tempfile.mkdtemp(prefix="bench-loraflow-", dir=cfg.train.output_dir))
        make_arguments = training_arguments if autocast else without_autocast(training_arguments)
        with mock.patch("loraflow.training.trainer.training_arguments", make_arguments), \
                mock.patch.object(models, "takes_logits_to_keep", models.takes_logits_to_keep if head_trim
                                  else lambda model: False), \
                mock.patch.object(models, "head_on_labelled_tokens", models.head_on_labelled_tokens if per_token_head
                                  else lambda model: False):
            setup, trainer = common.timed(lambda: build_trainer(cfg, model, tokenizer, prepared, output_dir))
        counted = {"tokens": 0}
        count_trained_tokens(trainer.model, cfg, counted)
        tokens = trainer.data_collator = TokenCounter(trainer.data_collator, model)
        logging = time_mlflow_logging(trainer)
        with mlflow.start_run():
            wall, _ = common.timed(trainer.train)
        kept[name] = (model, tokenizer)
        return {**measurement(trainer, tokens, wall, setup), "mlflow_logging_seconds": logging[0],
                "attention": attention,
                "train_py_counted_tokens": counted["tokens"]}  # what train.run would log as train/tokens
    return run


def one_epoch_of_rows(prepared, cfg):
    """Keep steps x batch training rows, so both arms train one epoch over exactly the same rows.

    Both then learn the same target tokens; only the order and padding differ (with a longer data
    set, group_by_length would start loraflow on its longest rows and skew a few-step comparison).
    """
    rows = prepared.splits["train"][:cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum]
    return dataclasses.replace(prepared, splits={**prepared.splits, "train": rows})


def epoch_padding(prepared, tokenizer, cfg) -> dict:
    """Positions computed over one full epoch of the whole training split: loraflow's length-grouped
    batches with dynamic padding vs padding every row to max_length (the baseline)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from loraflow import data

    lengths = [len(e["input_ids"]) for e in data.training_examples(prepared.splits["train"], tokenizer, cfg)]
    size = cfg.train.batch_size * cfg.train.grad_accum
    order = get_length_grouped_indices(lengths, size, generator=torch.Generator().manual_seed(cfg.train.seed))
    grouped = sum(max(lengths[i] for i in order[s:s + size]) * len(order[s:s + size])
                  for s in range(0, len(order), size))
    return {"rows": len(lengths), "real_tokens": sum(lengths), "loraflow_positions": grouped,
            "baseline_positions": len(lengths) * cfg.data.max_length,
            "baseline_over_loraflow_positions": len(lengths) * cfg.data.max_length / grouped}


VARIANTS = {  # loraflow's path with one lever changed, tried with --variants (an ablation)
    "no_dropout": "lora.dropout=0: PEFT then skips the dropout mask it draws for every LoRA input",
    "no_autocast": "bf16 weights without bf16 autocast (TrainingArguments.bf16=False)",
    "full_head": "the LM head and loss on every position, prompt and padding included (models.takes_logits_to_keep off)",
    "sdpa_attention": "the model's sdpa attention kept (models.faster_cpu_attention not asked)",
    "torch_dropout": "PEFT's own nn.Dropout on the LoRA inputs (one random draw per mask element) instead of "
                     "dropout.SixteenBitDropout",
    "peft_input_cast": "PEFT's cast of every LoRA input to the adapter's fp32 kept under bf16 autocast "
                       "(models.skip_input_casts_under_autocast not applied)",
    "own_masks": "one dropout mask per LoRA layer, none shared by layers fed the same input (dropout.LastMask off)",
    "peft_forward": "PEFT's LoRA forward, its scaling and dropout's 1/(1-p) applied to full-width tensors "
                    "(fused_lora.install not applied)",
    "shared_head": "the LM head on every row at the positions where some row has a label, not only on the labelled "
                   "tokens (models.head_on_labelled_tokens not applied)",
    "unfused_head": "transformers' LM head then cross-entropy over the whole fp32 logits tensor, not head_loss's "
                    "chunks with the gradient made in the forward (head_loss.install not applied)",
}


def variant_arm(variant: str, cfg, model_path: str, prepared, kept: dict):
    if variant == "no_dropout":
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))
    return loraflow_arm(f"loraflow_{variant}", cfg, model_path, prepared, kept, autocast=variant != "no_autocast",
                        head_trim=variant != "full_head", sixteen_bit_dropout=variant != "torch_dropout",
                        attention_probe=variant != "sdpa_attention", skip_input_casts=variant != "peft_input_cast",
                        shared_masks=variant != "own_masks", fused_forward=variant != "peft_forward",
                        per_token_head=variant != "shared_head", fused_head_loss=variant != "unfused_head")


def baseline_dataset(rows: list[dict], tokenizer, cfg):
    """Public-notebook style: the whole chat padded to max_length; target token counts kept aside."""
    import datasets

    from loraflow import data

    texts, targets = [], []
    for row in rows:
        examples = data.tokenize_sft([row], tokenizer, cfg)  # only to count the same useful tokens as loraflow
        if not examples:
            continue
        targets.append(sum(label != data.IGNORE_INDEX for label in examples[0]["labels"]))
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["target"]}],
            tokenize=False))
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=cfg.data.max_length)
    return datasets.Dataset.from_dict({**encoded, "target_tokens": targets})


def baseline_arm(cfg, model_path: str, rows: list[dict], kept: dict):
    """The plain way: fp32, padding to max_length, DataCollatorForLanguageModeling, a default Trainer."""
    import peft
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    setup, dataset = common.timed(lambda: baseline_dataset(rows, tokenizer, cfg))

    def run() -> dict:
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules="all-linear", task_type="CAUSAL_LM"))
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="bench-baseline-", dir=cfg.train.output_dir),
            per_device_train_batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.grad_accum,
            learning_rate=cfg.train.learning_rate, lr_scheduler_type=cfg.train.lr_scheduler,
            max_steps=cfg.train.max_steps, logging_steps=1, seed=cfg.train.seed, report_to="none",
            remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
        counter = TokenCounter(DataCollatorForLanguageModeling(tokenizer, mlm=False), model, target_key="target_tokens")
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counter)
        wall, _ = common.timed(trainer.train)
        kept["baseline"] = (model, tokenizer)
        return measurement(trainer, counter, wall, setup)
    return run


def heldout_loss(model, tokenizer, examples: list[dict], batch_size: int = 8) -> float:
    """Token-weighted completion-only loss of `model` in fp32 on tokenised held-out examples."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    model = model.float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate([dict(e) for e in examples[start:start + batch_size]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                                       ignore_index=-100, reduction="sum")
            total, count = total + float(losses), count + int((labels != -100).sum())
    return total / count


def parse_args(argv=None):
    parser = common.base_parser(__file__, __doc__)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 3; smoke 2)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--heldout-rows", type=int, default=None,
                        help="validation rows for the loss check and loraflow's own evaluation (default 32; smoke 8)")
    parser.add_argument("--dtype", choices=("auto", "fp32"), default="auto",
                        help="loraflow's model.dtype (fp32: both arms in fp32, as on a CPU without native bf16)")
    parser.add_argument("--variants", default="", help=f"extra loraflow arms, comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--shape", default="", help="an architecture of benchmarks/shapes/ with random weights instead "
                                                    "of SmolLM2, e.g. tinyllama-1.1b (results: train-<shape>[-fp32])")
    args = common.parse(parser, argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(args.variants) - set(VARIANTS):
        parser.error(f"unknown --variants {sorted(set(args.variants) - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    args.steps = args.steps or (2 if args.smoke else 3)
    args.heldout_rows = args.heldout_rows or (8 if args.smoke else 32)
    return args


def flops_summary(samples: list[dict], weights: int, head_weights: int, peak: float | None) -> dict:
    """FLOP/s computed: 4 x (the body's weights x positions + the LM head's x the positions it computes) per second."""
    hardware = statistics.median(4 * ((weights - head_weights) * s["positions_per_second"]
                                      + head_weights * s.get("head_positions_per_second", s["positions_per_second"]))
                                 for s in samples)
    useful = statistics.median(4 * weights * s["real_tokens_per_second"] for s in samples)
    return {"flops_per_second": hardware, "useful_flops_per_second": useful,
            "gemm_ceiling_flops_per_second": peak, "fraction_of_ceiling": hardware / peak if peak else None,
            "useful_fraction_of_ceiling": useful / peak if peak else None}


def main(argv=None) -> dict:
    import torch

    from loraflow import data, models

    args = parse_args(argv)
    common.use_temporary_tracking()
    model_path = str(common.random_model_of_shape(args.shape)) if args.shape else common.model_for(args.smoke)
    cfg = common.bench_config(model_path, model={"dtype": args.dtype}, data={"max_length": args.max_length},
                              train={"max_steps": args.steps, "batch_size": args.batch_size,
                                     "eval_rows": args.heldout_rows})
    full = data.prepare(cfg)
    prepared = one_epoch_of_rows(full, cfg)
    dtype = models.compute_dtype(cfg)
    kept: dict = {}
    arms = {"loraflow": loraflow_arm("loraflow", cfg, model_path, prepared, kept),
            "baseline": baseline_arm(cfg, model_path, prepared.splits["train"], kept)}
    arms.update({f"loraflow_{v}": variant_arm(v, cfg, model_path, prepared, kept) for v in args.variants})
    samples = common.alternate(arms, args.pairs, args.warmup)
    shapes = gemm_shapes(kept["baseline"][0], args.batch_size * args.max_length)
    ceilings = {"bf16": gemm_ceiling(torch.bfloat16, shapes), "fp32": gemm_ceiling(torch.float32, shapes)}
    peaks = {key: ceiling["flops_per_second"] for key, ceiling in ceilings.items()}
    heldout = data.training_examples(prepared.splits["validation"][:cfg.train.eval_rows], kept["loraflow"][1], cfg)
    losses = {arm: heldout_loss(*kept[arm], heldout) for arm in arms}
    weights = linear_weights(kept["baseline"][0])
    head_weights = kept["baseline"][0].get_output_embeddings().weight.numel()
    padding = epoch_padding(full, kept["loraflow"][1], cfg)
    del kept
    return report(args, cfg, samples, losses, (weights, head_weights), peaks, ceilings,
                  "bf16" if dtype == torch.bfloat16 else "fp32", model_path, padding)


def flops_text(arm: dict) -> str:
    ceiling = arm["gemm_ceiling_flops_per_second"]
    if ceiling is None:
        return f"{arm['flops_per_second'] / 1e9:.1f} G ({arm['dtype']} ceiling not measured: not native here)"
    return (f"{arm['flops_per_second'] / 1e9:.1f} G = {arm['fraction_of_ceiling']:.0%} of the {arm['dtype']} ceiling "
            f"{ceiling / 1e9:.0f} G")


def overheads(samples: dict) -> dict:
    """Where loraflow's wall time goes besides training steps, and what train.py itself would count."""
    ours, baseline = samples["loraflow"], samples["baseline"]

    def median(rows, key):
        return statistics.median(common.column(rows, key))
    return {"eval_seconds_in_train": median(ours, "eval_seconds"),
            "mlflow_logging_seconds": median(ours, "mlflow_logging_seconds"),
            "train_seconds": median(ours, "train_seconds"),
            "setup_seconds": {"loraflow": median(ours, "setup_seconds"), "baseline": median(baseline, "setup_seconds")},
            "train_py_counted_over_training_tokens": statistics.median(
                s["train_py_counted_tokens"] / s["label_tokens"] for s in ours)}


def variants_report(variants: list[str], samples: dict, losses: dict) -> dict:
    """Each variant arm against the baseline and against loraflow as it is."""
    report = {}
    for variant in variants:
        name = f"loraflow_{variant}"
        speeds = common.column(samples[name], "tokens_per_second")
        vs_baseline = common.compare(speeds, common.column(samples["baseline"], "tokens_per_second"))
        vs_loraflow = common.compare(speeds, common.column(samples["loraflow"], "tokens_per_second"))
        report[variant] = {
            "description": VARIANTS[variant], "vs_baseline": vs_baseline, "vs_loraflow": vs_loraflow,
            "heldout_loss": losses[name],
            "summary": [f"variant {variant} ({VARIANTS[variant]}): {vs_baseline['ratio_median']:.2f}x baseline, "
                        f"{vs_loraflow['ratio_median']:.2f}x loraflow as it is (min-max "
                        f"{vs_loraflow['ratio_min_max'][0]:.2f}-{vs_loraflow['ratio_min_max'][1]:.2f}); "
                        f"held-out loss {losses[name]:.4f}"]}
    return report


def report(args, cfg, samples, losses, weight_counts, peaks, peak_runs, loraflow_dtype, model_path, padding) -> dict:
    weights, head_weights = weight_counts
    speed = common.compare(common.column(samples["loraflow"], "tokens_per_second"),
                           common.column(samples["baseline"], "tokens_per_second"))
    per_position = common.compare(common.column(samples["loraflow"], "positions_per_second"),
                                  common.column(samples["baseline"], "positions_per_second"))
    padding["projected_epoch_ratio"] = per_position["ratio_median"] * padding["baseline_over_loraflow_positions"]
    speed_with_eval = common.compare(common.column(samples["loraflow"], "tokens_per_second_with_eval"),
                                     common.column(samples["baseline"], "tokens_per_second_with_eval"))
    last_losses = {arm: statistics.median(common.column(s, "last_train_loss")) for arm, s in samples.items()}
    loss_ratio = losses["loraflow"] / losses["baseline"]
    flops = {"formula": "4 x ((linear_weights - head_weights) x positions_per_second (padding included) + head_weights "
                        "x head_positions_per_second); useful: 4 x linear_weights x non-padding tokens per second",
             "linear_weights": weights, "head_weights": head_weights,
             "loraflow": flops_summary(samples["loraflow"], weights, head_weights, peaks[loraflow_dtype]),
             "baseline": flops_summary(samples["baseline"], weights, head_weights, peaks["fp32"]),
             "gemm_ceilings": peak_runs}
    flops["loraflow"]["dtype"], flops["baseline"]["dtype"] = loraflow_dtype, "fp32"
    native_bf16 = loraflow_dtype == "bf16"  # model.dtype auto picks bf16 only where the CPU has it
    goals = [common.goal(f"useful tokens/s loraflow / baseline >= {2.0 if native_bf16 else 1.3} "
                         f"({'loraflow in native bf16' if native_bf16 else 'both in fp32, as without native bf16'})",
                         speed["ratio_median"], 2.0 if native_bf16 else 1.3),
             common.goal("held-out loss loraflow / baseline <= 1.02", loss_ratio, 1.02, higher_is_better=False)]
    fraction, threshold = flops["loraflow"]["fraction_of_ceiling"], 0.4 if native_bf16 else 0.6
    if fraction is not None:  # the baseline's fraction is in the summary, not a goal of loraflow's
        goals.append(common.goal(f"loraflow FLOP/s >= {threshold:.0%} of the {loraflow_dtype} GEMM ceiling at the "
                                 "model's shapes", fraction, threshold))
    summary = [
        f"useful tokens/s: loraflow {speed['a_median']:.0f} vs baseline {speed['b_median']:.0f} = "
        f"{speed['ratio_median']:.2f}x (min-max {speed['ratio_min_max'][0]:.2f}-{speed['ratio_min_max'][1]:.2f}); "
        f"with loraflow's end-of-training evaluation counted: {speed_with_eval['ratio_median']:.2f}x; "
        f"per position (compute alone) {per_position['ratio_median']:.2f}x",
        f"a full epoch of the {padding['rows']} training rows would compute "
        f"{padding['baseline_over_loraflow_positions']:.2f}x fewer positions with loraflow's length-grouped dynamic "
        f"padding than padded to max_length: projected epoch speed-up {padding['projected_epoch_ratio']:.2f}x",
        f"held-out loss after {cfg.train.max_steps} steps: loraflow {losses['loraflow']:.4f} vs baseline "
        f"{losses['baseline']:.4f} (ratio {loss_ratio:.4f}); last training loss {last_losses['loraflow']:.4f} vs "
        f"{last_losses['baseline']:.4f} (baseline's includes prompt tokens)",
        f"FLOP/s (4 x {weights / 1e6:.1f}M linear weights x positions/s, the {head_weights / 1e6:.1f}M of the head "
        f"only where it is computed) against torch.matmul at the model's own "
        f"GEMM shapes: loraflow {flops_text(flops['loraflow'])}; baseline {flops_text(flops['baseline'])}"]
    payload = {"summary": summary, "model": model_path, "data": cfg.data.path, "loraflow_dtype": loraflow_dtype,
               "settings": {"steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size,
                            "max_length": cfg.data.max_length, "lora_r": cfg.lora.r,
                            "learning_rate": cfg.train.learning_rate, "heldout_rows": cfg.train.eval_rows},
               "tokens_per_second": speed, "tokens_per_second_with_eval": speed_with_eval,
               "positions_per_second": per_position, "full_epoch_padding": padding,
               "loss": {"heldout": losses, "heldout_ratio": loss_ratio, "last_train_loss": last_losses},
               "flops": flops, "loraflow_overheads": overheads(samples), "goals": goals, "samples": samples}
    if args.variants:
        payload["variants"] = variants_report(args.variants, samples, losses)
        summary += [line for v in payload["variants"].values() for line in v["summary"]]
    name = "-".join(["train", *([args.shape] if args.shape else []), *([args.dtype] if args.dtype != "auto" else [])])
    common.write_results(name, args, payload)
    return payload


if __name__ == "__main__":
    main()
