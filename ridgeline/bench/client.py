"""`ridgeline bench serve`: drive an OpenAI-compatible server with a generated dataset and time it.

Every request streams (with `stream_options.include_usage`, so token counts come from the
server); the client records the send time, each text-carrying chunk's arrival and the
usage, and `bench.metrics` turns those records into vLLM's metrics. Arrivals follow a
Gamma process (`--burstiness 1` = Poisson) at `--request-rate`, or all at once; an optional
semaphore caps the number in flight (`--max-concurrency`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .datasets import BenchRequest, multi_turn_dataset, prefix_repetition_dataset, random_dataset
from .metrics import BenchMetrics, RequestRecord, compute_metrics, format_table, parse_slos

DATASETS = ("random", "prefix-repetition", "multi-turn")


def add_dataset_arguments(d: argparse._ArgumentGroup, unit: str) -> None:
    """The dataset options, shared with `ridgeline simulate` so both draw the same workloads;
    prompt lengths are in `unit` (words here; the simulator counts each word as one token)."""
    d.add_argument("--dataset", default="random", choices=DATASETS, help="workload (default: random)")
    d.add_argument("--seed", type=int, default=0, help="dataset and arrival seed (default: 0)")
    d.add_argument("--random-input-len", type=int, default=128, help=f"random: prompt {unit} (default: 128)")
    d.add_argument("--random-output-len", type=int, default=64, help="random: output tokens (default: 64)")
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [L(1-r), L(1+r)] (default: 0)")
    d.add_argument("--prefix-repetition-prefix-len", type=int, default=256, help=f"shared prefix {unit} (default: 256)")
    d.add_argument("--prefix-repetition-suffix-len", type=int, default=32, help=f"unique suffix {unit} (default: 32)")
    d.add_argument("--prefix-repetition-num-prefixes", type=int, default=4, help="distinct prefixes (default: 4)")
    d.add_argument("--prefix-repetition-output-len", type=int, default=64, help="output tokens (default: 64)")
    d.add_argument("--multi-turn-num-turns", type=int, default=4, help="turns per conversation (default: 4)")
    d.add_argument("--multi-turn-system-len", type=int, default=128, help=f"shared system prompt {unit} (default: 128)")
    d.add_argument("--multi-turn-user-len", type=int, default=32, help=f"{unit} per user turn (default: 32)")
    d.add_argument("--multi-turn-assistant-len", type=int, default=32, help=f"{unit} per earlier reply (default: 32)")
    d.add_argument("--multi-turn-output-len", type=int, default=64, help="output tokens (default: 64)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: http://127.0.0.1:8000)")
    g.add_argument("--model", default=None, help="model id to send (default: the first from GET /v1/models)")
    g.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY, else none)")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default: 600)")
    d = p.add_argument_group("dataset")
    d.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    add_dataset_arguments(d, "words")
    t = p.add_argument_group("traffic")
    t.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second; inf sends all at once (default: inf)")
    t.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of inter-arrival times: 1 = Poisson, < 1 burstier, > 1 steadier (default: 1)")
    t.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    t.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (default: 0)")
    t.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so every request runs to max_tokens")
    t.add_argument("--num-warmups", type=int, default=1, help="unrecorded requests sent first (default: 1)")
    o = p.add_argument_group("output")
    o.add_argument("--slo", nargs="+", metavar="NAME:MS", help="goodput SLOs, e.g. --slo ttft:500 tpot:50 (e2el too)")
    o.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles (default: 50,90,99)")
    o.add_argument("--result-file", default=None, help="write metrics and settings as JSON here")
    o.add_argument("--save-detailed", action="store_true", help="include per-request records in the JSON")
    o.add_argument("--plot", default=None, metavar="PNG", help="save latency CDFs (TTFT, TPOT, ITL, E2E) as a PNG")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


@dataclass
class BenchConfig:
    base_url: str
    model: str | None = None
    api_key: str | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    timeout: float = 600.0
    num_warmups: int = 1
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (inf = all at once), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.timeout <= 0:
            raise ValueError(f"--timeout must be > 0, got {self.timeout}")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {self.num_warmups}")


def build_dataset(args: argparse.Namespace, text: bool = True) -> list[BenchRequest]:
    """The dataset the options describe; text=False: lengths only (the serving simulator)."""
    n = args.num_prompts
    if args.dataset == "random":
        return random_dataset(n, args.random_input_len, args.random_output_len, args.random_range_ratio, args.seed,
                              text=text)
    if args.dataset == "prefix-repetition":
        return prefix_repetition_dataset(n, args.prefix_repetition_prefix_len, args.prefix_repetition_suffix_len,
                                         args.prefix_repetition_num_prefixes, args.prefix_repetition_output_len,
                                         args.seed, text=text)
    turns = args.multi_turn_num_turns
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_prompts must be an integer >= 1, got {n!r}")
    convs = multi_turn_dataset(-(-n // max(1, turns)), turns, args.multi_turn_system_len, args.multi_turn_user_len,
                               args.multi_turn_assistant_len, args.multi_turn_output_len, args.seed, text=text)
    return convs[:n]


def inter_arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps before requests 1..n-1 (the first goes at t=0): Gamma(shape=burstiness, mean=1/rate)."""
    if math.isinf(rate) or n <= 1:
        return [0.0] * max(0, n - 1)
    rng = np.random.default_rng(seed)
    theta = 1.0 / (rate * burstiness)
    return [float(x) for x in rng.gamma(shape=burstiness, scale=theta, size=n - 1)]


def _payload(req: BenchRequest, cfg: BenchConfig, model: str) -> tuple[str, dict]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": cfg.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if req.is_chat:
        body["messages"] = req.messages
        return "/v1/chat/completions", body
    body["prompt"] = req.prompt
    return "/v1/completions", body


def _chunk_text(obj: dict) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "text" in c:
        return c.get("text") or ""
    return (c.get("delta") or {}).get("content") or ""


async def send_request(client, req: BenchRequest, cfg: BenchConfig, model: str) -> RequestRecord:
    """Stream one request and record its timings; never raises (failures become records)."""
    path, body = _payload(req, cfg, model)
    rec = RequestRecord(success=False, prompt_tokens=req.input_len, start_time=time.perf_counter())
    start = rec.start_time
    last = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = str(obj["error"])[:300]
                    return rec
                if obj.get("usage"):
                    usage = obj["usage"]
                if _chunk_text(obj):
                    if last is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as exc:  # network errors, timeouts, bad JSON: a failed request, not a crash
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    if last is None:
        rec.error = "no text received"
        return rec
    rec.latency = last - start
    rec.output_tokens = int(usage["completion_tokens"]) if usage else chunks
    if usage and usage.get("prompt_tokens") is not None:
        rec.prompt_tokens = int(usage["prompt_tokens"])
    rec.success = True
    return rec


def _client(cfg: BenchConfig, concurrency: int):
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency, 1) + 4, max_keepalive_connections=max(concurrency, 1) + 4)
    return httpx.AsyncClient(base_url=cfg.base_url, headers=headers, limits=limits,
                             timeout=httpx.Timeout(cfg.timeout, connect=30.0))


async def discover_model(client) -> str:
    resp = await client.get("/v1/models")
    if resp.status_code != 200:
        raise ValueError(f"GET /v1/models answered {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") or []
    if not data:
        raise ValueError("GET /v1/models listed no model; pass --model")
    return data[0]["id"]


async def run_benchmark(requests: list[BenchRequest], cfg: BenchConfig) -> tuple[list[RequestRecord], float, str]:
    """Send the dataset; returns the records (in dataset order), the wall time and the model used."""
    from tqdm import tqdm

    concurrency = cfg.max_concurrency or len(requests)
    async with _client(cfg, concurrency) as client:
        model = cfg.model or await discover_model(client)
        for i in range(min(cfg.num_warmups, len(requests))):
            rec = await send_request(client, requests[i], cfg, model)
            if not rec.success:
                raise ValueError(f"the warm-up request failed: {rec.error}")
        gaps = inter_arrival_times(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        bar = tqdm(total=len(requests), desc="bench", disable=not cfg.show_progress, dynamic_ncols=True)

        async def one(req: BenchRequest) -> RequestRecord:
            if sem is None:
                rec = await send_request(client, req, cfg, model)
            else:
                async with sem:
                    rec = await send_request(client, req, cfg, model)
            bar.update(1)
            return rec

        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            if i > 0 and gaps[i - 1] > 0:
                await asyncio.sleep(gaps[i - 1])
            tasks.append(asyncio.create_task(one(req)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return list(records), duration, model


def plot_cdfs(records: list[RequestRecord], path: str, title: str) -> None:
    """Empirical CDFs of TTFT, TPOT, ITL and E2E latency (ms), one panel each (none for a metric
    the records do not have, e.g. ITL in simulated runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.success]
    series = {"TTFT": [r.ttft for r in ok], "TPOT": [r.tpot for r in ok if r.tpot is not None],
              "ITL": [g for r in ok for g in r.itl], "E2E latency": [r.latency for r in ok]}
    series = {k: v for k, v in series.items() if v or k == "TTFT"}
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.6), squeeze=False)
    axes = axes[0]
    for ax, (name, vals) in zip(axes, series.items()):
        if vals:
            x = np.sort(np.asarray(vals) * 1000)
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post")
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of samples")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_from_args(args: argparse.Namespace) -> int:
    try:
        percentiles = tuple(float(p) for p in args.percentiles.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--percentiles must be comma-separated numbers, got {args.percentiles!r}") from None
    if not percentiles or not all(0 <= p <= 100 for p in percentiles):
        raise ValueError(f"--percentiles must be numbers in [0, 100], got {args.percentiles!r}")
    slos = parse_slos(args.slo)
    cfg = BenchConfig(base_url=args.base_url, model=args.model,
                      api_key=args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY"),
                      request_rate=args.request_rate, burstiness=args.burstiness,
                      max_concurrency=args.max_concurrency, temperature=args.temperature,
                      ignore_eos=args.ignore_eos, timeout=args.timeout, num_warmups=args.num_warmups,
                      seed=args.seed, show_progress=not args.disable_tqdm)
    requests = build_dataset(args)
    try:
        records, duration, model = asyncio.run(run_benchmark(requests, cfg))
    except ConnectionError as exc:
        raise OSError(f"cannot reach {cfg.base_url}: {exc}") from None
    except Exception as exc:
        import httpx

        if isinstance(exc, httpx.HTTPError):
            raise OSError(f"cannot reach {cfg.base_url}: {type(exc).__name__}: {exc}") from None
        raise
    metrics = compute_metrics(records, duration, slos, percentiles)
    print(format_table(metrics))
    failures = [r.error for r in records if not r.success]
    if failures:
        print(f"first failure: {failures[0]}", file=sys.stderr)
    if args.result_file:
        write_result(args.result_file, args, cfg, model, metrics, records if args.save_detailed else None)
    if args.plot:
        plot_cdfs(records, args.plot, f"{model} - {args.dataset}, max concurrency {cfg.max_concurrency or 'unbounded'}")
    return 0 if metrics.completed else 1


def write_result(path: str, args: argparse.Namespace, cfg: BenchConfig, model: str, metrics: BenchMetrics,
                 records: list[RequestRecord] | None) -> None:
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "api_key") and not callable(v)}
    settings["request_rate"] = "inf" if math.isinf(cfg.request_rate) else cfg.request_rate
    result: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": model,
                              "settings": settings, "metrics": metrics.to_dict()}
    if records is not None:
        result["requests"] = [asdict(r) for r in records]
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
