"""lm-eval's `local-completions` against `ridgeline serve`, with no tokenizer argument: lm-eval
finds /tokenizer_info and /tokenize and tokenizes through the server. The task is a local
12-question multiple-choice file (tests/data/lm_eval_mc, `dataset_path: json`); its accuracy
and every loglikelihood must equal those computed from transformers' GGUF model on the same
token ids. Needs the `eval` extra (`pip install -e .[eval]`); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from ridgeline.loader import default_model_path
from ridgeline.tokenizer import load_tokenizer

from .test_server import Server

pytest.importorskip("lm_eval", reason="lm-eval is in the optional 'eval' extra")

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_mc"
KEY = "eval-key"


def _docs() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "mc.jsonl").read_text().splitlines() if line.strip()]


def _hf_loglikelihoods(model, tok, docs: list[dict]) -> list[list[float]]:
    """lm-eval's encoding of (context, " " + choice), scored by transformers: context ids, then the
    continuation's ids as the whole text's ids past the context's."""
    out = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        ctx = tok.encode(context, add_special_tokens=False)
        row = []
        for choice in doc["choices"]:
            whole = tok.encode(context + " " + choice, add_special_tokens=False)
            ids = ctx + whole[len(ctx):]
            with torch.no_grad():
                lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            row.append(sum(lp[j - 1, ids[j]].item() for j in range(len(ctx), len(ids))))
        out.append(row)
    return out


def test_local_completions_accuracy_equals_transformers(tmp_path, hf_default_model):
    srv = Server("--api-key", KEY)
    try:
        model_id = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
        env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HOME": str(tmp_path / "hf"),
               "OMP_NUM_THREADS": "1"}
        args = f"model={model_id},base_url={srv.url}/v1/completions,auth_token={KEY},max_length=512,max_retries=1"
        run = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
                              "--model_args", args, "--tasks", "ridgeline_mc", "--include_path", ".",
                              "--output_path", str(tmp_path / "out"), "--log_samples"],
                             cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Using remote tokenizer" in run.stderr + run.stdout
    finally:
        assert srv.stop() == 0, srv.log()[-2000:]
    [results] = (tmp_path / "out").rglob("results_*.json")
    [samples] = (tmp_path / "out").rglob("samples_ridgeline_mc_*.jsonl")
    acc = json.loads(results.read_text())["results"]["ridgeline_mc"]["acc,none"]
    lines = samples.read_text().splitlines()
    got = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in map(json.loads, lines)}

    docs = _docs()
    want = _hf_loglikelihoods(hf_default_model, load_tokenizer(default_model_path()), docs)
    assert sorted(got) == list(range(len(docs)))
    for i, row in enumerate(want):
        assert got[i] == pytest.approx(row, abs=1e-2), (i, got[i], row)
    picks = [max(range(len(row)), key=row.__getitem__) for row in want]
    ref_acc = sum(p == doc["answer"] for p, doc in zip(picks, docs)) / len(docs)
    assert acc == pytest.approx(ref_acc)
