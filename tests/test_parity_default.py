"""Token-for-token and logprob parity with transformers on the default model (float32)."""

from __future__ import annotations

import torch

from ridgeline import SamplingParams

from .prompts import PARITY_PROMPTS

NEW_TOKENS = 32


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int):
    """Plain greedy loop over transformers' forward with its KV cache (no logits processors)."""
    tokens, logprobs, past = [], [], None
    step_ids = torch.tensor([ids])
    for _ in range(n):
        out = model(input_ids=step_ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        tokens.append(int(lp.argmax()))
        logprobs.append(lp)
        step_ids = torch.tensor([[tokens[-1]]])
    return tokens, logprobs


def test_greedy_and_logprobs_match_transformers(llm_fp32, hf_default_model):
    tok = llm_fp32.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outs = llm_fp32.generate(PARITY_PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PARITY_PROMPTS, outs):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        ref_tokens, ref_lps = hf_greedy(hf_default_model, ids, NEW_TOKENS)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"divergence for prompt {prompt[:30]!r}"
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_lps)):
            top_vals, top_ids = ref.topk(5)
            for tid, val in zip(top_ids.tolist(), top_vals.tolist()):
                assert tid in entry, f"step {step}: top-5 token {tid} missing"
                assert abs(entry[tid].logprob - val) < 1e-3, (step, tid, entry[tid].logprob, val)
            assert entry[got.token_ids[step]].rank == 1
