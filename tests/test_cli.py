"""The `ridgeline` command line, run as a real subprocess (plus a few cheap in-process checks).

Each subprocess that loads the default model costs ~10 s on a small CPU machine, so only
four do; the bad-input cases fail before the model is read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ridgeline import cli

# Small, deterministic and cheap: greedy float32 with a small KV cache.
FAST = ["--dtype", "float32", "--temperature", "0", "--max-model-len", "512", "--kv-cache-memory", "64MiB"]
PROMPT = "The capital of France is"


def _command() -> list[str]:
    script = Path(sys.executable).parent / "ridgeline"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("ridgeline")
    return [found] if found else [sys.executable, "-m", "ridgeline.cli"]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_command() + list(args), input=stdin, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def streamed() -> str:
    proc = run_cli("generate", PROMPT, "--max-tokens", "8", "--ignore-eos", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "", f"expected a quiet stderr, got: {proc.stderr!r}"
    return proc.stdout


def test_generate_prints_text(streamed):
    assert streamed.endswith("\n")
    assert streamed.strip(), "no text generated"


def test_generate_n_samples_with_logprobs_match_the_stream(streamed):
    proc = run_cli("generate", PROMPT, "--max-tokens", "8", "--ignore-eos", "--n", "2", "--logprobs", "1", *FAST)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "=== sample 1/2 (finish: length) ===" in out and "=== sample 2/2 (finish: length) ===" in out
    # Greedy: both samples equal the text streamed by the other process.
    samples = out.split("=== sample 2/2 (finish: length) ===\n")
    first = samples[0].split("=== sample 1/2 (finish: length) ===\n")[1]
    for s in (first, samples[1]):
        text, logprobs = s.split("--- logprobs", 1)
        assert text == streamed
        assert len(logprobs.strip().splitlines()) == 1 + 8  # header + one line per token


def test_generate_with_a_draft_model_matches_the_plain_stream(streamed):
    """--speculative PATH: the default model drafting for itself (every proposal accepted) leaves
    greedy output as it is."""
    from ridgeline.loader import default_model_path

    proc = run_cli("generate", PROMPT, "--max-tokens", "8", "--ignore-eos", *FAST,
                   "--speculative", str(default_model_path()), "--num-speculative-tokens", "3",
                   "--no-speculative-adaptive")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == streamed


def test_chat_answers_each_line_and_exits_on_eof():
    # --stop "\n" keeps each reply on one line, so the replies can be counted.
    proc = run_cli("chat", "--max-tokens", "8", "--stop", "\n", "--system", "You are terse.", *FAST,
                   stdin="Hello! Who are you?\n\n/reset\nWhat is the capital of France?\n")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not proc.stdout.startswith(">"), "no prompt when stdin is not a terminal"
    replies = proc.stdout.split("\n")
    assert replies[-1] == "" and len(replies) == 3, proc.stdout
    assert any(r.strip() for r in replies[:2])


@pytest.mark.parametrize("args, field", [
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "2"], "top_p"),
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "model"),
    (["generate", ""], "prompt"),
])
def test_bad_input_is_one_line_error_with_status_2(args, field):
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------- in-process (no model load)

@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    """cli.main() sets quiet-logging variables; keep them from leaking into other tests."""
    for key in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(key, raising=False)  # restored to its old value (or unset) afterwards


@pytest.mark.parametrize("argv, needle", [
    (["generate", "hi", "--temperature", "abc"], "--temperature"),
    (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
    (["generate", "hi", "--kv-cache-memory", "lots"], "kv_cache_memory"),
    (["generate", "hi", "--max-model-len", "1"], "max_model_len"),
    (["chat", "--min-p", "1.5"], "min_p"),
    (["generate", "hi", "--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
    (["serve", "--speculative", "ngram", "--num-speculative-tokens", "-2"], "num_speculative_tokens"),
    (["generate", "hi", "--speculative", "ngram", "--num-speculative-tokens", "two"], "--num-speculative-tokens"),
    (["generate", "hi", "--speculative", "ngram", "--prompt-lookup-min", "3", "--prompt-lookup-max", "2"],
     "prompt_lookup_max"),
    (["generate", "hi", "--num-speculative-tokens", "3"], "needs --speculative"),
    (["serve", "--no-speculative-adaptive"], "needs --speculative"),
    (["generate", "hi", "--speculative", "/nonexistent/draft.gguf"], "--speculative"),
    (["serve", "--speculative", "/nonexistent/draft.gguf"], "'/nonexistent/draft.gguf' does not exist"),
    (["generate", "hi", "--speculative", "/nonexistent/draft.gguf", "--prompt-lookup-max", "3"], "ngram only"),
    (["generate", "hi", "--speculative", ""], "speculative"),
    (["bogus"], "invalid choice"),
    ([], "required"),
])
def test_usage_errors_in_process(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err


def test_draft_with_another_vocabulary_fails_before_loading(tmp_path, capsys):
    """The draft's vocabulary size is read from its config (no weights needed) and compared with
    the target's before either model loads."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5}))
    for argv in (["generate", "hi"], ["serve"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--speculative", str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --speculative") and "vocabulary has 100 tokens" in err and "\n" not in err


def test_speculative_options_reach_the_engine_config(monkeypatch):
    from ridgeline.core.config import EngineConfig

    args = cli._build_parser().parse_args(["generate", "hi", "--speculative", "ngram", "--num-speculative-tokens",
                                           "6", "--prompt-lookup-min", "2", "--prompt-lookup-max", "5",
                                           "--no-speculative-adaptive"])
    spec = EngineConfig.from_kwargs(model=None, **cli._engine_kwargs(args)).speculative
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max,
            spec.adaptive) == ("ngram", 6, 2, 5, False)
    plain = cli._engine_kwargs(cli._build_parser().parse_args(["generate", "hi"]))
    assert not EngineConfig.from_kwargs(model=None, **plain).speculative.enabled
    defaults = cli._engine_kwargs(cli._build_parser().parse_args(["serve", "--speculative", "ngram"]))
    spec = EngineConfig.from_kwargs(model=None, **defaults).speculative
    assert (spec.num_speculative_tokens, spec.adaptive) == (4, True)


class FakeLLM:
    """Stands in for LLM in the chat loop: records each conversation it is asked to render."""

    def __init__(self):
        self.rendered: list[list[dict]] = []

    def render_chat(self, messages):
        self.rendered.append([dict(m) for m in messages])
        return {"prompt": "x"}

    def stream(self, prompt, params):
        n = len(self.rendered)
        yield "reply "
        yield str(n)


def test_chat_keeps_history_and_handles_commands(monkeypatch, capsys):
    import io

    fake = FakeLLM()
    monkeypatch.setattr(cli, "_load_llm", lambda args: fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n/reset\nthree\n/quit\nnever\n"))
    assert cli.main(["chat", "--system", "S"]) == 0
    assert capsys.readouterr().out == "reply 1\nreply 2\nreply 3\n"
    sys_msg = {"role": "system", "content": "S"}
    assert fake.rendered == [
        [sys_msg, {"role": "user", "content": "one"}],
        [sys_msg, {"role": "user", "content": "one"}, {"role": "assistant", "content": "reply 1"},
         {"role": "user", "content": "two"}],
        [sys_msg, {"role": "user", "content": "three"}],  # /reset kept only the system message
    ]
