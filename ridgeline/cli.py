"""Command line: `ridgeline generate PROMPT`, `chat`, `serve`, `bench serve`, `perf probe|calibrate`,
`plan` and `simulate`.

Bad input (an invalid sampling option, a missing model file, an empty prompt) prints one
line `error: <message>` to stderr and exits with status 2; there are no tracebacks for
mistakes the user can fix. Subcommands live in `_build_parser`; add new ones there.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any, NoReturn

from .core.config import QUANTIZATION_MODES

EXIT_USAGE = 2
# Exceptions that mean "the input was wrong": SamplingParams, EngineConfig, LLM and the
# loader raise these with messages that name the offending field or path.
USER_ERRORS = (ValueError, TypeError, OSError)


class UsageError(Exception):
    """Bad input detected by the CLI itself."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line in the same `error: ...` form as ours."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see '{self.prog} --help')")


def _fail(message: Any, status: int = EXIT_USAGE) -> NoReturn:
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(status)


def _quiet() -> None:
    """Keep stdout/stderr to what the user asked for: no library warnings or progress bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("ridgeline").setLevel(logging.WARNING)


# ---------------------------------------------------------------- arguments

def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="a .gguf file or a Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct Q4_1)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = bfloat16 on GPUs and CPUs with AVX512-BF16/AMX, else float32")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's context length)")
    g.add_argument("--kv-cache-memory", default="2GiB", help="KV cache budget, e.g. 512MiB, 2GiB (default: 2GiB)")
    g.add_argument("--quantization", default="auto", choices=list(QUANTIZATION_MODES),
                   help="auto (default): a GGUF's quantized weights stay in their formats (Q4_0/1, Q5_0/1, Q8_0, "
                        "Q4_K, Q5_K, Q6_K); none: dequantize to --dtype; q8_0 / q4_0 / q4_k: also quantize dense "
                        "weights (Hugging Face checkpoints) to that format at load")
    g.add_argument("--quant-activation-bytes", type=int, default=1, choices=[1, 2],
                   help="bytes per activation value in the quantized matmuls: 1 (default; 8 bits, llama.cpp's "
                        "numerics) or 2 (about 15 bits: greedy outputs follow the float32 reference, ~1.7-2x slower)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model's matmuls and kernels (>= 1; default: PyTorch's, one per core)")
    g.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="fused C kernels for norms, rotary, SiLU and decode attention on CPU, compiled at first "
                        "use with the system C compiler (default: on; off = PyTorch ops only)")
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative", default=None, metavar="ngram|PATH",
                   help="propose tokens and verify them in one target step, losslessly: 'ngram' looks them "
                        "up in the sequence's own context (prompt lookup), PATH runs a draft model (a .gguf "
                        "file or checkpoint directory sharing the target's vocabulary) (default: off)")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="tokens proposed per sequence and step at most (default: 4)")
    g.add_argument("--prompt-lookup-min", type=int, default=None, metavar="N",
                   help="ngram: shortest n-gram matched against the context (default: 3)")
    g.add_argument("--prompt-lookup-max", type=int, default=None, metavar="N",
                   help="ngram: longest n-gram matched, tried first (default: 4)")
    g.add_argument("--no-speculative-adaptive", dest="speculative_adaptive", action="store_false", default=None,
                   help="always propose K tokens (default: choose 0..K each step from the performance model "
                        "and the measured acceptance rate; the first run probes this machine for a few seconds)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    g.add_argument("--temperature", type=float, help="0 = greedy (default: 1.0)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default: 1.0)")
    g.add_argument("--top-k", type=int, help="keep the K most likely tokens; 0 or -1 = off (default: 0)")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p * p(max) (default: 0)")
    g.add_argument("--seed", type=int, help="per-request sampling seed")
    g.add_argument("--repetition-penalty", type=float, help="> 0; 1 = off (default: 1.0)")
    g.add_argument("--presence-penalty", type=float, help="in [-2, 2] (default: 0)")
    g.add_argument("--frequency-penalty", type=float, help="in [-2, 2] (default: 0)")
    g.add_argument("--stop", action="append", metavar="STR", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "stop")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ridgeline", description="ridgeline: LLM inference in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, streaming the text to stdout",
                         description="Complete PROMPT and print the text (streamed as it is generated when n = 1).")
    gen.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the model's chat template")
    gen.add_argument("--system", default=None, help="system message (implies --chat)")
    gen.add_argument("--n", type=int, default=1, help="number of samples (default: 1)")
    gen.add_argument("--logprobs", type=int, default=None, metavar="K",
                     help="print each generated token's logprob and the top K alternatives")
    _sampling_args(gen)
    _engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat on stdin/stdout",
                          description="Chat with the model: one user message per line. "
                                      "/reset clears the conversation; /exit, /quit or EOF ends it.")
    chat.add_argument("--system", default=None, help="system message")
    _sampling_args(chat)
    _engine_args(chat)
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Serve the model over an OpenAI-compatible HTTP API "
                                       "(/v1/completions, /v1/chat/completions, /v1/responses, /v1/models, "
                                       "/tokenize, /detokenize, /tokenizer_info, /health, /metrics).")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes and the tokenizer endpoints "
                            "(default: $RIDGELINE_API_KEY, else none)")
    serve.add_argument("--max-queue", type=int, default=None, metavar="N",
                       help="at most N requests waiting to run; more get 503 (default: unbounded)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients send (default: the model file name without .gguf)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                       help="on SIGTERM/SIGINT, seconds to let in-flight requests finish (default: 30)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--tool-call-parser", default="hermes", choices=["hermes", "llama3"],
                       help="format of tool calls in the model's output (default: hermes, <tool_call> JSON blocks)")
    g = serve.add_argument_group("connections and requests")
    g.add_argument("--max-request-bytes", default="4MiB", metavar="SIZE",
                   help="largest request body, e.g. 4MiB or 500000; larger ones get 413 (default: 4MiB)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="a request head (line and headers) must arrive within S seconds of the connection "
                        "or of its first byte, else 408 and close (default: 10)")
    g.add_argument("--idle-timeout", type=float, default=10.0, metavar="S",
                   help="close a keep-alive connection idle for S seconds, and answer 408 to a body that "
                        "stalls that long (default: 10)")
    g.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="open connections at most; one more is answered 503 and closed (default: 1024)")
    g.add_argument("--allowed-hosts", default=None, metavar="H[,H...]",
                   help="Host header values (names or addresses; '*' for any) the server answers; others get "
                        "421 (default: the --host address, localhost, 127.0.0.1 and ::1; for 0.0.0.0 or :: "
                        "also any IP address and this machine's name)")
    _engine_args(serve)
    g = serve.add_argument_group("scheduling")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch at most (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step (default: 2048)")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    from .bench.client import add_arguments as _bench_serve_args

    bs = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server",
                              description="Send a generated dataset to an OpenAI-compatible server and "
                                          "report TTFT, TPOT, ITL, E2E latency, throughput and goodput "
                                          "(vLLM's benchmark definitions).")
    _bench_serve_args(bs)
    bs.set_defaults(func=cmd_bench_serve)

    from .perf import cli as perf_cli

    perf = sub.add_parser("perf", help="hardware specs: measure or calibrate this machine",
                          description="Measure this machine (probe) or fit the performance model to it (calibrate).")
    perf_sub = perf.add_subparsers(dest="perf_command", metavar="PERF", required=True)
    probe = perf_sub.add_parser("probe", help="measure matmul rates, memory bandwidth and dispatch overhead",
                                description="Measure this machine's peaks and save them as a hardware spec.")
    perf_cli.add_probe_arguments(probe)
    probe.set_defaults(func=perf_cli.run_probe)
    cal = perf_sub.add_parser("calibrate", help="fit the performance model to timed engine steps",
                              description="Time at most 10 engine steps, fit the model's efficiency and "
                                          "overhead terms, report the error on a held-out grid of step "
                                          "shapes, and save the spec (default name: local).")
    perf_cli.add_calibrate_arguments(cal)
    cal.set_defaults(func=perf_cli.run_calibrate)

    plan = sub.add_parser("plan", help="predict TTFT, TPOT, throughput and the largest batch on a device",
                          description="Roofline capacity planner: serving figures for a model on a hardware "
                                      "spec, and the largest batch meeting the SLOs.")
    perf_cli.add_plan_arguments(plan)
    plan.set_defaults(func=perf_cli.run_plan)

    from .sim import cli as sim_cli

    sim = sub.add_parser("simulate", help="discrete-event simulation of serving on N replicas",
                         description="Simulate a workload on replicas of a hardware spec with step times from "
                                     "the performance model and the engine's scheduling rules.")
    sim_cli.add_arguments(sim)
    sim.set_defaults(func=sim_cli.run_from_args)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("ridgeline")
    except Exception:
        return "unknown"


def _sampling_params(args: argparse.Namespace, **extra: Any):
    from .sampling_params import SamplingParams

    kwargs = {f: getattr(args, f) for f in _SAMPLING_FIELDS if getattr(args, f) is not None}
    kwargs["ignore_eos"] = args.ignore_eos
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    return SamplingParams(**kwargs)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine options, checked without loading the model (so mistakes fail fast)."""
    from .core.config import EngineConfig

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    kwargs = dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                  kv_cache_memory=args.kv_cache_memory, quantization=args.quantization,
                  quant_activation_bytes=args.quant_activation_bytes, cpu_kernels=args.cpu_kernels,
                  num_threads=args.threads)
    kwargs.update(_speculative_kwargs(args))
    config = EngineConfig.from_kwargs(model=args.model, **kwargs)
    if config.speculative.method == "draft":
        _check_draft(args.model, config.speculative.model)
    return kwargs


_SPEC_OPTIONS = ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "speculative_adaptive")


def _speculative_kwargs(args: argparse.Namespace) -> dict:
    """--speculative and its tuning flags (only those given; the tuning flags need --speculative)."""
    given = {name: getattr(args, name) for name in _SPEC_OPTIONS if getattr(args, name) is not None}
    if args.speculative is None:
        if given:
            flag = "--no-speculative-adaptive" if "speculative_adaptive" in given else \
                f"--{next(iter(given)).replace('_', '-')}"
            raise UsageError(f"{flag} needs --speculative ngram|PATH")
        return {}
    if ("prompt_lookup_min" in given or "prompt_lookup_max" in given) and args.speculative != "ngram":
        raise UsageError("--prompt-lookup-min/--prompt-lookup-max apply to --speculative ngram only")
    return {"speculative": args.speculative, **given}


def _check_draft(model: str | None, draft: str) -> None:
    """The draft checkpoint exists and shares the target's vocabulary size: checked from the
    files' metadata, before either model loads (the tokenizers are compared after loading)."""
    from .loader import load_model_config, resolve_model_path

    try:
        resolve_model_path(draft)
        draft_vocab = load_model_config(draft).vocab_size
    except (OSError, ValueError) as exc:
        text = str(exc).removeprefix("model: ")
        raise UsageError(f"--speculative takes 'ngram' or a draft model: {text}") from None
    try:
        target_vocab = load_model_config(model).vocab_size
    except (OSError, ValueError):
        return  # the target's own error comes from its load, as without --speculative
    if draft_vocab != target_vocab:
        raise UsageError(f"--speculative: the draft model's vocabulary has {draft_vocab} tokens, the target's "
                         f"{target_vocab}; a draft must share the target's vocabulary")


def _load_llm(args: argparse.Namespace):
    from .llm import LLM

    return LLM(model=args.model, **_engine_kwargs(args))


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------- generate

def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise UsageError("prompt must be a non-empty string")
    chat = args.chat or args.system is not None
    # Validate the options before the (slow) model load.
    params = _sampling_params(args, n=args.n, logprobs=args.logprobs)
    llm = _load_llm(args)
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        messages.append({"role": "user", "content": prompt})
        request = llm.render_chat(messages)
    else:
        request = prompt

    if params.n == 1 and params.logprobs is None:
        for piece in llm.stream(request, params):
            _write(piece)
        _write("\n")
        return 0

    out = llm.generate(request, params, use_tqdm=False)[0]
    for comp in out.outputs:
        if params.n > 1:
            _write(f"=== sample {comp.index + 1}/{params.n} (finish: {comp.finish_reason}) ===\n")
        _write(comp.text + "\n")
        if comp.logprobs is not None:
            _write(_format_logprobs(comp.logprobs, comp.token_ids))
    return 0


def _format_logprobs(positions: list, token_ids: list[int]) -> str:
    lines = ["--- logprobs (token, logprob, rank | top alternatives) ---"]
    for tok, entry in zip(token_ids, positions):
        chosen = entry[tok]
        alts = sorted((lp for tid, lp in entry.items() if tid != tok), key=lambda lp: lp.rank)
        top = ", ".join(f"{lp.decoded_token!r} {lp.logprob:.3f}" for lp in alts)
        line = f"{chosen.decoded_token!r}\t{chosen.logprob:.4f}\t{chosen.rank}"
        lines.append(f"{line}\t| {top}" if top else line)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- chat

def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _load_llm(args)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
        print("ridgeline chat: /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history: list[dict] = list(system)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            if tty:
                _write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(system)
            if tty:
                print("(conversation cleared)", file=sys.stderr)
            continue
        messages = history + [{"role": "user", "content": text}]
        try:
            request = llm.render_chat(messages)
            pieces = []
            for piece in llm.stream(request, params):
                pieces.append(piece)
                _write(piece)
        except ValueError as exc:  # e.g. the conversation outgrew max_model_len: keep the session
            print(f"error: {' '.join(str(exc).split())} (/reset clears the conversation)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply only; the turn is dropped
            _write("\n")
            continue
        _write("\n")
        history = messages + [{"role": "assistant", "content": "".join(pieces)}]


# ---------------------------------------------------------------- serve / bench

def cmd_serve(args: argparse.Namespace) -> int:
    from .core.config import EngineConfig, parse_memory_size

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue is not None and args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    for name in ("header_timeout", "idle_timeout"):
        value = getattr(args, name)
        if not 0 < value < float("inf"):
            raise UsageError(f"--{name.replace('_', '-')} must be > 0 seconds, got {value}")
    if args.max_connections < 1:
        raise UsageError(f"--max-connections must be >= 1, got {args.max_connections}")
    try:
        max_request_bytes = parse_memory_size(args.max_request_bytes)
    except ValueError:
        raise UsageError(f"--max-request-bytes: cannot parse {args.max_request_bytes!r}; use bytes or e.g. "
                         "'4MiB', '512KiB' (> 0)") from None
    allowed_hosts = [h.strip() for h in args.allowed_hosts.split(",")] if args.allowed_hosts is not None else None
    from .server.hosts import host_policy

    try:
        host_policy(args.host, allowed_hosts)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("RIDGELINE_API_KEY") or None
    kwargs = _engine_kwargs(args)
    # every option is checked here, before the model loads
    config = EngineConfig.from_kwargs(model=args.model, max_num_seqs=args.max_num_seqs,
                                      max_num_batched_tokens=args.max_num_batched_tokens, **kwargs)
    _check_listen(args.host, args.port)
    from .server.serve import ServeOptions, serve

    logging.getLogger("ridgeline").setLevel(getattr(logging, args.log_level.upper()))
    logging.basicConfig(format="%(levelname)s: %(message)s")
    return serve(config, ServeOptions(host=args.host, port=args.port, api_key=api_key, max_queue=args.max_queue,
                                      served_model_name=args.served_model_name,
                                      shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                                      max_request_bytes=max_request_bytes, header_timeout=args.header_timeout,
                                      idle_timeout=args.idle_timeout, max_connections=args.max_connections,
                                      allowed_hosts=allowed_hosts, tool_call_parser=args.tool_call_parser))


def _check_listen(host: str, port: int) -> None:
    """Fail fast (before the slow model load) when the address cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host!r}: {exc}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench.client import run_from_args

    return run_from_args(args)


# ---------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `ridgeline generate ... | head -1`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (UsageError, MemoryError, *USER_ERRORS) as exc:
        if os.environ.get("RIDGELINE_DEBUG"):
            raise
        if isinstance(exc, MemoryError):  # the engine's OutOfMemory says what ran out and what to change
            _fail(str(exc) if str(exc).startswith("out of memory") else f"out of memory ({exc})", status=1)
        _fail(exc)


if __name__ == "__main__":
    sys.exit(main())
