"""Training-step time with each of loraflow's training levers left out, toggled on one model, step by step.

    .venv/bin/python benchmarks/bench_levers.py [--smoke] [--pairs 10] [--dtype auto|fp32] [--levers a,b]
                                               [--objective sft|cpt]

bench_train.py's arms are whole Trainer runs; on a 2-core machine they differ by up to 25% from round to
round, too much to resolve a lever worth 5%. Here one loraflow model (models.load_model + attach_lora, as
train.run makes it) trains on one fixed batch of training.trainer.training_collator. Every round runs an optimizer step
(forward, backward, AdamW) with loraflow as it is, then one with a lever left out, for each lever in turn;
a lever's ratio is the median over rounds of (its step without the lever / the step as it is), so a slow
moment of the machine hits both sides of a ratio. The levers, each toggled on the same model and batch:

- fused_forward: PEFT's own LoRA forward (scaling and dropout's 1/(1-p) on full-width tensors), not fused_lora's
- per_token_head: the LM head on every row at the positions where some row has a label, not on the labelled
  tokens alone (models.head_on_labelled_tokens not applied)
- head_trim: the LM head and loss on every position (no logits_to_keep)
- shared_masks: one dropout mask per LoRA layer, none shared by layers fed the same input
- fused_head_loss: transformers' LM head then cross-entropy over the whole fp32 logits tensor, not head_loss's
  chunks with the gradient made in the forward
- all: every lever above left out together

With --objective cpt the batch is blocks of raw text (data/ptbr_text), every position labelled, as in continued
pretraining: the LM head then computes every position and the head levers have nothing to trim (only
fused_forward, shared_masks and fused_head_loss are toggled).

After the rounds (LoRA's B starts at zero) each arm's loss is computed once on the same weights with the same
dropout draws: the levers change only how it is computed, so the losses agree up to float rounding
(shared_masks draws other masks, so its loss differs by dropout alone).
"""
from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LEVERS = ("fused_forward", "per_token_head", "head_trim", "shared_masks", "fused_head_loss")
HEAD_TRIM_LEVERS = ("per_token_head", "head_trim")  # they keep the head off unlabelled positions: none in cpt
CPT_TEXT = common.SAMPLE_DATA / "ptbr_text" / "dom_casmurro.txt"


def parse_args(argv=None):
    parser = common.base_parser(__file__, __doc__, pairs=10, smoke_pairs=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("auto", "fp32"), default="auto",
                        help="loraflow's model.dtype (fp32: as on a CPU without native bf16)")
    parser.add_argument("--levers", default=None, help=f"comma-separated subset of {', '.join(LEVERS)} (default: all "
                                                      f"that apply to the objective)")
    parser.add_argument("--learning-rate", type=float, default=1e-5,
                        help="AdamW's, on the one batch every step trains (at 1e-3 its loss fell to 0.0005 within the "
                             "rounds: logits far apart, where exponentials underflow and every softmax slows down)")
    parser.add_argument("--objective", choices=("sft", "cpt"), default="sft",
                        help="sft: prompt + target rows, the head on target tokens; cpt: raw-text blocks, every "
                             "position labelled")
    args = common.parse(parser, argv)
    usable = [lever for lever in LEVERS if args.objective == "sft" or lever not in HEAD_TRIM_LEVERS]
    args.levers = [lever.strip() for lever in (args.levers or ",".join(usable)).split(",") if lever.strip()]
    if not args.levers or set(args.levers) - set(usable):
        parser.error(f"--levers: choose from {', '.join(usable)} (--objective {args.objective})")
    return args


def levers_config(args, model_path: str):
    """The benchmark's config: amazon_titles SFT rows, or Dom Casmurro's paragraphs as CPT blocks."""
    if args.objective == "cpt":
        return common.bench_config(model_path, model={"dtype": args.dtype},
                                   data={"path": str(CPT_TEXT), "max_length": args.max_length},
                                   train={"batch_size": args.batch_size, "objective": "cpt"},
                                   registry={"gate_metric": "loss"})
    return common.bench_config(model_path, model={"dtype": args.dtype}, data={"max_length": args.max_length},
                               train={"batch_size": args.batch_size})


def collated_batches(cfg, model, tokenizer, examples) -> dict:
    """The batch training_collator makes, and the same rows batched with the head levers left out."""
    from loraflow import models
    from loraflow.training.trainer import training_collator

    as_is = training_collator(cfg, model, tokenizer)([dict(e) for e in examples])
    with mock.patch.object(models, "head_on_labelled_tokens", lambda model: False):
        shared_head = training_collator(cfg, model, tokenizer)([dict(e) for e in examples])
    with mock.patch.object(models, "takes_logits_to_keep", lambda model: False):
        full_head = training_collator(cfg, model, tokenizer)([dict(e) for e in examples])
    return {"as_is": as_is, "per_token_head": shared_head, "head_trim": full_head}


@contextlib.contextmanager
def peft_forward(model):
    """PEFT's LoRA forward on every layer while inside (fused_lora's instance forwards taken off, then put back)."""
    from loraflow.kernels import fused_lora

    layers = [module for module in model.modules() if "forward" in vars(module) and hasattr(module, "lora_A")]
    for layer in layers:
        del layer.forward
    try:
        yield
    finally:
        fused_lora.install(model)


@contextlib.contextmanager
def own_masks(model):
    """Every SixteenBitDropout drawing its own mask while inside."""
    from loraflow.kernels.dropout import SixteenBitDropout

    dropouts = [(module, module.shared) for module in model.modules() if isinstance(module, SixteenBitDropout)]
    for module, _ in dropouts:
        module.shared = None
    try:
        yield
    finally:
        for module, shared in dropouts:
            module.shared = shared


@contextlib.contextmanager
def unfused_head_loss(model):
    """transformers' head and loss on every forward while inside (head_loss's FusedHead switched off)."""
    fused = model.get_base_model()._fused_head
    fused.enabled = False
    try:
        yield
    finally:
        fused.enabled = True


def arm_setting(arm: str, levers: list[str], model, batches: dict):
    """(context manager, batch) of one arm: loraflow as it is, one lever left out, or all of them."""
    off = levers if arm == "all" else [] if arm == "as_is" else [arm]
    stack = contextlib.ExitStack()
    if "fused_forward" in off:
        stack.enter_context(peft_forward(model))
    if "shared_masks" in off:
        stack.enter_context(own_masks(model))
    if "fused_head_loss" in off:
        stack.enter_context(unfused_head_loss(model))
    batch = batches["head_trim" if "head_trim" in off else "per_token_head" if "per_token_head" in off else "as_is"]
    return stack, batch


def make_step(model, optimizer, autocast: bool):
    import torch

    def step(batch, seed: int | None = None, update: bool = True) -> float:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        if update:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def main(argv=None) -> dict:
    import torch

    from loraflow import data, models

    args = parse_args(argv)
    common.use_temporary_tracking()
    model_path = common.model_for(args.smoke)
    cfg = levers_config(args, model_path)
    model, tokenizer = models.load_model(cfg, model_path)
    model = models.attach_lora(model, cfg).train()
    attention = models.faster_cpu_attention(model, cfg)
    rows = data.prepare(cfg).splits["train"]
    examples = data.training_examples(rows if args.objective == "cpt" else rows[:args.batch_size], tokenizer, cfg)
    examples = examples[:args.batch_size]
    batches = collated_batches(cfg, model, tokenizer, examples)
    autocast = models.compute_dtype(cfg) == torch.bfloat16
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    step = make_step(model, optimizer, autocast)
    arms = ["as_is", *args.levers] + (["all"] if len(args.levers) > 1 else [])

    def timed_arm(arm):
        def run() -> dict:
            stack, batch = arm_setting(arm, args.levers, model, batches)
            with stack:
                seconds, loss = common.timed(lambda: step(batch))
            return {"step_seconds": seconds, "loss": loss}
        return run
    samples = common.alternate({arm: timed_arm(arm) for arm in arms}, args.pairs, args.warmup)
    losses = {}
    for arm in arms:  # after the rounds (LoRA's B starts at zero): the same weights and dropout draws for each arm;
        stack, batch = arm_setting(arm, args.levers, model, batches)  # with gradients on, as head_loss needs
        with stack:
            losses[arm] = step(batch, seed=0, update=False)
    return report(args, cfg, samples, losses, attention, batches, "bf16" if autocast else "fp32")


def report(args, cfg, samples, losses, attention, batches, dtype) -> dict:
    as_is = common.column(samples["as_is"], "step_seconds")
    levers = {}
    for arm in [a for a in samples if a != "as_is"]:
        ratio = common.compare(common.column(samples[arm], "step_seconds"), as_is)
        levers[arm] = {**ratio, "loss_after_rounds": losses[arm],
                       "loss_difference_from_as_is": abs(losses[arm] - losses["as_is"])}
    positions = {name: {"positions": int(batch["input_ids"].numel()), "head_positions": common.head_positions(batch)}
                 for name, batch in batches.items()}
    ordered = sorted(levers, key=lambda arm: arm != "all")  # every lever together first: the headline figure
    goals = [common.goal(f"step time without {arm} / as it is >= 1 ({'every lever' if arm == 'all' else 'one lever'} "
                         f"left out, {dtype})", levers[arm]["ratio_median"], 1.0) for arm in ordered]
    summary = [f"one {args.objective} training step ({args.batch_size} x {args.max_length} tokens, {dtype}, {attention} "
               f"attention) as "
               f"it is: {statistics.median(as_is):.2f} s; the LM head computes "
               f"{positions['as_is']['head_positions']} of {positions['as_is']['positions']} positions"]
    summary += [f"without {arm}: {lever['a_median']:.2f} s = {lever['ratio_median']:.3f}x the step as it is (min-max "
                f"{lever['ratio_min_max'][0]:.3f}-{lever['ratio_min_max'][1]:.3f}); loss after the rounds "
                f"{lever['loss_after_rounds']:.5f} vs {losses['as_is']:.5f}" for arm, lever in levers.items()]
    payload = {"summary": summary, "dtype": dtype, "objective": args.objective, "attention": attention, "levers": levers,
               "positions": positions, "settings": {"batch_size": args.batch_size, "max_length": args.max_length,
                                                    "lora_r": cfg.lora.r, "lora_dropout": cfg.lora.dropout},
               "goals": goals, "samples": samples}
    name = "levers" + ("" if args.dtype == "auto" else f"-{args.dtype}") + ("-cpt" if args.objective == "cpt" else "")
    common.write_results(name, args, payload)
    return payload


if __name__ == "__main__":
    main()
