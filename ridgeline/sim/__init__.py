"""Discrete-event serving simulator (`ridgeline simulate`): the engine's scheduling rules on
N replicas of a hardware spec, timed by the calibrated roofline model (ridgeline.perf).

Colocated continuous batching with chunked prefill, or disaggregated prefill and decode
pools with KV transfer; round-robin, least-loaded or prefix-aware routing; the workloads of
`ridgeline bench serve`; the bench's metrics plus utilisation, cache hits and preemptions.
"""

from .config import POLICIES, SimConfig
from .report import format_report, plot_cdfs, records, slo_attainment, summarize
from .router import ROUTERS, LeastLoaded, PrefixAware, RoundRobin, Router, make_router
from .simulator import SimResult, Simulator, build_perf_model, simulate
from .steptime import StepTimer
from .workload import Workload, WorkloadSpec, build_workload, synthetic_workload

__all__ = ["SimConfig", "SimResult", "Simulator", "simulate", "build_perf_model", "POLICIES", "ROUTERS",
           "Router", "RoundRobin", "LeastLoaded", "PrefixAware", "make_router", "StepTimer", "Workload",
           "WorkloadSpec", "build_workload", "synthetic_workload", "summarize", "format_report", "plot_cdfs",
           "records", "slo_attainment"]
