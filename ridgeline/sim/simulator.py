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

Replicas never call the loop: each reports what it needs (a wake-up time, a finished request, a
prompt to hand off, a transfer to start) in its `events` outbox, which the loop drains after
every call into it.
"""

from __future__ import annotations

import gc
import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from ..core.config import parse_memory_size
from ..perf import PerfModel, load_spec
from .cache import BlockPool
from .config import SimConfig
from .replica import (COLOCATED, DECODE_ONLY, FINISHED, PREFILL_ONLY, PREFILLED, START, STEP_END, TRANSFER,
                      Replica, ReplicaStats, Seq)
from .router import LeastLoaded, make_router
from .steptime import StepTimer
from .workload import Workload

_TX_END, _ARRIVE = TRANSFER + 1, TRANSFER + 2  # the loop's own events beside the replicas' timers


def build_perf_model(cfg: SimConfig) -> PerfModel:
    """The step-time model of one replica (raises HardwareSpecError for an unknown --hardware)."""
    from ..loader import load_model_config

    hw = load_spec(cfg.hardware)
    model = load_model_config(cfg.model)
    try:
        return PerfModel(model, hw, dtype=cfg.dtype, kv_dtype=cfg.kv_dtype, block_size=cfg.cache.block_size,
                         max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens)
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
        return self.config.settings()


class Simulator:
    def __init__(self, config: SimConfig, workload: Workload, perf_model: PerfModel | None = None):
        config.validate()
        self.cfg = config
        self.wl = workload
        self.pm = perf_model or build_perf_model(config)
        cache, sched = config.cache, config.scheduler
        if cache.num_kv_blocks is not None:
            self.kv_blocks = cache.num_kv_blocks
        else:
            mem = parse_memory_size(cache.kv_cache_memory) if cache.kv_cache_memory is not None else None
            self.kv_blocks = self.pm.kv_blocks(mem)
        if self.kv_blocks < 1:
            raise ValueError(f"--hardware {config.hardware}: the model's weights and activations leave no memory "
                             f"for the KV cache; pass --kv-cache-memory or pick a larger device")
        # As the engine, with PyTorch's attention (GPUs): Hydragen needs shared blocks (prefix caching
        # here; the simulator has no n-sample forks) and is not used with sliding-window attention.
        hydragen = config.hydragen.resolve(fused_kernels=False)
        if not (cache.enable_prefix_caching and self.pm.model.sliding_window is None
                and any(workload.chains)):  # (no shared prefix: nothing to account for)
            hydragen = None
        self.timer = StepTimer(self.pm, sched.max_num_batched_tokens, sched.max_num_seqs)
        self._check_workload()

        n_pre = config.num_prefill
        self.replicas: list[Replica] = []
        for i in range(config.replicas):
            role = COLOCATED if not n_pre else (PREFILL_ONLY if i < n_pre else DECODE_ONLY)
            pool = BlockPool(self.kv_blocks, cache.block_size, cache.enable_prefix_caching)
            self.replicas.append(Replica(i, role, self.timer, pool, sched, hydragen))
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
        wl, cfg, bs = self.wl, self.cfg, self.cfg.cache.block_size
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

    def _drain(self, r: Replica) -> None:
        """Act on what the replica reported, in order. Called after every call into a replica, so
        each report is handled at once, as it was made."""
        events = r.events
        while events:
            kind, t, x = events.popleft()
            if kind == STEP_END or kind == START:  # wake it at t, unless its version moved on
                self._counter += 1
                heapq.heappush(self._heap, (t, self._counter, kind, r, x))
            elif kind == FINISHED:
                self._finished(t)
            elif kind == PREFILLED:
                self._handoff(x, t)
            else:
                self._start_transfer(x, t)

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
        drain = self._drain
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
            if kind == STEP_END:
                if version == obj.version:
                    obj.end_step(t)  # finishes and handoffs are handled before the next schedule
                    if obj.events:
                        drain(obj)
                    obj.boundary(t)
                    if obj.events:
                        drain(obj)
            elif kind == START:
                if version == obj.version:
                    obj.boundary(t)
                    if obj.events:
                        drain(obj)
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
        r = self.router.replicas[self.router.choose(self.wl.route_keys[q.rid])]
        r.enqueue(q, t)
        self._drain(r)

    def _finished(self, t: float) -> None:
        self._done += 1
        self._in_flight -= 1
        if self._blocked:  # the client sends its next request once it has seen this one finish
            self._send(self._blocked.popleft(), t + self._latency)

    # ------------------------------------------------------------------ disaggregation

    def _handoff(self, q: Seq, t: float) -> None:
        """A prefill replica computed q's prompt: queue it at the least-loaded decode replica."""
        dst = self.decode_pool[self.decode_router.choose()]
        q.decode_replica = dst.idx
        q.transfer_s = t  # start of the wait; made a duration when the KV lands
        dst.expect(q, t)
        self._drain(dst)

    def _start_transfer(self, q: Seq, t: float) -> None:
        """The decode replica reserved q's blocks: move the KV over the prefill replica's link (FIFO)."""
        src = q.replica
        start = max(t, self.link_free[src])
        cfg = self.cfg
        end = start + cfg.link_latency / 1000 + q.computed * self.kv_bytes_per_token / (cfg.link_bandwidth * 1e9)
        self.link_free[src] = end
        self._counter += 1
        heapq.heappush(self._heap, (end, self._counter, _TX_END, q, 0))

    def _transfer_end(self, q: Seq, t: float) -> None:
        src = self.replicas[q.replica]
        src.release_handoff(q)
        q.transfer_s = t - q.transfer_s
        src.wake(t)
        self._drain(src)
        dst = self.replicas[q.decode_replica]
        dst.receive(q, t)
        self._drain(dst)

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
