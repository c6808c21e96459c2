"""GGUF export read back by third-party readers: transformers' GGUF loader and llama.cpp (llama-cpp-python).

    .venv/bin/python benchmarks/bench_export.py [--smoke] [--max-new-tokens 32] [--skip-llama-cpp]

A version is registered as register makes one: SmolLM2-135M-Instruct (the tiny random Llama with --smoke)
with a LoRA adapter (random, scaled like a short fine-tune's), and its merged folder, served in fp32
(registry.serve_dtype=fp32, so that f32 can be held to 1e-4). `loraflow export` (the stage) writes it in
f32, f16 and q8_0. The reference is the version as served (models.load_served: the adapter on the base).
Prompts are the training format (data.prompt_token_ids: the chat template, data.system_prompt, one bos)
of catalogue titles full of multi-digit numbers; teacher-forced positions are the prompt and the
reference's greedy answer. transformers: each quantization's max logit difference, top-1 agreement,
greedy answers on 8 prompts, and the GGUF tokenizer's ids against the merged folder's. llama.cpp (when
`llama_cpp` imports): the f16 file on 10 prompts, tokenised by llama.cpp from the same rendered text
(with the bos the file asks for), its logits of every position, and its greedy answers. Ratio: f16's
teacher-forced top-1 agreement with transformers' reader.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPTS = ["Oak desk 1200 x 600 mm with 3 drawers", "Stainless steel water bottle 750 ml, 2 pack",
           "LED bulb 9W E27 2700K, 806 lumen", "USB-C cable 2 m, 100W, 480 Mbps",
           "Wool rug 160 x 230 cm, 12 mm pile", "Phone case for model 15 Pro Max 2023",
           "Kitchen scale 5000 g / 1 g steps", "Bookshelf 5 shelves, 180 cm tall, holds 25 kg each",
           "AA batteries 1.5V 2850 mAh, 24 pack", "Monitor 27 inch 2560 x 1440, 144 Hz, 1 ms"]
NUMBER_TEXTS = ["Order 12345 of 2024: 3 x 250 ml at 19.99", "SKU-0042 1200x600 mm", "call 0800 123 4567",
                "Model 15 Pro Max 2023, 256 GB, 6.7 inch"]


def parse_args(argv=None):
    parser = common.base_parser(__file__, __doc__, pairs=1, smoke_pairs=1)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length of the greedy answers compared")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="transformers' reader only")
    return common.parse(parser, argv)


def scaled_random_adapter(base: str, folder: Path, scale: float):
    """A LoRA adapter on every linear layer with random A and B, B scaled by `scale` (a short fine-tune's size)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
    model.save_pretrained(folder)
    return folder


def registered_version(smoke: bool):
    """(cfg, base path, adapter folder): the version registered as @champion in a throw-away store."""
    import mlflow

    from loraflow import models, serving

    common.use_temporary_tracking()
    base = common.model_for(smoke)
    cfg = common.bench_config(base, registry={"serve_dtype": "fp32", "merge_dtype": "fp32"},
                              data={"system_prompt": "You write short product descriptions."})
    work = common.scratch_dir("bench-export-")
    adapter = scaled_random_adapter(base, work / "adapter", 1.0 if smoke else 0.05)
    merged = models.merge_adapter(cfg, base, adapter, work / "merged")
    with mlflow.start_run():
        info = serving.log_model(cfg, merged, adapter)
    number = mlflow.register_model(info.model_uri, cfg.model_name).version
    mlflow.MlflowClient().set_registered_model_alias(cfg.model_name, "champion", number)
    return cfg, base, adapter


def transformers_figures(gguf_path: Path, reference, tokenizer, prompt_ids, answers, max_new_tokens) -> dict:
    """The file read by transformers' GGUF loader against the served reference."""
    from loraflow.export import verify

    model, read_back = verify.load_gguf(gguf_path)
    figures = verify.compare(reference, model, [ids + answer for ids, answer in zip(prompt_ids, answers)])
    eos = eos_ids(tokenizer)
    figures["same_greedy_answers"] = sum(verify.greedy(model, ids, max_new_tokens, eos) == answer
                                         for ids, answer in zip(prompt_ids, answers))
    figures["prompts"] = len(prompt_ids)
    figures["tokenizer_ids_equal"] = all(read_back(text, add_special_tokens=False)["input_ids"]
                                         == tokenizer(text, add_special_tokens=False)["input_ids"]
                                         for text in NUMBER_TEXTS + PROMPTS)
    return figures


def eos_ids(tokenizer) -> set:
    from loraflow.data.tokens import chat_turn_end

    end = chat_turn_end(tokenizer)
    return {tokenizer.eos_token_id} | ({tokenizer.convert_tokens_to_ids(end)} if end else set())


def llama_cpp_figures(gguf_path: Path, reference, tokenizer, cfg, max_new_tokens: int) -> dict:
    """The f16 file in llama.cpp on the 10 prompts: token ids, teacher-forced top-1, greedy answers."""
    import numpy as np
    from llama_cpp import Llama

    from loraflow import data
    from loraflow.export import verify

    llm = Llama(model_path=str(gguf_path), n_ctx=512, logits_all=True, n_threads=2, verbose=False, seed=0)
    eos = eos_ids(tokenizer)
    same_ids = same_top1 = positions = same_answers = 0
    for prompt in PROMPTS:
        text = data.format_prompt(tokenizer, prompt, cfg)  # the chat template applied once, for both
        expected = data.prompt_token_ids(tokenizer, prompt, cfg)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # bos as the file says
        same_ids += ids == expected
        answer = verify.greedy(reference, expected, max_new_tokens, eos)
        sequence = expected + answer
        llm.reset()
        llm.eval(sequence)
        ours = np.asarray(llm.scores[:len(sequence)]).argmax(-1)
        theirs = verify.logits_of(reference, sequence).argmax(-1).numpy()
        same_top1 += int((ours == theirs).sum())
        positions += len(sequence)
        same_answers += llama_cpp_greedy(llm, expected, max_new_tokens, eos) == answer
    return {"prompts": len(PROMPTS), "token_ids_equal": same_ids, "top1_agreement": same_top1 / positions,
            "positions": positions, "same_greedy_answers": same_answers}


def llama_cpp_greedy(llm, ids: list[int], max_new_tokens: int, eos: set) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(max_new_tokens):
        token = int(np.asarray(llm.scores[llm.n_tokens - 1]).argmax())
        out.append(token)
        if token in eos:
            break
        llm.eval([token])
    return out


def llama_cpp_available() -> tuple[bool, str]:
    try:
        import llama_cpp
    except ImportError as exc:
        return False, f"llama_cpp does not import ({exc})"
    return True, f"llama-cpp-python {llama_cpp.__version__}"


def export_all(cfg, work: Path) -> dict:
    """Each quantization through the export stage: the result, its seconds and size."""
    from loraflow.stages import export as export_stage

    done = {}
    for quantization in ("f32", "f16", "q8_0"):
        seconds, result = common.timed(lambda q=quantization: export_stage.run(cfg, quantization=q,
                                                                               output=work / q))
        done[quantization] = {"result": result, "seconds": seconds, "bytes": result.files[result.gguf_path.name]["bytes"]}
    return done


def goals_of(figures: dict, llama_cpp: dict | None) -> list[dict]:
    t = figures["transformers"]
    goals = [common.goal("f16: teacher-forced top-1 agreement >= 99.5% (transformers' reader)",
                         t["f16"]["top1_agreement"], 0.995),
             common.goal("f32: largest logit difference <= 1e-4", t["f32"]["max_abs_logit_diff"], 1e-4,
                         higher_is_better=False),
             common.goal("f16: same greedy answers on >= 7 of 8 prompts", t["f16"]["same_greedy_answers"], 7),
             common.goal("q8_0: teacher-forced top-1 agreement >= 98%", t["q8_0"]["top1_agreement"], 0.98),
             common.goal("GGUF tokenizer ids = merged folder's on number-heavy texts (1 = all equal)",
                         float(all(t[q]["tokenizer_ids_equal"] for q in t)), 1.0)]
    if llama_cpp:
        goals += [common.goal("llama.cpp f16: token ids equal on 10 of 10 prompts", llama_cpp["token_ids_equal"], 10),
                  common.goal("llama.cpp f16: teacher-forced top-1 agreement >= 99%", llama_cpp["top1_agreement"], 0.99),
                  common.goal("llama.cpp f16: same greedy answers on >= 9 of 10", llama_cpp["same_greedy_answers"], 9)]
    return goals


def summary_lines(figures: dict, exported: dict, llama_cpp: dict | None, llama_note: str) -> list[str]:
    t = figures["transformers"]
    lines = [f"{q}: {exported[q]['bytes'] / 1e6:.1f} MB in {exported[q]['seconds']:.1f} s; top-1 "
             f"{t[q]['top1_agreement']:.4f} over {t[q]['positions']} positions, max logit diff "
             f"{t[q]['max_abs_logit_diff']:.2e}, same greedy answers {t[q]['same_greedy_answers']}/{t[q]['prompts']}"
             for q in exported]
    if llama_cpp:
        lines.append(f"llama.cpp f16: ids equal {llama_cpp['token_ids_equal']}/10, top-1 "
                     f"{llama_cpp['top1_agreement']:.4f} over {llama_cpp['positions']} positions, same greedy "
                     f"answers {llama_cpp['same_greedy_answers']}/10")
    else:
        lines.append(f"llama.cpp: not measured ({llama_note})")
    return lines


def main(argv=None) -> Path:
    from loraflow import data, models

    args = parse_args(argv)
    cfg, base, adapter = registered_version(args.smoke)
    reference, tokenizer = models.load_served(cfg, base, adapter)
    reference.eval()
    exported = export_all(cfg, common.scratch_dir("bench-export-out-"))
    prompt_ids = [data.prompt_token_ids(tokenizer, prompt, cfg) for prompt in PROMPTS[:8]]
    from loraflow.export import verify
    answers = [verify.greedy(reference, ids, args.max_new_tokens, eos_ids(tokenizer)) for ids in prompt_ids]
    figures = {"transformers": {q: transformers_figures(e["result"].gguf_path, reference, tokenizer, prompt_ids,
                                                        answers, args.max_new_tokens) for q, e in exported.items()}}
    available, note = llama_cpp_available()
    started = time.perf_counter()
    llama_cpp = None if args.skip_llama_cpp or not available else \
        llama_cpp_figures(exported["f16"]["result"].gguf_path, reference, tokenizer, cfg, args.max_new_tokens)
    goals = goals_of(figures, llama_cpp)
    payload = {"ratio": goals[0]["value"], "goals": goals, "summary": summary_lines(figures, exported, llama_cpp, note),
               "samples": [], "quantizations": {q: {"bytes": e["bytes"], "seconds": e["seconds"],
                                                    **figures["transformers"][q]} for q, e in exported.items()},
               "llama_cpp": llama_cpp or {"measured": False, "reason": "--skip-llama-cpp" if args.skip_llama_cpp
                                          else note},
               "llama_cpp_seconds": time.perf_counter() - started if llama_cpp else None,
               "settings": {"model": base, "served_dtype": "fp32", "max_new_tokens": args.max_new_tokens,
                            "merged_bytes": sum(p.stat().st_size for p in Path(base).glob("*.safetensors"))}}
    return common.write_results("export", args, payload)


if __name__ == "__main__":
    main()
