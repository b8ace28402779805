"""One simulated engine replica: the engine Scheduler's rules (ridgeline.core.rules) on counts,
timed by the perf model.

Per step, in the Scheduler's order: running decodes first (one token each), then running
prefills in admission order (a chunk each), then waiting sequences FCFS under max_num_seqs and
the token budget, each starting at its longest cached prefix and passed over while another
running sequence computes its next prefix block. When blocks run out, the newest unscheduled
running sequence is preempted (recomputed later), and no sequence is admitted in that step.

Why it is fast: decodes are never held one by one in the step loop. Every running decode
advances one token per step, so a decode's context is `off + steps` for a fixed offset; the
replica keeps the sum of offsets, a count of decodes per offset modulo the block size (how
many need a new block at a given step) and a heap of finish steps. A step costs O(prefill
chunks + admissions + finishes), and a run of decode-only steps with nothing else changing
(no arrival, no finish, no block shortage) is timed in one tight loop and applied at once.
An arrival in the middle of such a run cuts it at the step in progress.

The replica knows nothing of the event loop: what it needs from it goes to its `events` outbox
as (kind, time, payload), handled in order right after the call that made them:
STEP_END / START (wake me at time; payload: my version then, a later version voids it),
FINISHED (payload left the system), PREFILLED (payload's prompt is done: find it a decode
replica), TRANSFER (blocks for payload's KV are reserved here: start moving it).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from ..core.config import HydragenConfig, SchedulerConfig
from ..core.rules import admission, blocks_fit, chunk_tokens, has_seats, make_room, prefix_pending, preemption_victim
from .cache import BlockPool, Node
from .hydragen import HydragenIndex, row_signature
from .steptime import StepTimer

STEP_END, START, FINISHED, PREFILLED, TRANSFER = range(5)  # the kinds of `Replica.events`
WAITING, PREFILL, DECODE, HANDOFF, DONE = range(5)
IDLE, PENDING, STEP, RUN, HANDLING = range(5)

COLOCATED, PREFILL_ONLY, DECODE_ONLY = "colocated", "prefill", "decode"


def _uncovered(lo: int, hi: int, claims: list) -> list[tuple[int, int]]:
    """The parts of blocks [lo, hi) no claim covers."""
    out = []
    for _, a, b in sorted(claims, key=lambda c: c[1]):
        if b <= lo:
            continue
        if a >= hi:
            break
        if a > lo:
            out.append((lo, a))
        lo = max(lo, b)
        if lo >= hi:
            return out
    if lo < hi:
        out.append((lo, hi))
    return out


def _running_order(q: "Seq") -> int:
    return q.order


class Seq:
    """One request on its way through a replica (or two, disaggregated)."""
    __slots__ = ("rid", "prompt_len", "output_len", "num_tokens", "computed", "chain", "state", "off",
                 "shared", "nodes", "claims", "self_node", "epoch", "sent", "first_token", "finish",
                 "preemptions", "hit_tokens", "replica", "decode_replica", "transfer_s", "hsig", "order", "reg",
                 "extra", "dups", "loose")

    def __init__(self, rid: int, prompt_len: int, output_len: int, chain: tuple, sent: float):
        self.rid = rid
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.num_tokens = prompt_len  # prompt + generated
        self.computed = 0  # tokens in the KV cache (prefill progress)
        self.chain = chain
        self.state = WAITING
        self.off = 0  # decode: context = off + replica.steps
        self.shared = 0  # leading blocks held in prefix-cache nodes
        # Prompt blocks it computed inside the prefix chain, as the engine's cache_full_blocks sees
        # them: reg = blocks looked at so far; a block another sequence registered first stays a
        # private, unregistered copy (dups, freed on release); blocks registered after such a copy
        # are node blocks but not part of the leading run (extra); a block registered past an
        # evicted gap of its node is cached but unreachable (loose).
        self.reg = self.extra = self.dups = self.loose = 0
        self.nodes: list[Node] = []  # nodes referenced
        self.claims: list[Node] = []  # nodes where it claimed blocks to compute (until it leaves)
        self.self_node: Node | None = None  # own full blocks cached at preemption
        self.epoch = 0  # bumped on preemption: stale finish-heap entries
        self.sent = sent
        self.first_token: float | None = None
        self.finish: float | None = None
        self.preemptions = 0
        self.hit_tokens = 0
        self.replica = -1
        self.decode_replica = -1
        self.transfer_s = 0.0
        self.hsig = None  # decoding: its shared prefix-cache blocks in the Hydragen index
        self.order = 0  # when it joined its replica's running list (the engine's batch order)


@dataclass
class ReplicaStats:
    steps: int = 0
    busy_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    cache_queries: int = 0
    cache_hits: int = 0
    requests: int = 0
    max_running: int = 0


class Replica:
    def __init__(self, idx: int, role: str, timer: StepTimer, pool: BlockPool, limits: SchedulerConfig,
                 hydragen: HydragenConfig | None):
        """hydragen: the resolved policy; None when off (disabled, sliding window, no prefix caching)."""
        self.idx = idx
        self.role = role
        self.timer = timer
        self.pool = pool
        self.limits = limits
        self.bs = pool.block_size
        self.events: deque[tuple] = deque()  # for the event loop: (kind, time, payload)
        self.steps = 0
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # admission order, newest last
        self._joined = 0  # sequences appended to `running` so far
        self.prefills: list[Seq] = []  # running sequences still computing their prompt
        self.n_decode = 0
        self.sum_off = 0
        self.buckets = [0] * self.bs  # decodes per off % block_size
        self.sum_res = 0  # sum of off % block_size over the decodes
        self.finishes: list[tuple[int, int, int, Seq]] = []  # (last step, rid, epoch, seq)
        self.incoming: deque[Seq] = deque()  # disaggregated decode: prefilled, awaiting KV room
        self.ready: list[Seq] = []  # KV arrived: join the decodes at the next step
        self.reserved = 0  # sequences with blocks reserved for a KV transfer in flight or arrived
        self.load = 0  # requests assigned and not yet gone (what the routers compare)
        self.state = IDLE
        self.version = 0
        self.stats = ReplicaStats()
        # The step in flight.
        self._sched: list[tuple[Seq, int]] = []
        self._t0 = 0.0
        self._end = 0.0
        self._run_k = 0  # decode-only steps in the run (0: a single general step)
        self._run_x0 = 0.0
        self._run_used = 0
        self._run_need0 = 0
        self._run_saved = 0.0  # Hydragen: KV positions the run's steps do not read
        self._run_saved_until = 0
        self._run_parts = 0  # Hydragen: the run's shared-prefix parts while the saving is on
        self.hydragen = HydragenIndex(self.bs, hydragen.min_saved_tokens) if hydragen is not None else None
        self.hy_fraction = hydragen.min_saved_fraction if hydragen is not None else 0.0
        # the device saves this share of the reads a part avoids (HardwareSpec.shared_prefix_efficiency)
        self.hy_read_saving = timer.pm.hw.shared_prefix_efficiency

    # ------------------------------------------------------------------ events

    def enqueue(self, seq: Seq, t: float) -> None:
        """A new request routed here."""
        seq.replica = self.idx
        self.waiting.append(seq)
        self.load += 1
        self.stats.requests += 1
        self.wake(t)

    def wake(self, t: float) -> None:
        """Something changed at time t: an idle replica starts a step (after every event at t), a
        decode run is cut at the step in progress."""
        if self.state == IDLE:
            self.state = PENDING
            self.version += 1
            self.events.append((START, t, self.version))
        elif self.state == RUN and t < self._end:
            self._cut(t)

    def end_step(self, t: float) -> None:
        """The step (or run) in flight ended at t: apply it. The loop then handles the finishes
        and handoffs it reported before calling boundary(t)."""
        self.state = HANDLING
        self._apply(t)

    # ------------------------------------------------------------------ scheduling

    def boundary(self, t: float) -> None:
        """Schedule the next step at t (or go idle)."""
        self.state = HANDLING
        if self.ready:
            self._join_ready()
        if self.incoming:
            self._reserve_incoming(t)
        self._schedule(t)

    def _schedule(self, t: float) -> None:
        lim, pool, bs = self.limits, self.pool, self.bs
        s = self.steps
        budget = lim.max_num_batched_tokens
        preempted = 0
        need0 = 0
        if self.n_decode:
            need0 = self.buckets[-s % bs]
            if need0 > pool.available:
                preempted += self._decode_shortage(s)
                need0 = 0  # allocated one by one in _decode_shortage
            else:
                pool.allocate(need0)
            budget -= self.n_decode
        sched: list[tuple[Seq, int]] = []
        if self.prefills:
            # (The engine takes running sequences with one pending token along with the decodes; a
            # running prefill is only ever left with one when none before it has tokens pending,
            # so admission order is the same order.) Every decode is scheduled by now, so the
            # newest unscheduled running sequence is a prefill.
            done: set[int] = set()
            for q in list(self.prefills):
                if budget == 0:
                    break
                if q.state != PREFILL:
                    continue
                n = chunk_tokens(q.num_tokens - q.computed, budget)
                need = -(-(q.computed + n) // bs) - (-(-q.computed // bs))
                if need > pool.available:
                    preempted += make_room(q, lambda: need <= pool.available,
                                           lambda: preemption_victim(self.prefills, lambda v: v.rid in done),
                                           lambda v: self._preempt(v, s))
                    if q.state != PREFILL:
                        continue
                pool.allocate(need)
                done.add(q.rid)
                sched.append((q, n))
                budget -= n
        if not preempted and self.waiting and budget > 0:
            self._admit(budget, sched)
        B = self.n_decode
        if not B and not sched:
            self.state = IDLE
            return
        n_run = len(self.running)
        if n_run > self.stats.max_running:
            self.stats.max_running = n_run
        ctx = self.sum_off + B * s  # decodes' contexts
        if sched or preempted:
            tokens, logits, pairs, kv = B, B, float(ctx + B), float(ctx + B)
            for q, n in sched:
                c = q.computed
                tokens += n
                pairs += n * c + n * (n + 1) / 2
                kv += c + n
                if c + n == q.num_tokens:
                    logits += 1
            hy = self.hydragen
            parts = 0
            if hy is not None and hy.rows + len(sched) >= 2:
                saved, parts = self._hydragen_saving(s, B, sched)
                kv -= saved
            dur = self.timer.time(tokens, B + len(sched), logits, pairs, kv, parts)
            self._sched = sched
            self._run_k = 0
            self._t0, self._end = t, t + dur
            self.state = STEP
        else:
            self._start_run(t, s, B, float(ctx + B), need0)
        self.events.append((STEP_END, self._end, self.version))

    def _start_run(self, t: float, s: int, B: int, x0: float, need0: int) -> None:
        """Decode-only steps until the next finish or block shortage (an arrival cuts it short)."""
        fin = self.finishes
        while fin and (fin[0][2] != fin[0][3].epoch or fin[0][3].state != DECODE):
            heapq.heappop(fin)
        max_steps = fin[0][0] - s + 1 if fin else 1
        saved, until, parts = 0.0, 0, 0
        if self.hydragen is not None and self.hydragen.rows >= 2:
            saved, until, parts = self._hydragen_run(s, need0)
        k, end, used = self.timer.decode_run(B, x0, max_steps, t, None, self.pool.available + need0,
                                             self.buckets, s, saved, until, parts)
        self._sched = []
        self._run_k, self._run_x0, self._run_used, self._run_need0 = k, x0, used, need0
        self._run_saved, self._run_saved_until, self._run_parts = saved, until, parts
        self._t0, self._end = t, end
        self.state = RUN

    def _cut(self, t: float) -> None:
        k, end, used = self.timer.decode_run(self.n_decode, self._run_x0, self._run_k, self._t0, t,
                                             self.pool.available + self._run_need0, self.buckets, self.steps,
                                             self._run_saved, self._run_saved_until, self._run_parts)
        if k < self._run_k:
            self._run_k, self._end, self._run_used = k, end, used
            self.version += 1
            self.events.append((STEP_END, end, self.version))

    # ------------------------------------------------------------------ Hydragen

    def _full_blocks(self, s: int, saved: int, extra: int = 0) -> int | None:
        """Full blocks of the decodes' contexts at step s: sum((off + s) // bs), the engine's
        num_computed_tokens // block_size summed over its decode rows; None when a lower bound
        (plus `extra` full blocks) already puts `saved` below the fraction rule's threshold."""
        bs, b = self.bs, self.buckets
        low = (self.sum_off + self.n_decode * (s - bs + 1)) // bs + extra
        if saved < self.hy_fraction * max(1, low):
            return None
        # sum((off + s) % bs) over the decodes, from the residues' sum and how many wrap around
        m = s % bs
        rem = self.sum_res + self.n_decode * m - (bs * sum(b[bs - m:]) if m else 0)
        return (self.sum_off + self.n_decode * s - rem) // bs

    def _hydragen_saving(self, s: int, B: int, sched: list[tuple[Seq, int]]) -> tuple[float, int]:
        """(KV positions a general step does not read thanks to shared-prefix attention, its parts),
        by the engine's rule (ridgeline.hydragen.find_shared_prefixes) over its decode rows: the
        decodes and any one-token prefill chunk (the engine puts every row with one new token in the
        decode group). Longer prefill chunks never use it. (0, 0) when the fraction rule is unmet."""
        hy = self.hydragen
        ones = [q for q, n in sched if n == 1]
        if B + len(ones) < 2 or hy.rows + len(ones) < 2:
            return 0.0, 0
        if ones:  # in the index for this step only
            sigs = [sig for sig in map(row_signature, ones) if sig is not None]
            for sig in sigs:
                hy.add(sig)
            saved, parts = hy.saved_blocks(), hy.parts()
            for sig in sigs:
                hy.remove(sig)
        else:
            saved = hy.saved_blocks()
            parts = hy.parts() if saved else 0
        if not saved:
            return 0.0, 0
        extra = sum(q.computed // self.bs for q in ones)
        full = self._full_blocks(s, saved, extra)
        if full is None or saved < self.hy_fraction * max(1, full + extra):
            return 0.0, 0
        return saved * self.bs * self.hy_read_saving, parts

    def _hydragen_run(self, s: int, need0: int) -> tuple[float, int, int]:
        """(KV positions saved per step, the most blocks the run may have used with the saving on,
        the parts each step has while it is on).

        The decode rows, hence the parts and the saved blocks, do not change within a run of
        decode-only steps; only the fraction rule's denominator (the rows' full blocks) grows, by
        the blocks each step allocates. decode_run counts those (`used`, this step's included; the
        run's first step allocates need0), so step k has full(s) + used - need0 full blocks and
        keeps the saving while that stays within the fraction rule: exact per step."""
        hy = self.hydragen
        saved = hy.saved_blocks()
        if not saved:
            return 0.0, 0, 0
        full = self._full_blocks(s, saved)
        if full is None:
            return 0.0, 0, 0
        parts = hy.parts()
        base = full - need0
        frac = self.hy_fraction

        def on(used: int) -> bool:
            return not saved < frac * max(1, base + used)

        if not on(need0):
            return 0.0, 0, 0
        if frac <= 0:
            return saved * self.bs * self.hy_read_saving, 1 << 62, parts
        u = max(need0, int(saved / frac) - base)
        while on(u + 1):
            u += 1
        while not on(u):
            u -= 1
        return saved * self.bs * self.hy_read_saving, u, parts

    # ------------------------------------------------------------------ admission

    def _admit(self, budget: int, sched: list[tuple[Seq, int]]) -> None:
        """FCFS admission by the Scheduler's rules; a decode replica's reserved seats count as running."""
        lim, pool, bs = self.limits, self.pool, self.bs
        waiting = self.waiting
        deferred: list[Seq] = []
        caching = pool.enable_prefix_caching
        while waiting and budget > 0:
            q = waiting[0]
            if not has_seats(len(self.running) + self.reserved, 1, lim.max_num_seqs):
                break
            if caching and (q.chain or q.self_node is not None):
                h, hit, pending = self._lookup(q)
                if pending:
                    deferred.append(waiting.popleft())
                    continue
                reusable = sum(min(nd.cached, h - nd.start) for nd in hit if nd.refs == 0)
            else:
                h, hit, reusable = 0, (), 0
            computed, n, need = admission(q.num_tokens, h, bs, budget)
            if not blocks_fit(need, reusable, pool.available):
                break
            waiting.popleft()
            for nd in hit:
                pool.ref(nd)
            q.nodes = list(hit)
            q.shared = h
            q.reg = h
            q.computed = computed
            pool.allocate(need)
            if caching and q.chain:
                self._claim(q, h)
            self.stats.cache_queries += q.prompt_len
            self.stats.cache_hits += computed
            q.hit_tokens += computed
            q.state = PREFILL
            q.order = self._joined
            self._joined += 1
            self.running.append(q)
            self.prefills.append(q)
            sched.append((q, n))
            budget -= n
        if deferred:
            waiting.extendleft(reversed(deferred))

    def _lookup(self, q: Seq) -> tuple[int, list[Node], bool]:
        """(cached leading blocks, the nodes holding them, whether another running sequence is
        computing the first block past them)."""
        bs, nodes = self.bs, self.pool.nodes
        cap = (q.num_tokens - 1) // bs  # the last token is always computed
        h, prev, hit = 0, 0, []
        for key, length in q.chain:
            end = length // bs
            if end <= prev:
                continue
            nd = nodes.get(key)
            if nd is None or not nd.cached or nd.start != prev:
                break
            hit.append(nd)
            h = nd.start + nd.cached
            if h < end:
                break
            prev = end
        else:
            sn = q.self_node
            if sn is not None and sn.cached and sn.start == h and sn.key in nodes:
                hit.append(sn)
                h += sn.cached
        if h > cap:
            h = cap
            hit = [nd for nd in hit if nd.start < h]
        return h, hit, prefix_pending(q, h, cap, lambda j: self._claimer(q.chain, j))

    def _claimer(self, chain: tuple, j: int) -> Seq | None:
        """The running sequence that claimed block j of the chain's prefixes, if any."""
        bs, prev = self.bs, 0
        for key, length in chain:
            end = length // bs
            if prev <= j < end:
                nd = self.pool.nodes.get(key)
                if nd is not None and nd.claims:
                    for owner, lo, hi in nd.claims:
                        if lo <= j < hi:
                            return owner
                return None
            prev = max(prev, end)
        return None

    def _claim(self, q: Seq, h: int) -> None:
        """Mark the prefix blocks q will compute, so requests sharing them wait instead of duplicating:
        the engine's claims on counts, the blocks from h up to the (num_tokens - 1) // block_size its
        lookup hashed (a prompt's last block only once it is full and computed), each block keeping
        an earlier running claimer; claims last until q leaves or is preempted."""
        bs, pool = self.bs, self.pool
        cap = (q.num_tokens - 1) // bs
        prev = 0
        for key, length in q.chain:
            if prev >= cap:
                break
            end = length // bs
            if end <= prev:
                continue
            lo, hi = max(h, prev), min(end, cap)
            if lo < hi:
                nd = pool.node(key, prev, end)
                if not nd.claims:
                    nd.claims = [(q, lo, hi)]
                    q.claims.append(nd)
                else:
                    added = False
                    for a, b in _uncovered(lo, hi, nd.claims):
                        nd.claims.append((q, a, b))
                        added = True
                    if added:
                        q.claims.append(nd)
            prev = end

    def _release_claims(self, q: Seq) -> None:
        for nd in q.claims:
            nd.claims = [c for c in nd.claims if c[0] is not q]
        q.claims = []

    def _register(self, q: Seq) -> None:
        """Full prompt blocks just computed become findable prefix-cache blocks, the engine's
        registration on counts: a block whose content is cached already (another sequence
        registered it first) stays q's private copy, and the blocks after it are still registered."""
        bs, pool = self.bs, self.pool
        full = q.computed // bs
        j = q.reg
        if full <= j:
            return
        prev = 0
        for key, length in q.chain:
            end = length // bs
            if end <= prev:
                continue
            if end <= j:
                prev = end
                continue
            lo, hi = j, min(full, end)
            nd = pool.node(key, prev, end)
            c = nd.start + nd.cached
            if lo < c:  # registered first by another sequence
                d = min(hi, c) - lo
                q.dups += d
                lo += d
            if lo < hi:
                if lo == c:
                    if nd not in q.nodes:
                        pool.ref(nd)
                        q.nodes.append(nd)
                    nd.cached += hi - lo
                    if q.shared == lo:
                        q.shared = hi
                    else:
                        q.extra += hi - lo
                else:  # the node's tail was evicted: cached, but no lookup reaches it
                    q.loose += hi - lo
            j = hi
            if j >= full:
                break
            prev = end
        q.reg = full

    # ------------------------------------------------------------------ preemption

    def _decode_shortage(self, s: int) -> int:
        """The engine's loop, one decode at a time, when this step's new blocks do not fit."""
        bs, pool = self.bs, self.pool
        scheduled: set[int] = set()
        preempted = 0
        for q in [q for q in self.running if q.state == DECODE]:
            if q.state != DECODE:
                continue
            need = 1 if (q.off + s) % bs == 0 else 0
            if need > pool.available:
                preempted += make_room(q, lambda: need <= pool.available,
                                       lambda: preemption_victim(self.running, lambda v: v.rid in scheduled),
                                       lambda v: self._preempt(v, s))
                if q.state != DECODE:
                    continue
            pool.allocate(need)
            scheduled.add(q.rid)
        return preempted

    def _preempt(self, q: Seq, s: int) -> None:
        """Free the sequence's blocks (its full ones stay cached, evictable) and requeue it first."""
        pool, bs = self.pool, self.bs
        self.running.remove(q)
        if q.state == DECODE:
            self._remove_decode(q)
            kv = q.off + s
            q.num_tokens = kv + 1
        else:
            self.prefills.remove(q)
            kv = q.computed
        private = -(-kv // bs) - q.shared - q.extra
        own = q.shared + q.extra + q.dups + q.loose  # where its own content's blocks start
        full = kv // bs - own
        if pool.enable_prefix_caching and full > 0:
            sn = q.self_node
            if sn is not None and sn in q.nodes:
                if sn.start + sn.cached == own:
                    sn.cached += full
                    private -= full
            else:
                if sn is not None:
                    pool.drop(sn)
                sn = q.self_node = pool.node(("seq", q.rid), own, None)
                sn.cached = full
                sn.refs = 1
                q.nodes.append(sn)
                private -= full
        pool.release(private)
        for nd in reversed(q.nodes):  # the engine frees tail blocks first: they are evicted first
            pool.unref(nd)
        q.nodes = []
        q.shared = q.reg = q.extra = q.dups = q.loose = 0
        q.computed = 0
        self._release_claims(q)
        q.state = WAITING
        q.epoch += 1
        q.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(q)

    # ------------------------------------------------------------------ applying a step

    def _add_decode(self, q: Seq, first_step: int) -> None:
        """q decodes from step `first_step` on: one token per step until it has output_len."""
        q.state = DECODE
        q.off = q.computed - first_step
        self.n_decode += 1
        self.sum_off += q.off
        r = q.off % self.bs
        self.buckets[r] += 1
        self.sum_res += r
        last = first_step + q.output_len - (q.num_tokens - q.prompt_len) - 1
        heapq.heappush(self.finishes, (last, q.rid, q.epoch, q))
        if self.hydragen is not None and q.nodes:
            q.hsig = row_signature(q)
            if q.hsig is not None:
                self.hydragen.add(q.hsig)

    def _remove_decode(self, q: Seq) -> None:
        self.n_decode -= 1
        self.sum_off -= q.off
        r = q.off % self.bs
        self.buckets[r] -= 1
        self.sum_res -= r
        if q.hsig is not None:
            self.hydragen.remove(q.hsig)
            q.hsig = None

    def _apply(self, t: float) -> None:
        st = self.stats
        s = self.steps
        k = self._run_k or 1
        st.busy_s += t - self._t0
        st.steps += k
        st.decode_tokens += self.n_decode * k
        if self._run_k:
            self.pool.allocate(self._run_used - self._run_need0)
            self._run_k = 0
        last = s + k - 1
        self.steps = s + k
        # Leaving sequences free their blocks in the engine's batch order (decodes first, in running
        # order; then prompts done with their only token), which sets the prefix cache's LRU order.
        fin = self.finishes
        if fin and fin[0][0] <= last:
            done = []
            while fin and fin[0][0] <= last:
                _, _, epoch, q = heapq.heappop(fin)
                if epoch == q.epoch and q.state == DECODE:
                    done.append(q)
            if len(done) > 1:
                done.sort(key=_running_order)
            for q in done:
                self._remove_decode(q)
                self.running.remove(q)
                self._finish(q, t, q.off + last + 1)
        for q, n in self._sched:
            q.computed += n
            st.prefill_tokens += n
            if q.chain and self.pool.enable_prefix_caching:
                self._register(q)
            if q.computed == q.num_tokens:  # the last chunk: its logits give a token
                q.num_tokens += 1
                if q.first_token is None:
                    q.first_token = t
                self.prefills.remove(q)
                if q.num_tokens - q.prompt_len >= q.output_len:
                    self.running.remove(q)
                    self._finish(q, t, q.computed)
                elif self.role == PREFILL_ONLY:
                    if q.claims:
                        self._release_claims(q)
                    self.running.remove(q)
                    q.state = HANDOFF
                    self.load -= 1
                    self.events.append((PREFILLED, t, q))
                else:
                    self._add_decode(q, last + 1)
        self._sched = []

    def _free(self, q: Seq, kv: int, tag: str) -> None:
        """Release a leaving sequence's blocks. As in the engine, its full blocks stay cached
        (evictable, least recently released first) rather than free; nothing will hit them
        but they are evicted in the engine's order."""
        pool = self.pool
        private = -(-kv // self.bs) - q.shared - q.extra
        # Its own full blocks (and loose ones) stay cached; partly filled and duplicate blocks are free.
        full = kv // self.bs - q.shared - q.extra - q.dups
        if pool.enable_prefix_caching and full > 0:
            pool.park((tag, q.rid), q.shared, full)
            private -= full
        pool.release(private)
        for nd in reversed(q.nodes):
            pool.unref(nd)
        q.nodes = []
        q.shared = q.reg = q.extra = q.dups = q.loose = 0
        q.self_node = None  # belongs to this pool; a decode replica starts afresh

    def _finish(self, q: Seq, t: float, kv: int) -> None:
        if q.claims:
            self._release_claims(q)
        self._free(q, kv, "done")
        q.state = DONE
        q.finish = t
        self.load -= 1
        self.events.append((FINISHED, t, q))

    # ------------------------------------------------------------------ disaggregation

    def release_handoff(self, q: Seq) -> None:
        """The KV of a prefilled sequence has left for its decode replica."""
        self._free(q, q.computed, "sent")

    def expect(self, q: Seq, t: float) -> None:
        """q, prefilled on another replica, is assigned here: it waits for room for its KV."""
        self.load += 1
        self.incoming.append(q)
        self.wake(t)

    def _reserve_incoming(self, t: float) -> None:
        """Take prefilled sequences FCFS while their KV fits and max_num_seqs allows; each
        reservation starts its transfer."""
        pool, lim = self.pool, self.limits
        while self.incoming:
            q = self.incoming[0]
            if not has_seats(len(self.running) + self.reserved, 1, lim.max_num_seqs):
                break
            need = -(-q.computed // self.bs)
            if not blocks_fit(need, 0, pool.available):
                break
            self.incoming.popleft()
            pool.allocate(need)
            self.reserved += 1
            self.events.append((TRANSFER, t, q))

    def _join_ready(self) -> None:
        for q in self.ready:
            self.reserved -= 1
            q.order = self._joined
            self._joined += 1
            self.running.append(q)
            self._add_decode(q, self.steps)
        self.ready = []

    def receive(self, q: Seq, t: float) -> None:
        """q's KV has arrived: it decodes from the next step."""
        self.ready.append(q)
        self.wake(t)
