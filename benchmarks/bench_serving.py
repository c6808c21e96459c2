"""Serving: one request through the server vs in-process predict; 8 concurrent clients vs 1; the OpenAI API.

    .venv/bin/python benchmarks/bench_serving.py [--smoke] [--pairs 10] [--max-new-tokens 16] [--dtype bf16]
    .venv/bin/python benchmarks/bench_serving.py --openai      # serving-openai.json (serving_api.py)
    .venv/bin/python benchmarks/bench_serving.py --versions    # serving-versions.json (serving_api.py)

The base model folder is logged as loraflow's pyfunc (serving.log_model: the TextGenerator that
registered models use) into a throw-away MLflow store. The same model URI is loaded in this process
(mlflow.pyfunc.load_model) and served by serving.start_server on 127.0.0.1 (a free port).
Latency: rounds of one single-prompt request over HTTP, then one in-process predict of the same
prompt (goal: HTTP / in-process <= 1.1). Throughput: the same batch of single-prompt requests sent
by 1 client one after another, then by 8 concurrent clients; requests per second per round (goal:
8 clients >= 3x one, which the server's micro-batching gives), the median latency of a concurrent
request against a lone one (goal <= 1.5x), and what batching costs the answers: how many differ
from the lone ones, their token-level agreement, and ROUGE-L against the references, batched and
alone, with a paired bootstrap interval of the difference (in fp32 none may differ; in bf16 another
batch shape rounds differently). The server is always stopped; every loop is bounded.
"""
from __future__ import annotations

import contextlib
import socket
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def log_pyfunc(cfg, model_path: str) -> str:
    """Log `model_path` as loraflow's TextGenerator pyfunc; returns its model URI."""
    import mlflow

    from loraflow import serving

    with mlflow.start_run(run_name="bench-serving"):
        info = serving.log_model(cfg, model_path)
    return info.model_uri


def latency_arms(url: str, predictor, prompt: str, params: dict, answers: dict) -> dict:
    import pandas as pd

    from loraflow import serving

    def http() -> dict:
        seconds, answers["http"] = common.timed(lambda: serving.predict_over_http(url, [prompt], params))
        return {"seconds": seconds}

    def in_process() -> dict:
        seconds, answers["in_process"] = common.timed(
            lambda: list(predictor.predict(pd.DataFrame([{"prompt": prompt}]), params=params)))
        return {"seconds": seconds}
    return {"http": http, "in_process": in_process}


def throughput_arms(url: str, prompts: list[str], params: dict, clients: int, answers: dict) -> dict:
    import statistics

    from loraflow import serving

    def send(prompt) -> tuple[float, list[str]]:
        return common.timed(lambda: serving.predict_over_http(url, [prompt], params))

    def measured(name: str, results: list, seconds: float) -> dict:
        answers[name] = [answer for _, answer in results]
        return {"seconds": seconds, "requests_per_second": len(prompts) / seconds,
                "p50_latency_seconds": statistics.median(latency for latency, _ in results)}

    def one_client() -> dict:
        seconds, results = common.timed(lambda: [send(p) for p in prompts])
        return measured("1_client", results, seconds)

    def many_clients() -> dict:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            seconds, results = common.timed(lambda: list(pool.map(send, prompts)))
        return measured(f"{clients}_clients", results, seconds)
    return {f"{clients}_clients": many_clients, "1_client": one_client}


def parse_args(argv=None):
    parser = common.base_parser(__file__, __doc__, pairs=10)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 16; smoke 4")
    parser.add_argument("--requests", type=int, default=None, help="requests per throughput arm (default 8; smoke 4)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--throughput-pairs", type=int, default=None, help="default 5; smoke 1")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="model.dtype the pyfunc serves in (auto: bf16 where the CPU has it)")
    parser.add_argument("--openai", action="store_true", help="the OpenAI routes against /invocations, and streaming")
    parser.add_argument("--versions", action="store_true", help="4 versions on one base against 1; 2 versions' traffic")
    parser.add_argument("--stream-tokens", type=int, default=None, help="new tokens of --openai's stream (64; smoke 8)")
    args = common.parse(parser, argv)
    args.stream_tokens = args.stream_tokens or (8 if args.smoke else 64)
    args.max_new_tokens = args.max_new_tokens or (4 if args.smoke else 16)
    args.requests = args.requests or (4 if args.smoke else 8)
    args.throughput_pairs = args.throughput_pairs or (1 if args.smoke else 5)
    return args


def main(argv=None) -> dict:
    import mlflow

    from loraflow import data

    args = parse_args(argv)
    common.use_temporary_tracking()
    model_path = common.model_for(args.smoke)
    cfg = common.bench_config(model_path, model={"dtype": args.dtype}, eval={"max_new_tokens": args.max_new_tokens})
    rows = data.prepare(cfg).splits["test"]
    rows = (rows * args.requests)[:args.requests]
    prompts, references = [row["prompt"] for row in rows], [row["target"] for row in rows]
    if args.openai or args.versions:
        import serving_api

        suite = serving_api.openai_suite if args.openai else serving_api.versions_suite
        return suite(args, cfg, model_path, prompts, served)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    model_uri = log_pyfunc(cfg, model_path)
    predictor = mlflow.pyfunc.load_model(model_uri)
    answers: dict[str, list[str]] = {}
    with served(model_uri) as (url, _, startup):
        latency = common.alternate(latency_arms(url, predictor, prompts[0], params, answers), args.pairs, args.warmup)
        throughput = common.alternate(throughput_arms(url, prompts, params, args.clients, answers),
                                      args.throughput_pairs, args.warmup)
    costs = batching_costs(predictor, answers, references, args.clients)
    return report(args, model_path, model_uri, startup, latency, throughput, answers, costs)


def batching_costs(predictor, answers: dict, references: list[str], clients: int) -> dict:
    """What sharing a batch did to the answers: how many differ from the lone ones, the share of the lone answers'
    tokens that the batched ones have at the same position, and ROUGE-L of both against the references with a
    paired bootstrap interval of batched - alone."""
    from loraflow import intervals, metrics

    alone, batched = ([a[0] for a in answers.get(arm, [])] for arm in ("1_client", f"{clients}_clients"))
    tokenizer = predictor.unwrap_python_model().tokenizer
    lone_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in alone]
    batched_ids = [tokenizer(b, add_special_tokens=False)["input_ids"] for b in batched]
    same_tokens = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(lone_ids, batched_ids))
    total = sum(len(a) for a in lone_ids) or 1
    rouge_alone = metrics.rouge_items(["rougeL"], alone, references[:len(alone)])["rougeL"]
    rouge_batched = metrics.rouge_items(["rougeL"], batched, references[:len(batched)])["rougeL"]
    delta = intervals.mean_delta_interval(rouge_alone, rouge_batched, samples=1000)
    from loraflow import models

    served = models.name_of_dtype(predictor.unwrap_python_model().model.dtype)
    return {"served_dtype": served, "differing_answers": sum(a != b for a, b in zip(alone, batched)),
            "answers": len(alone),
            "token_agreement": same_tokens / total,
            "rougeL_alone": sum(rouge_alone) / len(rouge_alone), "rougeL_batched": sum(rouge_batched) / len(rouge_batched),
            "rougeL_delta": {"point": delta.point, "low": delta.low, "high": delta.high}}


@contextlib.contextmanager
def served(model_uri: str, all_versions: bool = False):
    """(url, server process, seconds to ready) of loraflow's server on a free loopback port; always stopped."""
    from loraflow import serving, tracking

    port = free_port()
    url = f"http://{HOST}:{port}"
    log_file = tempfile.NamedTemporaryFile(prefix="bench-serving-", suffix=".log", delete=False)
    process = serving.start_server(model_uri, tracking.connect(), HOST, port, stdout=log_file, stderr=log_file,
                                   all_versions=all_versions)
    try:
        startup, _ = common.timed(lambda: serving.wait_until_ready(url, timeout=300, process=process))
        yield url, process, startup
    finally:
        serving.stop_server(process)
        log_file.close()


def report(args, model_path, model_uri, startup, latency, throughput, answers, costs) -> dict:
    latency_ratio = common.compare(common.column(latency["http"], "seconds"),
                                   common.column(latency["in_process"], "seconds"))
    many = f"{args.clients}_clients"
    throughput_ratio = common.compare(common.column(throughput[many], "requests_per_second"),
                                      common.column(throughput["1_client"], "requests_per_second"))
    p50_ratio = common.compare(common.column(throughput[many], "p50_latency_seconds"),
                               common.column(throughput["1_client"], "p50_latency_seconds"))
    same = answers.get(many) == answers.get("1_client")
    goals = [common.goal(f"throughput {many} / 1 client >= 3", throughput_ratio["ratio_median"], 3.0),
             common.goal(f"p50 latency {many} / 1 client <= 1.5", p50_ratio["ratio_median"], 1.5,
                         higher_is_better=False),
             common.goal("latency HTTP / in-process predict <= 1.1", latency_ratio["ratio_median"], 1.1,
                         higher_is_better=False),
             ] + ([common.goal(f"answers {many} == 1 client in fp32 (mismatching requests)",
                               costs["differing_answers"], 0, higher_is_better=False)]
                  if costs["served_dtype"] == "fp32" else [])
    summary = [f"one request, {args.max_new_tokens} new tokens: HTTP {latency_ratio['a_median'] * 1e3:.0f} ms vs "
               f"in-process {latency_ratio['b_median'] * 1e3:.0f} ms = {latency_ratio['ratio_median']:.2f}x "
               f"(min-max {latency_ratio['ratio_min_max'][0]:.2f}-{latency_ratio['ratio_min_max'][1]:.2f})",
               f"{args.requests} requests: {args.clients} clients {throughput_ratio['a_median']:.2f} req/s vs 1 client "
               f"{throughput_ratio['b_median']:.2f} req/s = {throughput_ratio['ratio_median']:.2f}x (min-max "
               f"{throughput_ratio['ratio_min_max'][0]:.2f}-{throughput_ratio['ratio_min_max'][1]:.2f}; one uvicorn "
               f"worker; concurrent greedy requests micro-batched in every dtype); p50 latency {p50_ratio['a_median'] * 1e3:.0f} ms vs "
               f"{p50_ratio['b_median'] * 1e3:.0f} ms alone = {p50_ratio['ratio_median']:.2f}x; same answers: {same}; "
               f"server start {startup:.1f} s",
               f"batching's cost: {costs['differing_answers']} of {costs['answers']} answers differ from the lone "
               f"ones, token agreement {costs['token_agreement']:.3f}; ROUGE-L batched {costs['rougeL_batched']:.3f} vs "
               f"alone {costs['rougeL_alone']:.3f}, difference {costs['rougeL_delta']['point']:+.3f} "
               f"[{costs['rougeL_delta']['low']:+.3f}, {costs['rougeL_delta']['high']:+.3f}]"]
    payload = {"ratio": throughput_ratio["ratio_median"], "summary": summary, "model": model_path,
               "batching_costs": costs, "model_uri": model_uri, "server_startup_seconds": startup,
               "settings": {"max_new_tokens": args.max_new_tokens, "requests": args.requests,
                            "clients": args.clients, "throughput_pairs": args.throughput_pairs, "workers": 1,
                            "dtype": args.dtype},
               "latency_http_vs_in_process": latency_ratio, "throughput_many_vs_one": throughput_ratio,
               "p50_latency_many_vs_one": p50_ratio, "same_answers_concurrent_and_sequential": same,
               "same_answer_http_and_in_process": answers.get("http") == answers.get("in_process"),
               "goals": goals, "samples": {"latency": latency, "throughput": throughput}}
    common.write_results("serving" if args.dtype == "auto" else f"serving-{args.dtype}", args, payload)
    return payload


if __name__ == "__main__":
    main()
