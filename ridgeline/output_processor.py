"""OutputProcessor: what a request's samples look like as text.

Per sample it keeps the incremental detokenizer, the text so far, the logprob entries with
their decoded tokens and the cumulative logprob; per request the prompt text and the prompt
logprobs. It finds stop strings (which need text, so the scheduler cannot) and builds the
RequestOutputs the engine returns. Scheduling state stays in core.request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .core.request import Request, Sequence
from .core.scheduler import SeqUpdate, TokenLogprobs
from .outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from .tokenizer import IncrementalDetokenizer


@dataclass
class SampleText:
    detokenizer: IncrementalDetokenizer
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0


@dataclass
class RequestText:
    request: Request
    prompt: str | None
    samples: list[SampleText]
    prompt_logprobs: list[PositionLogprobs | None] | None = None


@dataclass
class StopHit:
    seq: Sequence
    stop_string: str
    num_dropped: int  # new tokens after the one completing the stop string (speculative steps)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestText] = {}

    def add_request(self, req: Request, prompt: str | None) -> None:
        p = req.params
        samples = [SampleText(IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.skip_special_tokens),
                              logprobs=[] if p.logprobs is not None else None) for _ in req.seqs]
        self.requests[req.request_id] = RequestText(
            req, prompt, samples, prompt_logprobs=[None] if p.prompt_logprobs is not None else None)

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, updates: list[SeqUpdate]) -> list[StopHit]:
        """Detokenize the new tokens, record logprobs; returns the stop strings found. A sequence
        the scheduler already finished (a stop token, EOS, length) still has its text cut at a
        stop string in its last piece, which then is the reason it stopped."""
        hits = []
        for upd in updates:
            state = self.requests.get(upd.seq.request.request_id)
            if state is None:
                continue
            if upd.prompt_logprobs is not None:
                state.prompt_logprobs.extend(self._entry(lp) for lp in upd.prompt_logprobs)
            sample = state.samples[upd.seq.index]
            for j, token in enumerate(upd.new_token_ids):
                if upd.logprobs is not None:
                    sample.cumulative_logprob += upd.logprobs[j][1]
                    sample.logprobs.append(self._entry(upd.logprobs[j]))
                stop = self._append_text(upd.seq, sample, sample.detokenizer.step(token))
                if stop is not None:
                    hits.append(StopHit(upd.seq, stop, len(upd.new_token_ids) - j - 1))
                    break
        return hits

    def _append_text(self, seq: Sequence, sample: SampleText, piece: str) -> str | None:
        params = seq.params
        old_len = len(sample.text)
        sample.text += piece
        if not (params.stop_strings and piece):
            return None
        # Only a window that includes the new piece can contain a new match.
        window_start = max(0, old_len - max(len(s) for s in params.stop_strings) + 1)
        found = [(sample.text.find(s, window_start), s) for s in params.stop_strings]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return None
        idx, s = min(found)
        sample.text = sample.text[:idx + len(s)] if params.include_stop_str_in_output else sample.text[:idx]
        return s

    def _entry(self, lp: TokenLogprobs) -> PositionLogprobs:
        token, logprob, rank, top_ids, top_vals = lp
        entry = {token: Logprob(logprob, rank, self._decode_one(token))}
        for r, (tid, val) in enumerate(zip(top_ids, top_vals)):
            entry.setdefault(tid, Logprob(val, r + 1, self._decode_one(tid)))
        return entry

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def make_outputs(self, requests: list[Request]) -> list[RequestOutput]:
        """The current output of each request; a finished request is then forgotten."""
        outputs = []
        for req in requests:
            state = self.requests.get(req.request_id)
            if state is None:
                continue
            if req.finished:
                req.finish_time = time.monotonic()
                del self.requests[req.request_id]
            outputs.append(self.output(state))
        return outputs

    def output(self, state: RequestText) -> RequestOutput:
        req = state.request
        outs = []
        for seq, sample in zip(req.seqs, state.samples):
            outs.append(CompletionOutput(
                index=seq.index,
                text=self._visible_text(seq, sample.text),
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=sample.cumulative_logprob if sample.logprobs is not None else None,
                logprobs=list(sample.logprobs) if sample.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            ))
        metrics = {"arrival_time": req.arrival_time}
        if req.first_token_time is not None:
            metrics["first_token_time"] = req.first_token_time
        if req.finish_time is not None:
            metrics["finish_time"] = req.finish_time
        return RequestOutput(
            request_id=req.request_id,
            prompt=state.prompt,
            prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=list(state.prompt_logprobs) if state.prompt_logprobs is not None else None,
            outputs=outs,
            finished=req.finished,
            metrics=metrics,
        )

    @staticmethod
    def _visible_text(seq: Sequence, text: str) -> str:
        """Text safe to show now: while running, hold back a tail that could still start a stop string."""
        stops = seq.params.stop_strings
        if seq.finished or not stops:
            return text
        hold = max(len(s) for s in stops) - 1
        return text[:len(text) - hold] if hold > 0 else text
