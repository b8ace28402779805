"""Calibration accuracy: fit the performance model on <= 10 timed engine steps, then compare its
predictions with measured step times on the held-out grid of 42 shapes (batch 1-64, context
16-4,096, prefill chunks 16-1,024, mixes). The baseline is the same roofline with the probe's
peaks and default efficiencies, uncalibrated. Prints a markdown table per run and the MAPEs.

    .venv/bin/python benchmarks/bench_calibration.py [--runs 3] [--samples 10] [--dtype auto]
"""

from __future__ import annotations

import argparse
import statistics

from ridgeline.loader import load_model_config
from ridgeline.perf.calibrate import REPEATS, calibrate, predict
from ridgeline.perf.probe import probe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    fitted_mapes, baseline_mapes = [], []
    for run in range(args.runs):
        base = probe("bench-calibration")
        result = calibrate(args.model, args.dtype, name="bench-calibration", num_samples=args.samples,
                           repeats=args.repeats, base=base)
        perf_args = {"model": load_model_config(args.model), "options": {"dtype": result.spec.calibrated["dtype"]}}
        held = result.holdout
        fitted = [s.predicted_s for s in held]
        baseline = predict(base, perf_args, held)
        for s, p in zip(held, fitted):
            s.predicted_s = p
        print(f"\n### run {run + 1}: fit {', '.join(f'{k}={v:.3g}' for k, v in result.to_dict()['fit'].items())}\n")
        print("| shape | measured ms | calibrated ms | error % |")
        print("|---|---|---|---|")
        for s in held:
            print(f"| {s.label} | {s.measured_s * 1e3:.2f} | {s.predicted_s * 1e3:.2f} | {100 * s.error:.1f} |")
        print(f"\nrun {run + 1}: calibration samples {args.samples}, fit MAPE {result.fit_mape:.1f}%, held-out "
              f"MAPE {result.mape:.1f}% on {len(held)} shapes (uncalibrated roofline: {baseline:.1f}%)", flush=True)
        fitted_mapes.append(result.mape)
        baseline_mapes.append(baseline)
    print(f"\nmedian held-out MAPE over {args.runs} runs: calibrated {statistics.median(fitted_mapes):.1f}%, "
          f"uncalibrated {statistics.median(baseline_mapes):.1f}% (runs: "
          f"{', '.join(f'{m:.1f}' for m in fitted_mapes)})")


if __name__ == "__main__":
    main()
