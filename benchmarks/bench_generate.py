"""Evaluation generation: loraflow's batched generate vs one prompt at a time, greedy outputs compared.

    .venv/bin/python benchmarks/bench_generate.py [--smoke] [--pairs 5] [--prompts 16] [--max-new-tokens 32]

Arms, each answering the same held-out prompts once per round:
  loraflow_fp32     generation.generate (batches of eval.batch_size, left padding, sorted by length),
                    the model in fp32;
  loraflow_default  the same with the model as loraflow loads it (model.dtype=auto: bf16 on AMX CPUs);
  naive_fp32        the way notebooks do it: apply_chat_template, then model.generate per prompt
                    (batch 1, fp32), new tokens decoded.
Identity is checked like with like: loraflow_fp32 vs naive_fp32 must give identical greedy answers
(the mismatch count is reported; the script exits 1 after writing its results if any differ).
loraflow_default runs in bf16, where greedy answers may legitimately differ from fp32; its
mismatches against naive_fp32 are reported for information only. Speed-ups are naive / loraflow
seconds per round.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def naive_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """model.generate on one prompt at a time, greedy, as in public notebooks."""
    import torch

    answers = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def arm(generate, answers: dict, name: str, prompts: list[str]):
    def run() -> dict:
        seconds, answers[name] = common.timed(generate)
        return {"seconds": seconds, "prompts_per_second": len(prompts) / seconds}
    return run


def mismatches(a: list[str], b: list[str]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def parse_args(argv=None):
    parser = common.base_parser(__file__, __doc__)
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts answered per arm (default 16; smoke 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 32; smoke 4")
    parser.add_argument("--batch-size", type=int, default=16, help="eval.batch_size of the loraflow arms (loraflow's default)")
    args = common.parse(parser, argv)
    args.prompts = args.prompts or (4 if args.smoke else 16)
    args.max_new_tokens = args.max_new_tokens or (4 if args.smoke else 32)
    return args


def main(argv=None) -> dict:
    import torch

    from loraflow import data, generation, models

    args = parse_args(argv)
    model_path = common.model_for(args.smoke)
    cfg = common.bench_config(model_path, eval={"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                                                "temperature": 0.0})
    fp32_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="fp32"))
    prepared = data.prepare(cfg)
    rows = (prepared.splits["test"] + prepared.splits["validation"] + prepared.splits["train"])[:args.prompts]
    prompts = [row["prompt"] for row in rows]
    fp32_model, tokenizer = models.load_model(fp32_cfg, model_path, quantize=False)
    default_model, _ = models.load_model(cfg, model_path, quantize=False)
    fp32_model.eval(), default_model.eval()
    answers: dict[str, list[str]] = {}
    arms = {"loraflow_fp32": arm(lambda: generation.generate(fp32_model, tokenizer, prompts, fp32_cfg), answers,
                                 "loraflow_fp32", prompts),
            "loraflow_default": arm(lambda: generation.generate(default_model, tokenizer, prompts, cfg), answers,
                                    "loraflow_default", prompts),
            "naive_fp32": arm(lambda: naive_generate(fp32_model, tokenizer, prompts, args.max_new_tokens), answers,
                              "naive_fp32", prompts)}
    samples = common.alternate(arms, args.pairs, args.warmup)
    identical = mismatches(answers["loraflow_fp32"], answers["naive_fp32"])
    payload = report(args, cfg, samples, answers, identical, model_path,
                     str(models.compute_dtype(cfg)).removeprefix("torch."), torch.get_num_threads())
    if identical:
        sys.exit(f"loraflow_fp32 and naive_fp32 greedy answers differ on {len(identical)} of {len(prompts)} "
                 f"prompts: {identical}")
    return payload


def report(args, cfg, samples, answers, identical, model_path, default_dtype, threads) -> dict:
    naive = common.column(samples["naive_fp32"], "seconds")
    speedups = {name: common.compare(naive, common.column(samples[name], "seconds"))
                for name in ("loraflow_fp32", "loraflow_default")}
    default_differs = mismatches(answers["loraflow_default"], answers["naive_fp32"])
    goals = [common.goal("speed-up loraflow_fp32 vs naive_fp32 (like with like) >= 4x",
                         speedups["loraflow_fp32"]["ratio_median"], 4.0),
             common.goal(f"speed-up loraflow_default ({default_dtype}) vs naive_fp32 >= 4x",
                         speedups["loraflow_default"]["ratio_median"], 4.0),
             common.goal("greedy answers loraflow_fp32 == naive_fp32 (mismatches)", len(identical), 0,
                         higher_is_better=False)]
    seconds = {name: common.compare(common.column(s, "seconds"), naive)["a_median"] for name, s in samples.items()}
    summary = [f"{args.prompts} prompts x {args.max_new_tokens} new tokens: naive fp32 {seconds['naive_fp32']:.2f} s, "
               f"loraflow fp32 {seconds['loraflow_fp32']:.2f} s = {speedups['loraflow_fp32']['ratio_median']:.2f}x "
               f"(min-max {speedups['loraflow_fp32']['ratio_min_max'][0]:.2f}-"
               f"{speedups['loraflow_fp32']['ratio_min_max'][1]:.2f}), loraflow {default_dtype} "
               f"{seconds['loraflow_default']:.2f} s = {speedups['loraflow_default']['ratio_median']:.2f}x",
               f"greedy answers loraflow fp32 vs naive fp32: {len(identical)} of {args.prompts} differ; "
               f"loraflow {default_dtype} vs naive fp32: {len(default_differs)} differ (dtype, not batching)"]
    payload = {"summary": summary, "model": model_path, "data": cfg.data.path, "loraflow_default_dtype": default_dtype,
               "settings": {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                            "batch_size": cfg.eval.batch_size, "torch_threads": threads},
               "seconds_median": seconds,
               "speedup_vs_naive_fp32": speedups,
               "identity": {"compared": "loraflow_fp32 vs naive_fp32", "mismatches": len(identical),
                            "mismatched_prompts": identical, "loraflow_default_vs_naive_fp32_mismatches":
                            len(default_differs)},
               "examples": sample_answers(answers, 3),
               "goals": goals, "samples": samples}
    common.write_results("generate", args, payload)
    return payload


def sample_answers(answers: dict, count: int) -> list[dict]:
    return [{name: texts[i] for name, texts in answers.items()} for i in range(min(count, len(answers["naive_fp32"])))]


if __name__ == "__main__":
    main()
