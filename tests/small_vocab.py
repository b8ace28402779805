"""Tiny random Llama checkpoints with a 16-token vocabulary, for distribution tests.

The tokenizer is a `tokenizers` WordLevel model (one word per id, `<eos>` id 0) wrapped in
`transformers.PreTrainedTokenizerFast` and saved next to the weights, so ridgeline loads the
directory like any Hugging Face checkpoint. With 16 tokens the exact distribution of the first few
sampled tokens can be enumerated (`exact_joint`), which is what a chi-square test needs.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 16
EOS_ID = 0
WORDS = ["<eos>"] + [f"w{i}" for i in range(1, VOCAB)]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>",
                                   pad_token="<eos>")


def build_model(seed: int, std: float = 0.3, embed_std: float = 0.12, layers: int = 2):
    """A float32 Llama with VOCAB tokens, weights redrawn as tests/tiny_models.randomize_ does.

    `embed_std` sets the spread of the logits (lm_head's std times the final hidden state's norm):
    0.12 gives next-token distributions far from one-hot (about 2.3 nats of entropy per token, the
    top token ~0.2-0.4); 0.25 makes them peaked (top ~0.8).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .tiny_models import randomize_

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=EOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed, std, embed_std)
    return model.eval()


def save(model, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    make_tokenizer().save_pretrained(str(directory))
    return directory


def next_probs(logits: torch.Tensor, contexts: list[list[int]], num_prompt: int, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               presence_penalty: float = 0.0) -> torch.Tensor:
    """The distribution a sampled token is drawn from, written out independently of
    ridgeline.sampler: repetition penalty (CTRL) over the context, presence penalty over the
    output, then temperature, top-k and the top-p nucleus (the token crossing top_p stays)."""
    z = logits.double().clone()
    for i, ctx in enumerate(contexts):
        seen = sorted(set(ctx))
        row = z[i, seen]
        z[i, seen] = torch.where(row > 0, row / repetition_penalty, row * repetition_penalty)
        out = sorted(set(ctx[num_prompt:]))
        z[i, out] -= presence_penalty
    z = z / temperature
    if top_k:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1:
        srt, order = z.sort(dim=-1, descending=True)
        p = srt.softmax(dim=-1)
        drop = (p.cumsum(dim=-1) - p) >= top_p
        drop[:, 0] = False
        z = z.scatter(1, order, srt.masked_fill(drop, float("-inf")))
    return z.softmax(dim=-1)


@torch.no_grad()
def exact_joint(model, prompt: list[int], length: int, **params) -> dict[tuple[int, ...], float]:
    """P(first `length` sampled tokens = s) for every s with nonzero probability under `params`
    (next_probs' keywords), by enumerating prefixes: one batched full forward pass per position."""
    joint = {(): 1.0}
    for _ in range(length):
        prefixes = list(joint)
        contexts = [prompt + list(s) for s in prefixes]
        logits = model(input_ids=torch.tensor(contexts)).logits[:, -1].float()
        probs = next_probs(logits, contexts, len(prompt), **params)
        nxt = {}
        for s, row in zip(prefixes, probs.tolist()):
            for t, pt in enumerate(row):
                if pt > 0:
                    nxt[s + (t,)] = joint[s] * pt
        joint = nxt
    return joint


def chi_square(counts: dict[tuple[int, ...], int], probs: dict[tuple[int, ...], float],
               min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's goodness-of-fit test of observed sequence counts against exact probabilities.

    Cells expected fewer than `min_expected` times are pooled into one cell (kept only if the pool
    itself reaches min_expected, else merged into the smallest kept cell). A sample outside the
    support (probability 0) makes the statistic infinite. Returns (statistic, degrees of freedom,
    p-value); the p-value is the upper regularized incomplete gamma function.
    """
    n = sum(counts.values())
    if any(s not in probs for s in counts):
        return float("inf"), 0, 0.0
    kept = [s for s, p in probs.items() if n * p >= min_expected]
    rest = [s for s in probs if n * probs[s] < min_expected]
    obs = [counts.get(s, 0) for s in kept]
    exp = [n * probs[s] for s in kept]
    if rest:
        o, e = sum(counts.get(s, 0) for s in rest), n * sum(probs[s] for s in rest)
        if e >= min_expected or not kept:
            obs.append(o)
            exp.append(e)
        else:
            j = min(range(len(exp)), key=exp.__getitem__)
            obs[j] += o
            exp[j] += e
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p
