"""Arguments and actions of `ridgeline perf probe`, `ridgeline perf calibrate` and `ridgeline plan`."""

from __future__ import annotations

import argparse
import json
import sys

from .hardware import (DTYPE_BYTES, GGUF_FORMAT_BYTES, HardwareSpec, available_specs, load_spec, local_spec_name,
                       save_spec)

PERF_DTYPES = ["float32", "bfloat16", "float16"]  # compute dtypes


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None,
                   help="save the spec under this name (default: local-<device model>, what --hardware local reads)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="small problems, a few seconds (less accurate)")
    p.add_argument("--json", action="store_true", help="print the spec as JSON")


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model to time (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="engine dtype (default: auto, as the engine)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--name", default=None,
                   help="save the calibrated spec under this name (default: local-<device model>, what "
                        "--hardware local reads)")
    p.add_argument("--samples", type=int, default=10, help="calibration steps to time, 1-10 (default: 10)")
    p.add_argument("--repeats", type=int, default=5, help="timings per step, the fastest counts (default: 5)")
    p.add_argument("--no-holdout", action="store_true",
                   help="skip the held-out grid of 46 step shapes (then no `mape` is reported)")
    p.add_argument("--json", action="store_true", help="print the fit, its error and every sample as JSON")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a .gguf file, a checkpoint directory or a config.json (default: SmolLM2-135M-Instruct)")
    p.add_argument("--hardware", default="local",
                   help=f"a known device ({', '.join(available_specs())}), 'local' for this machine's "
                        "calibrated spec, or a spec .json file (default: local)")
    p.add_argument("--dtype", default="bfloat16", choices=PERF_DTYPES, help="compute dtype (default: bfloat16)")
    p.add_argument("--weight-dtype", default=None, choices=list(DTYPE_BYTES),
                   help="weight storage dtype or GGUF format (default: a GGUF's own main format, as the engine "
                        f"keeps it: {', '.join(GGUF_FORMAT_BYTES)}; else the compute dtype)")
    p.add_argument("--kv-dtype", default=None, choices=list(DTYPE_BYTES),
                   help="KV-cache dtype (default: the compute dtype)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default: 512)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (default: 128)")
    p.add_argument("--slo-ttft", type=float, default=None, metavar="MS", help="time-to-first-token SLO in ms")
    p.add_argument("--slo-tpot", type=float, default=None, metavar="MS", help="time-per-output-token SLO in ms")
    p.add_argument("--batch", type=int, default=None,
                   help="fix the concurrency (default: the largest batch meeting the SLOs)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="engine token budget per step")
    p.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the roofline with the operators on it")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative", default=None, choices=["ngram", "draft"],
                   help="also predict the speedup of speculative decoding per batch size (1 to 64) and the best "
                        "number of proposals for each, at the workload's mean context")
    g.add_argument("--acceptance", type=float, default=None, metavar="A",
                   help="probability that a proposed token is accepted, in (0, 1) (needed with --speculative; "
                        "`ridgeline serve` reports the measured one as ridgeline:spec_decode_acceptance_rate)")
    g.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="proposals per sequence and step at most; the best k in 0..K is chosen (default: 4)")
    g.add_argument("--draft-model", default=None, metavar="PATH",
                   help="draft: its checkpoint (.gguf, directory or config.json); its cost per proposed token is "
                        "its weight bytes over the target's, as the engine prices it")
    g.add_argument("--draft-cost", type=float, default=None, metavar="F",
                   help="draft: its time per proposed token as a fraction of the target's step, instead of "
                        "--draft-model")


def run_probe(args: argparse.Namespace) -> int:
    from .probe import probe

    spec = probe(args.name or local_spec_name(), args.device, quick=args.quick)
    path = save_spec(spec)
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2))
    else:
        print(_describe(spec))
        print(f"saved to {path}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    if not 1 <= args.samples <= 10:
        raise ValueError(f"--samples must be in [1, 10], got {args.samples}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if not args.json:
        print("probing peaks, then timing engine steps (about 3 minutes with the held-out grid)...",
              file=sys.stderr, flush=True)
    result = calibrate(args.model, args.dtype, args.device, args.name, args.samples, not args.no_holdout,
                       args.repeats)
    path = save_spec(result.spec)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(_describe(result.spec))
    print(f"\n{'shape':<42}{'measured ms':>12}{'predicted ms':>14}{'error %':>9}")
    for title, samples in (("calibration", result.samples), ("held out", result.holdout)):
        if samples:
            print(f"-- {title}")
        for s in samples:
            print(f"{s.label:<42}{s.measured_s * 1e3:>12.2f}{s.predicted_s * 1e3:>14.2f}{100 * s.error:>9.1f}")
    print(f"\nfit MAPE {result.fit_mape:.1f}% on {len(result.samples)} samples" +
          (f"; held-out MAPE {result.mape:.1f}% on {len(result.holdout)} shapes" if result.mape is not None else ""))
    print(f"saved to {path}")
    return 0


def build_perf_model(args: argparse.Namespace):
    """The PerfModel named by --model, --hardware, --dtype, --weight-dtype and --kv-dtype."""
    from ..loader import load_model_config, stored_weight_format
    from .predictor import PerfModel

    spec = load_spec(args.hardware)
    weight_dtype = args.weight_dtype or stored_weight_format(args.model)
    return PerfModel(load_model_config(args.model), spec, args.dtype, weight_dtype,
                     args.kv_dtype, block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens)


def _speculative_options(args: argparse.Namespace) -> None:
    """Check the --speculative group before anything is read."""
    if args.speculative is None:
        for flag in ("acceptance", "draft_model", "draft_cost"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --speculative ngram|draft")
        return
    if args.acceptance is None:
        raise ValueError("--speculative needs --acceptance A, the probability that a proposal is accepted, in (0, 1)")
    if not 0 < args.acceptance < 1:
        raise ValueError(f"--acceptance must be in (0, 1), got {args.acceptance:g}")
    if args.num_speculative_tokens < 1:
        raise ValueError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    if args.speculative == "ngram":
        if args.draft_model is not None or args.draft_cost is not None:
            raise ValueError("--draft-model and --draft-cost apply to --speculative draft only (ngram lookup costs "
                             "no model step)")
        return
    if (args.draft_model is None) == (args.draft_cost is None):
        raise ValueError("--speculative draft needs exactly one of --draft-model PATH or --draft-cost F")
    if args.draft_cost is not None and not 0 <= args.draft_cost < float("inf"):
        raise ValueError(f"--draft-cost must be a fraction >= 0, got {args.draft_cost:g}")


def draft_cost(args: argparse.Namespace, pm) -> float:
    """A draft's time per proposed token over the target's step: --draft-cost, or --draft-model's
    weight bytes over the target's (what the engine's SpecPolicy takes)."""
    if args.speculative != "draft":
        return 0.0
    if args.draft_cost is not None:
        return args.draft_cost
    from ..loader import load_model_config, stored_weight_format
    from .ops import weight_bytes

    try:
        cfg = load_model_config(args.draft_model)
        fmt = stored_weight_format(args.draft_model) or pm.weight_dtype
    except (OSError, ValueError) as exc:
        raise ValueError(f"--draft-model: {str(exc).removeprefix('model: ')}") from None
    if cfg.vocab_size != pm.model.vocab_size:
        raise ValueError(f"--draft-model: its vocabulary has {cfg.vocab_size} tokens, the target's "
                         f"{pm.model.vocab_size}; a draft must share the target's vocabulary")
    return weight_bytes(cfg, fmt) / pm.weight_bytes


def run_plan(args: argparse.Namespace) -> int:
    from .plan import SPEC_BATCHES, format_plan, format_speculative, plan, plot_roofline, speculative_plan

    _speculative_options(args)
    pm = build_perf_model(args)
    result = plan(pm, args.prompt_len, args.output_len, args.slo_ttft, args.slo_tpot, args.batch)
    spec = None
    if args.speculative is not None:
        cost = draft_cost(args, pm)
        context = args.prompt_len + args.output_len // 2
        batches = sorted({b for b in SPEC_BATCHES if b <= max(1, result.memory_max_batch)}
                         | ({args.batch} if args.batch is not None else set()))
        rows = speculative_plan(pm, context, args.acceptance, args.num_speculative_tokens, cost, tuple(batches))
        spec = {"method": args.speculative, "acceptance": args.acceptance,
                "num_speculative_tokens": args.num_speculative_tokens, "draft_cost": round(cost, 6),
                "context": context, "batches": [r.to_dict() for r in rows]}
    if args.plot:
        plot_roofline(pm, result, args.prompt_len, args.output_len, args.plot)
    if args.json:
        out = {"model": args.model or "SmolLM2-135M-Instruct", "hardware": pm.hw.name, "dtype": pm.dtype,
               "weight_dtype": pm.weight_dtype, "kv_dtype": pm.kv_dtype, "prompt_len": args.prompt_len,
               "output_len": args.output_len, "slo_ttft_ms": args.slo_ttft, "slo_tpot_ms": args.slo_tpot,
               **result.to_dict()}
        if spec is not None:
            out["speculative"] = spec
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(pm, result, args.prompt_len, args.output_len))
        if args.slo_ttft is not None or args.slo_tpot is not None:
            print("SLOs met at this batch" if result.slo_met else "SLOs NOT met at this batch")
        if spec is not None:
            print()
            print(format_speculative(rows, args.speculative, args.acceptance, args.num_speculative_tokens, cost,
                                     spec["context"]))
        if args.plot:
            print(f"roofline plot: {args.plot}")
    return 0


def _describe(spec: HardwareSpec) -> str:
    peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in spec.peak_flops.items())
    lines = [f"hardware spec {spec.name!r}: {peaks}; read bandwidth {spec.memory_bandwidth / 1e9:.1f} GB/s; "
             f"memory {spec.memory_capacity / 2**30:.1f} GiB; dispatch {spec.op_overhead_s * 1e6:.2f} us/op"]
    if spec.calibrated:
        lines.append("fitted: " + ", ".join(
            f"{k} {getattr(spec, k):.3g}" for k in ("compute_efficiency", "memory_efficiency",
                                                   "attention_compute_efficiency", "attention_memory_efficiency",
                                                   "op_overhead_s", "step_overhead_s", "seq_overhead_s")))
    return "\n".join(lines)
