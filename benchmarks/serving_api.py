"""What bench_serving.py --openai and --versions measure: the OpenAI routes, and several versions on one server.

--openai (results: serving-openai.json): one server, one model; rounds of the same single-prompt requests
sent one after another to /invocations and as one-user-message chat completions to /v1/chat/completions
(the same prompt ids, so the same work; goal: OpenAI throughput >= 0.95x), then a lone client streaming
answers of --stream-tokens (64) new tokens (goal: time to the first token <= 0.25x the whole answer's).

--versions (results: serving-versions.json): versions with a random LoRA adapter each on the one base;
a server holding 4 versions against one holding 1, each alone, its RSS after answering every version it
holds (goal: <= 1.3x; four merged servers would take about 4x); then on the 4-version server, 8 clients
whose requests alternate between 2 versions against 1 client (goal: >= 2.5x throughput).
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common


def chat_body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def chat_answer(url: str, body: dict) -> str:
    import httpx

    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def streamed(url: str, body: dict) -> dict:
    """Seconds to the first content chunk and to [DONE], and the tokens the answer took."""
    import json

    import httpx

    started, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
    whole = time.perf_counter() - started
    return {"first_token_seconds": first if first is not None else whole, "whole_seconds": whole,
            "completion_tokens": tokens, "first_over_whole": (first or whole) / whole}


def openai_arms(url: str, model: str, prompts: list[str], params: dict, answers: dict) -> dict:
    """Both routes through one kept-alive HTTP client each, so the arms differ only in the route."""
    import httpx

    def invocations() -> dict:
        with httpx.Client(base_url=url, timeout=600) as http:
            def ask(prompt: str) -> str:
                response = http.post("/invocations", json={"dataframe_records": [{"prompt": prompt}], "params": params})
                return response.json()["predictions"][0]
            seconds, answers["invocations"] = common.timed(lambda: [ask(p) for p in prompts])
        return {"seconds": seconds, "requests_per_second": len(prompts) / seconds}

    def openai() -> dict:
        with httpx.Client(base_url=url, timeout=600) as http:
            def ask(prompt: str) -> str:
                response = http.post("/v1/chat/completions", json=chat_body(model, prompt, params["max_new_tokens"]))
                return response.json()["choices"][0]["message"]["content"]
            seconds, answers["openai"] = common.timed(lambda: [ask(p) for p in prompts])
        return {"seconds": seconds, "requests_per_second": len(prompts) / seconds}
    return {"openai": openai, "invocations": invocations}


def openai_suite(args, cfg, model_path: str, prompts: list[str], served) -> dict:
    """--openai: the two routes A/B, then streaming at args.stream_tokens."""
    import bench_serving

    params = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    model_uri = bench_serving.log_pyfunc(cfg, model_path)
    answers: dict[str, list[str]] = {}
    with served(model_uri) as (url, _, startup):
        routes = common.alternate(openai_arms(url, cfg.model_name, prompts, params, answers), args.pairs,
                                  args.warmup)
        stream_body = chat_body(cfg.model_name, prompts[0], args.stream_tokens)
        streams = common.alternate({"stream": lambda: streamed(url, stream_body)}, args.pairs, args.warmup)
    ratio = common.compare(common.column(routes["openai"], "requests_per_second"),
                           common.column(routes["invocations"], "requests_per_second"))
    first = statistics.median(common.column(streams["stream"], "first_over_whole"))
    tokens = statistics.median(common.column(streams["stream"], "completion_tokens"))
    goals = [common.goal("throughput /v1/chat/completions / /invocations >= 0.95", ratio["ratio_median"], 0.95),
             common.goal(f"lone stream: first token / whole answer <= 0.25 at {args.stream_tokens} new tokens",
                         first, 0.25, higher_is_better=False),
             common.goal("answers /v1/chat/completions == /invocations (mismatching requests)",
                         sum(a != b for a, b in zip(answers["openai"], answers["invocations"])), 0,
                         higher_is_better=False)]
    summary = [f"{len(prompts)} requests of {args.max_new_tokens} new tokens, one after another: OpenAI route "
               f"{ratio['a_median']:.2f} req/s vs /invocations {ratio['b_median']:.2f} req/s = "
               f"{ratio['ratio_median']:.3f}x (min-max {ratio['ratio_min_max'][0]:.3f}-{ratio['ratio_min_max'][1]:.3f})",
               f"a lone stream of {tokens:.0f} tokens (max {args.stream_tokens}): first token after "
               f"{first:.3f} of the whole answer's time"]
    payload = {"ratio": ratio["ratio_median"], "summary": summary, "model": model_path,
               "server_startup_seconds": startup, "routes": ratio, "first_token_over_whole": first,
               "stream_completion_tokens": tokens, "goals": goals,
               "settings": {"max_new_tokens": args.max_new_tokens, "requests": len(prompts),
                            "stream_tokens": args.stream_tokens, "dtype": args.dtype},
               "samples": {"routes": routes, "streams": streams}}
    common.write_results("serving-openai", args, payload)
    return payload


def random_adapter(model_path: str, folder: Path, seed: int) -> Path:
    """A LoRA adapter (r 8, all linear layers) with small random B matrices: each seed answers a little
    differently, as versions trained apart would."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 1e-3)
    tuned.save_pretrained(folder)
    return folder


def register_versions(cfg, model_path: str, name: str, count: int) -> list[str]:
    """`count` versions of `name`, each the base (standing in for its merged folder) with its own adapter."""
    import dataclasses

    import mlflow

    from loraflow import serving

    cfg = dataclasses.replace(cfg, registry=dataclasses.replace(cfg.registry, model_name=name))
    numbers = []
    for seed in range(count):
        adapter = random_adapter(model_path, common.scratch_dir("loraflow-bench-adapter-"), seed)
        with mlflow.start_run(run_name=f"bench-version-{seed}"):
            info = serving.log_model(cfg, model_path, adapter)
        numbers.append(str(mlflow.register_model(info.model_uri, name).version))
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, "champion", numbers[-1])
    if count > 1:
        client.set_registered_model_alias(name, "previous", numbers[0])
    return numbers


def server_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def spread_arms(url: str, models: list[str], prompts: list[str], max_tokens: int, clients: int) -> dict:
    asked = [(models[i % len(models)], p) for i, p in enumerate(prompts)]

    def send(item) -> str:
        return chat_answer(url, chat_body(item[0], item[1], max_tokens))

    def many() -> dict:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            seconds, _ = common.timed(lambda: list(pool.map(send, asked)))
        return {"seconds": seconds, "requests_per_second": len(asked) / seconds}

    def one() -> dict:
        seconds, _ = common.timed(lambda: [send(item) for item in asked])
        return {"seconds": seconds, "requests_per_second": len(asked) / seconds}
    return {f"{clients}_clients": many, "1_client": one}


def versions_suite(args, cfg, model_path: str, prompts: list[str], served) -> dict:
    """--versions: the memory of 4 versions against 1, then 8 clients over 2 versions against 1 client."""
    memory = {}
    for held, name in ((1, "bench-one"), (4, "bench-four")):
        numbers = register_versions(cfg, model_path, name, held)
        with served(f"models:/{name}@champion", all_versions=True) as (url, process, _):
            for number in numbers:  # every held version answers once, so each is fully in memory
                chat_answer(url, chat_body(f"{name}/{number}", prompts[0], args.max_new_tokens))
            memory[held] = server_rss_bytes(process.pid)
            if held == 4:
                spread = common.alternate(spread_arms(url, [f"{name}@champion", f"{name}@previous"], prompts,
                                                      args.max_new_tokens, args.clients),
                                          args.throughput_pairs, args.warmup)
    memory_ratio = memory[4] / memory[1]
    many = f"{args.clients}_clients"
    throughput = common.compare(common.column(spread[many], "requests_per_second"),
                                common.column(spread["1_client"], "requests_per_second"))
    goals = [common.goal("server RSS holding 4 versions / holding 1 <= 1.3", memory_ratio, 1.3,
                         higher_is_better=False),
             common.goal(f"throughput {many} over 2 versions / 1 client >= 2.5", throughput["ratio_median"], 2.5)]
    summary = [f"server RSS: 4 versions {memory[4] / 2**30:.2f} GiB vs 1 version {memory[1] / 2**30:.2f} GiB = "
               f"{memory_ratio:.3f}x (one base, an adapter per version)",
               f"{len(prompts)} requests over 2 versions: {many} {throughput['a_median']:.2f} req/s vs 1 client "
               f"{throughput['b_median']:.2f} req/s = {throughput['ratio_median']:.2f}x (min-max "
               f"{throughput['ratio_min_max'][0]:.2f}-{throughput['ratio_min_max'][1]:.2f})"]
    payload = {"ratio": memory_ratio, "summary": summary, "model": model_path,
               "rss_bytes": {"1_version": memory[1], "4_versions": memory[4]}, "memory_ratio": memory_ratio,
               "throughput_many_vs_one": throughput, "goals": goals,
               "settings": {"max_new_tokens": args.max_new_tokens, "requests": len(prompts),
                            "clients": args.clients, "dtype": args.dtype},
               "samples": {"spread": spread}}
    common.write_results("serving-versions", args, payload)
    return payload
