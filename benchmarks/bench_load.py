"""Load: concurrent clients send a fixed mix of good and bad requests to loraflow's server for minutes.

    .venv/bin/python benchmarks/bench_load.py [--smoke] [--clients 8] [--seconds 180] [--max-new-tokens 8]

The model folder is logged as loraflow's pyfunc (serving.log_model) into a throw-away store and served
by serving.start_server on 127.0.0.1 (a free port). Each client thread cycles through the same list of
requests (good ones, long-prompt ones, and bad ones: broken JSON, no prompt column, too many rows,
out-of-range max_new_tokens / seed / top_p) until the time is up, each request bounded by a client
timeout. Goals: no 5xx on a good request, every bad request a 4xx, no response lost (no connection
error or client timeout). Reported: p50/p99 latency of good requests, the server's resident memory
(all its processes) at start and end. Every loop is bounded in time and count; the server is stopped.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_serving import log_pyfunc, served  # noqa: E402

MAX_REQUESTS_PER_CLIENT = 100_000


def request_mix(prompt: str, max_new_tokens: int) -> list[tuple[str, bool, bytes]]:
    """(label, is_good, body) requests the clients cycle through."""
    from loraflow import serving

    def body(prompts, **params):
        return json.dumps({"dataframe_records": [{"prompt": p} for p in prompts],
                          "params": {"max_new_tokens": max_new_tokens, **params}}).encode()
    return [("one prompt", True, body([prompt])),
            ("two prompts", True, body([prompt, prompt[:20]])),
            ("sampled", True, body([prompt], do_sample=True, temperature=0.7, seed=3)),
            ("long prompt", True, body([" ".join([prompt] * 400)])),
            ("broken json", False, b"{not json"),
            ("no prompt column", False, json.dumps({"dataframe_records": [{"question": "hi"}]}).encode()),
            ("too many rows", False, body(["hi"] * (serving.MAX_ROWS + 1))),
            ("max_new_tokens over the cap", False, body(["hi"], max_new_tokens=10**6)),
            ("seed out of range", False, body(["hi"], seed=-1)),
            ("top_p out of range", False, body(["hi"], top_p=0.0))]


def send(url: str, body: bytes, timeout: float) -> tuple[int | None, float]:
    """(HTTP status or None when the response was lost, seconds)."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, time.perf_counter() - started
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, time.perf_counter() - started


def client(url: str, mix: list, offset: int, deadline: float, timeout: float, results: list) -> None:
    for count in range(MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= deadline:
            return
        label, good, body = mix[(offset + count) % len(mix)]
        status, seconds = send(url, body, timeout)
        results.append({"label": label, "good": good, "status": status, "seconds": seconds})


def server_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the server's process group (the CLI and its uvicorn workers)."""
    total_kb = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: the process group
                status = (stat.parent / "status").read_text()
                total_kb += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        except (OSError, ValueError, IndexError, StopIteration):
            continue
    return total_kb / 1024


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def summarise(results: list[dict]) -> dict:
    good = [r for r in results if r["good"]]
    bad = [r for r in results if not r["good"]]
    return {"requests": len(results), "good": len(good), "bad": len(bad),
            "good_5xx": sum(1 for r in good if r["status"] and r["status"] >= 500),
            "good_not_200": sum(1 for r in good if r["status"] != 200),
            "bad_not_4xx": sum(1 for r in bad if not (r["status"] and 400 <= r["status"] < 500)),
            "lost": sum(1 for r in results if r["status"] is None),
            "p50_seconds": percentile([r["seconds"] for r in good if r["status"] == 200], 50),
            "p99_seconds": percentile([r["seconds"] for r in good if r["status"] == 200], 99),
            "statuses": {label: sorted({str(r["status"]) for r in results if r["label"] == label})
                         for label in dict.fromkeys(r["label"] for r in results)}}


def parse_args(argv=None):
    parser = common.base_parser(__file__, __doc__, pairs=1, smoke_pairs=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None, help="how long the clients send (default 180; smoke 8)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--client-timeout", type=float, default=120.0)
    args = common.parse(parser, argv)
    args.seconds = args.seconds or (8.0 if args.smoke else 180.0)
    return args


def main(argv=None) -> dict:
    from loraflow import data

    args = parse_args(argv)
    common.use_temporary_tracking()
    model_path = common.model_for(args.smoke)
    cfg = common.bench_config(model_path, eval={"max_new_tokens": args.max_new_tokens})
    prompt = data.prepare(cfg).splits["test"][0]["prompt"]
    model_uri, results = log_pyfunc(cfg, model_path), []
    with served(model_uri) as (url, process, _):
        rss_start = server_rss_mb(process.pid)
        mix, deadline = request_mix(prompt, args.max_new_tokens), time.monotonic() + args.seconds
        threads = [threading.Thread(target=client, args=(url, mix, i, deadline, args.client_timeout, results))
                   for i in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=args.seconds + args.client_timeout + 60)
        wall = time.perf_counter() - started
        rss_end = server_rss_mb(process.pid)
    return report(args, model_path, summarise(results), wall, rss_start, rss_end)


def report(args, model_path: str, counts: dict, wall: float, rss_start: float, rss_end: float) -> dict:
    expected = counts["requests"] - counts["good_not_200"] - counts["bad_not_4xx"] - counts["lost"]
    ratio = expected / max(counts["requests"], 1)
    goals = [common.goal("good requests answered with no 5xx (count)", counts["good_5xx"], 0, higher_is_better=False),
             common.goal("bad requests not answered 4xx (count)", counts["bad_not_4xx"], 0, higher_is_better=False),
             common.goal("responses lost (count)", counts["lost"], 0, higher_is_better=False),
             common.goal("requests answered as expected (share)", ratio, 1.0)]
    summary = [f"{args.clients} clients for {wall:.0f} s: {counts['requests']} requests ({counts['good']} good, "
               f"{counts['bad']} bad); good: {counts['good_5xx']} 5xx, p50 {counts['p50_seconds']:.2f} s, "
               f"p99 {counts['p99_seconds']:.2f} s; bad not 4xx: {counts['bad_not_4xx']}; lost: {counts['lost']}; "
               f"server RSS {rss_start:.0f} -> {rss_end:.0f} MB"]
    payload = {"ratio": ratio, "summary": summary, "model": model_path, "counts": counts, "wall_seconds": wall,
               "server_rss_mb": {"start": rss_start, "end": rss_end},
               "settings": {"clients": args.clients, "seconds": args.seconds, "max_new_tokens": args.max_new_tokens,
                            "client_timeout": args.client_timeout},
               "goals": goals, "samples": {"statuses": counts["statuses"]}}
    common.write_results("load", args, payload)
    return payload


if __name__ == "__main__":
    main()
