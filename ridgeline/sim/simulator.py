"""The discrete-event loop: arrivals, routing, replica steps, KV transfers, closed-loop sends.

Events are replica step ends (a general step or a run of decode-only steps), replica starts
(an idle replica woken by work), KV-transfer ends, and requests reaching the server after the
client latency; sends come from the workload's sorted send times and go first on ties, so a
request arriving exactly at a step boundary joins that boundary's schedule. With a client
latency > 0 a closed-loop client's next request, sent when it sees the previous one finish,
reaches the engine after the next step has started and waits for that step: the one-step
admission delay a real server has at high concurrency. Policies:

- colocated: every replica runs whole requests with chunked prefill mixed into decode steps
  (Sarathi-Serve).
- disaggregated: prefill replicas compute prompts and sample the first token (TTFT ends
  there, as in DistServe and Splitwise); the KV then moves to the least-loaded decode
  replica once that replica has room for it (max_num_seqs and blocks, reserved on arrival of
  the request in its queue), over the prefill replica's link, one transfer at a time; the
  prefill side frees the blocks when the transfer ends.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from ..hydragen import HydragenConfig
from ..kv_cache import parse_memory_size
from ..perf import PerfModel, load_spec
from .cache import BlockPool
from .replica import COLOCATED, DECODE_ONLY, PREFILL_ONLY, EngineLimits, Replica, ReplicaStats, Seq
from .router import ROUTERS, LeastLoaded, make_router
from .steptime import StepTimer
from .workload import Workload

POLICIES = ("colocated", "disaggregated")
_HYDRAGEN = HydragenConfig()  # the engine's defaults with PyTorch attention (GPUs; CPU: see hydragen.py)
_STEP_END, _START, _TX_END, _ARRIVE = 0, 1, 2, 3


@dataclass
class SimConfig:
    model: str | None = None  # checkpoint, GGUF or bare config.json; None: the default model
    hardware: str = "local"  # registry name, saved spec ('local') or spec JSON path
    dtype: str = "bfloat16"
    kv_dtype: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | str | None = None  # per replica; None: what the device leaves after weights
    enable_prefix_caching: bool = True
    # Hydragen shared-prefix decode attention, as EngineConfig (ridgeline/hydragen.py)
    enable_hydragen: bool = True
    hydragen_min_saved_tokens: int = _HYDRAGEN.min_saved_tokens
    hydragen_min_saved_fraction: float = _HYDRAGEN.min_saved_fraction
    max_model_len: int | None = None  # None: the model's context length
    replicas: int = 1
    policy: str = "colocated"
    prefill_replicas: int | None = None  # disaggregated; None: half the replicas
    link_bandwidth: float = 25.0  # GB/s per prefill replica's outgoing link
    link_latency: float = 0.0  # ms per transfer
    router: str = "least-loaded"
    # ms one way between the clients and the servers (HTTP, tokenization, output delivery): a
    # request reaches its replica this long after it is sent, and its tokens reach the client
    # this long after they are sampled; latencies are measured at the client
    client_latency: float = 0.0

    def validate(self) -> None:
        def integer(name: str, value, low: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")

        integer("replicas", self.replicas, 1)
        integer("max-num-seqs", self.max_num_seqs, 1)
        integer("max-num-batched-tokens", self.max_num_batched_tokens, 1)
        integer("block-size", self.block_size, 1)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be >= --max-num-seqs "
                             f"({self.max_num_seqs}) so every running sequence can advance each step")
        if self.max_model_len is not None:
            integer("max-model-len", self.max_model_len, 2)
        if not isinstance(self.enable_hydragen, bool):
            raise ValueError(f"enable_hydragen must be True or False, got {self.enable_hydragen!r}")
        integer("hydragen-min-saved-tokens", self.hydragen_min_saved_tokens, 1)
        f = self.hydragen_min_saved_fraction
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1):
            raise ValueError(f"--hydragen-min-saved-fraction must be a number in [0, 1], got {f!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"--router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.policy == "disaggregated":
            if self.replicas < 2:
                raise ValueError(f"--policy disaggregated needs --replicas >= 2 (a prefill and a decode pool), "
                                 f"got {self.replicas}")
            p = self.num_prefill
            if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= self.replicas - 1:
                raise ValueError(f"--prefill-replicas must be an integer in [1, {self.replicas - 1}] "
                                 f"(--replicas minus one), got {p!r}")
        elif self.prefill_replicas is not None:
            raise ValueError("--prefill-replicas applies to --policy disaggregated only")
        if not (isinstance(self.link_bandwidth, (int, float)) and math.isfinite(self.link_bandwidth)
                and self.link_bandwidth > 0):
            raise ValueError(f"--link-bandwidth must be a finite number of GB/s > 0, got {self.link_bandwidth!r}")
        if not (isinstance(self.link_latency, (int, float)) and math.isfinite(self.link_latency)
                and self.link_latency >= 0):
            raise ValueError(f"--link-latency must be a finite number of ms >= 0, got {self.link_latency!r}")
        if not (isinstance(self.client_latency, (int, float)) and math.isfinite(self.client_latency)
                and self.client_latency >= 0):
            raise ValueError(f"--client-latency must be a finite number of ms >= 0, got {self.client_latency!r}")
        if self.kv_cache_memory is not None:
            try:
                parse_memory_size(self.kv_cache_memory)
            except ValueError as exc:
                raise ValueError(f"--kv-cache-memory: {exc}") from None

    @property
    def num_prefill(self) -> int:
        if self.policy != "disaggregated":
            return 0
        return self.prefill_replicas if self.prefill_replicas is not None else max(1, self.replicas // 2)


def build_perf_model(cfg: SimConfig) -> PerfModel:
    """The step-time model of one replica (raises HardwareSpecError for an unknown --hardware)."""
    from ..loader import load_model_config

    hw = load_spec(cfg.hardware)
    model = load_model_config(cfg.model)
    try:
        return PerfModel(model, hw, dtype=cfg.dtype, kv_dtype=cfg.kv_dtype, block_size=cfg.block_size,
                         max_num_batched_tokens=cfg.max_num_batched_tokens)
    except ValueError as exc:
        raise ValueError(f"--dtype/--kv-dtype: {exc}") from None


@dataclass
class SimResult:
    config: SimConfig
    num_requests: int
    sent: list[float]  # send times (s), the latency origin
    first_token: list[float]
    finish: list[float]
    prompt_len: list[int]
    output_len: list[int]
    preemptions: list[int]
    hit_tokens: list[int]
    transfer_s: list[float]  # disaggregated: first token to KV on the decode replica (queue + link)
    replica_roles: list[str]
    replica_stats: list[ReplicaStats]
    kv_blocks: int  # per replica
    makespan_s: float  # first send to last finish
    wall_s: float  # simulator run time
    max_in_flight: int
    timer_fast: bool
    meta: dict = field(default_factory=dict)

    def settings(self) -> dict:
        return asdict(self.config)


class Simulator:
    def __init__(self, config: SimConfig, workload: Workload, perf_model: PerfModel | None = None):
        config.validate()
        self.cfg = config
        self.wl = workload
        self.pm = perf_model or build_perf_model(config)
        mem = parse_memory_size(config.kv_cache_memory) if config.kv_cache_memory is not None else None
        self.kv_blocks = self.pm.kv_blocks(mem)
        if self.kv_blocks < 1:
            raise ValueError(f"--hardware {config.hardware}: the model's weights and activations leave no memory "
                             f"for the KV cache; pass --kv-cache-memory or pick a larger device")
        # As the engine: Hydragen needs shared blocks (prefix caching here; the simulator has no
        # n-sample forks) and is not used with sliding-window attention.
        hydragen = None
        if (config.enable_hydragen and config.enable_prefix_caching and self.pm.model.sliding_window is None
                and any(workload.chains)):  # (no shared prefix: nothing to account for)
            hydragen = HydragenConfig(config.hydragen_min_saved_tokens, config.hydragen_min_saved_fraction)
        self.limits = EngineLimits(config.max_num_seqs, config.max_num_batched_tokens, config.block_size, hydragen)
        self.timer = StepTimer(self.pm, config.max_num_batched_tokens, config.max_num_seqs)
        self._check_workload()

        n_pre = config.num_prefill
        self.replicas: list[Replica] = []
        for i in range(config.replicas):
            role = COLOCATED if not n_pre else (PREFILL_ONLY if i < n_pre else DECODE_ONLY)
            pool = BlockPool(self.kv_blocks, config.block_size, config.enable_prefix_caching)
            self.replicas.append(Replica(i, role, self.timer, pool, self.limits, self))
        front = self.replicas[:n_pre] if n_pre else self.replicas
        self.router = make_router(config.router, front)
        self.decode_pool = self.replicas[n_pre:] if n_pre else []
        self.decode_router = LeastLoaded(self.decode_pool) if n_pre else None
        self.link_free = [0.0] * config.replicas
        self.kv_bytes_per_token = self.pm.kv_bytes_per_token
        self._heap: list[tuple] = []
        self._counter = 0
        self.seqs: list[Seq | None] = [None] * len(workload)
        self._blocked: deque[int] = deque()
        self._in_flight = 0
        self._max_in_flight = 0
        self._done = 0
        self._latency = config.client_latency / 1000

    def _check_workload(self) -> None:
        wl, cfg, bs = self.wl, self.cfg, self.cfg.block_size
        if len(wl) == 0:
            raise ValueError("the workload has no requests")
        max_len = cfg.max_model_len or self.pm.model.max_position_embeddings
        if cfg.max_model_len is not None and cfg.max_model_len > self.pm.model.max_position_embeddings:
            raise ValueError(f"--max-model-len ({cfg.max_model_len}) exceeds the model's context length "
                             f"({self.pm.model.max_position_embeddings})")
        longest = max(wl.prompt_len)
        if longest >= max_len:
            raise ValueError(f"a prompt of {longest} tokens does not fit max_model_len {max_len} (it must leave "
                             f"room for one output token): lower the dataset's input lengths")
        # The engine stops a sequence at max_model_len tokens.
        self.output_len = [min(o, max_len - p) for p, o in zip(wl.prompt_len, wl.output_len)]
        need = max(-(-(p + o - 1) // bs) for p, o in zip(wl.prompt_len, self.output_len))
        if need > self.kv_blocks:
            raise ValueError(f"the longest request needs {need} KV blocks but a replica holds {self.kv_blocks}: "
                             f"raise --kv-cache-memory or lower the dataset's lengths")

    # ------------------------------------------------------------------ events

    def push_step_end(self, t: float, replica: Replica) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (t, self._counter, _STEP_END, replica, replica.version))

    def push_start(self, t: float, replica: Replica) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (t, self._counter, _START, replica, replica.version))

    def run(self) -> SimResult:
        # The loop allocates many small objects and frees nearly all of them by reference count;
        # the cyclic collector's passes over the live ones cost a third of the run time.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if gc_was_enabled:
                gc.enable()

    def _run(self) -> SimResult:
        wall = time.perf_counter()
        arrivals = self.wl.arrivals
        n = len(arrivals)
        heap = self._heap
        cap = self.wl.max_concurrency
        i = 0
        while True:
            if i < n and (not heap or arrivals[i] <= heap[0][0]):
                t = arrivals[i]
                if cap is not None and self._in_flight >= cap:
                    self._blocked.append(i)
                else:
                    self._send(i, t)
                i += 1
                continue
            if not heap:
                break
            t, _, kind, obj, version = heapq.heappop(heap)
            if kind == _STEP_END:
                if version == obj.version:
                    obj.on_step_end(t)
            elif kind == _START:
                if version == obj.version:
                    obj.on_start(t)
            elif kind == _ARRIVE:
                self._route(obj, t)
            else:
                self._transfer_end(obj, t)
        if self._done != n:
            raise RuntimeError(f"simulation ended with {n - self._done} of {n} requests unfinished")
        return self._result(time.perf_counter() - wall)

    def _send(self, rid: int, t: float) -> None:
        wl = self.wl
        q = Seq(rid, wl.prompt_len[rid], self.output_len[rid], wl.chains[rid], t)
        self.seqs[rid] = q
        self._in_flight += 1
        if self._in_flight > self._max_in_flight:
            self._max_in_flight = self._in_flight
        if self._latency:
            self._counter += 1
            heapq.heappush(self._heap, (t + self._latency, self._counter, _ARRIVE, q, 0))
        else:
            self._route(q, t)

    def _route(self, q: Seq, t: float) -> None:
        self.router.replicas[self.router.choose(self.wl.route_keys[q.rid])].enqueue(q, t)

    def finished(self, q: Seq, t: float) -> None:
        self._done += 1
        self._in_flight -= 1
        if self._blocked:  # the client sends its next request once it has seen this one finish
            self._send(self._blocked.popleft(), t + self._latency)

    # ------------------------------------------------------------------ disaggregation

    def handoff(self, q: Seq, src: Replica, t: float) -> None:
        """A prefill replica computed q's prompt: queue it at the least-loaded decode replica."""
        dst = self.decode_pool[self.decode_router.choose()]
        q.decode_replica = dst.idx
        q.transfer_s = t  # start of the wait; made a duration when the KV lands
        dst.load += 1
        dst.incoming.append(q)
        dst.wake(t)

    def start_transfer(self, q: Seq, dst: Replica, t: float) -> None:
        """dst reserved q's blocks: move the KV over the prefill replica's link (FIFO)."""
        src = q.replica
        start = max(t, self.link_free[src])
        end = start + self.cfg.link_latency / 1000 + q.computed * self.kv_bytes_per_token / (self.cfg.link_bandwidth * 1e9)
        self.link_free[src] = end
        self._counter += 1
        heapq.heappush(self._heap, (end, self._counter, _TX_END, q, 0))

    def _transfer_end(self, q: Seq, t: float) -> None:
        src = self.replicas[q.replica]
        src.release_handoff(q)
        q.transfer_s = t - q.transfer_s
        src.wake(t)
        self.replicas[q.decode_replica].receive(q, t)

    # ------------------------------------------------------------------ results

    def _result(self, wall: float) -> SimResult:
        seqs = self.seqs
        lat = self._latency  # tokens reach the client this much later
        return SimResult(
            config=self.cfg, num_requests=len(seqs),
            sent=[q.sent for q in seqs], first_token=[q.first_token + lat for q in seqs],
            finish=[q.finish + lat for q in seqs], prompt_len=[q.prompt_len for q in seqs],
            output_len=[q.output_len for q in seqs], preemptions=[q.preemptions for q in seqs],
            hit_tokens=[q.hit_tokens for q in seqs], transfer_s=[q.transfer_s for q in seqs],
            replica_roles=[r.role for r in self.replicas], replica_stats=[r.stats for r in self.replicas],
            kv_blocks=self.kv_blocks, makespan_s=max(q.finish for q in seqs) + lat, wall_s=wall,
            max_in_flight=self._max_in_flight, timer_fast=self.timer.fast,
            meta=dict(self.wl.meta))


def simulate(config: SimConfig, workload: Workload, perf_model: PerfModel | None = None) -> SimResult:
    return Simulator(config, workload, perf_model).run()
