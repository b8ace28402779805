"""llguidance vs xgrammar on this CPU: per-token mask time and JSON Schema coverage.

Walks a schema-valid JSON document token by token with the default model's tokenizer (SmolLM2,
49152 tokens), computing the full-vocabulary mask before every token, as a decoding step would.
Reports the median per-token mask time of each run and the median over runs, the schema's compile
time, and which of a set of JSON Schema features each engine compiles and enforces.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_grammar_engines.py [--runs 5]

ridgeline depends on llguidance only; to compare, install xgrammar without its dependencies (it
asks for torch and triton; the CPU torch already here is enough):
`.venv/bin/pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2`. A missing engine is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 100000},
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "email", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"id": 4217, "name": "Ada Lovelace", "email": "ada.l@example.org", "role": "editor",
                       "score": 0.875, "tags": ["math", "engines", "poetry"],
                       "address": {"street": "12 St James Square", "city": "London", "zip": "10001"},
                       "active": True})

# feature -> (schema, a valid instance, an invalid instance the engine must refuse)
FEATURES = {
    "string pattern": ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, '"ABC-12"', '"abc-12"'),
    "string format date": ({"type": "string", "format": "date"}, '"2024-02-29"', '"yesterday"'),
    "integer range": ({"type": "integer", "minimum": 3, "maximum": 9}, "7", "12"),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, "0.5", "-1"),
    "enum": ({"enum": ["red", "green"]}, '"red"', '"blue"'),
    "const": ({"const": "x"}, '"x"', '"y"'),
    "array bounds": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, "[1,2]", "[1]"),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, '"a"', "true"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"a"'),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}]},
              '{"a": 1}', "{}"),
    "$ref / $defs": ({"$defs": {"n": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/n"}},
                     "[1, 2]", '["a"]'),
    "recursive $ref": ({"$defs": {"t": {"type": "object", "properties": {"c": {"type": "array",
                        "items": {"$ref": "#/$defs/t"}}}, "additionalProperties": False}}, "$ref": "#/$defs/t"},
                       '{"c": [{"c": []}]}', '{"c": [1]}'),
    "additionalProperties schema": ({"type": "object", "additionalProperties": {"type": "integer"}},
                                    '{"k": 1}', '{"k": "v"}'),
    "type list (nullable)": ({"type": ["string", "null"]}, "null", "1"),
    "minProperties": ({"type": "object", "minProperties": 1}, '{"a": 1}', "{}"),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 2]", "[1, 1]"),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    '[1, "a"]', '["a", 1]'),
}


def tokenizer():
    from ridgeline.loader import default_model_path
    from ridgeline.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


class LLG:
    name = "llguidance"

    def __init__(self, tok, vocab: int):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok, vocab)
        self.vocab = vocab

    def compile(self, schema: dict):
        g = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        m = self.llg.LLMatcher(self.tok, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def mask(self, m, buf) -> None:
        m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)

    def accept(self, m, t: int) -> bool:
        return m.consume_token(t) and not m.is_error()

    def buffer(self):
        import numpy as np

        return np.zeros((self.vocab + 31) // 32, dtype=np.int32)

    def accepts_text(self, m, ids: list[int]) -> bool:
        return m.validate_tokens(ids) == len(ids) and (m.consume_tokens(ids), m.is_accepting())[1]


class XGR:
    name = "xgrammar"

    def __init__(self, tok, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.vocab = vocab

    def compile(self, schema: dict):
        cg = self.compiler.compile_json_schema(json.dumps(schema))
        return self.xgr.GrammarMatcher(cg)

    def mask(self, m, buf) -> None:
        m.fill_next_token_bitmask(buf)

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def buffer(self):
        return self.xgr.allocate_token_bitmask(1, self.vocab)

    def accepts_text(self, m, ids: list[int]) -> bool:
        return all(m.accept_token(t) for t in ids) and m.is_terminated() is False and m.accept_token(
            self.info.stop_token_ids[0])


def mask_times(engine, ids: list[int]) -> tuple[float, float, float]:
    """(compile seconds, median and mean seconds per mask) over one walk of the document."""
    t0 = time.perf_counter()
    m = engine.compile(SCHEMA)
    compile_s = time.perf_counter() - t0
    buf = engine.buffer()
    times = []
    for t in ids:
        t0 = time.perf_counter()
        engine.mask(m, buf)
        times.append(time.perf_counter() - t0)
        if not engine.accept(m, t):
            raise RuntimeError(f"{engine.name} refused token {t} of the valid document")
    return compile_s, statistics.median(times), statistics.mean(times)


def coverage(engine, tok) -> dict[str, str]:
    result = {}
    for name, (schema, good, bad) in FEATURES.items():
        try:
            ok = engine.accepts_text(engine.compile(schema), tok.encode(good, add_special_tokens=False))
            refused = not engine.accepts_text(engine.compile(schema), tok.encode(bad, add_special_tokens=False))
        except Exception as exc:  # noqa: BLE001 -- a compile failure is a coverage gap, reported
            result[name] = f"error: {str(exc).splitlines()[0][:60]}"
            continue
        result[name] = "ok" if ok and refused else ("accepts invalid" if ok else "refuses valid")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tok = tokenizer()
    vocab = 49152
    ids = tok.encode(DOCUMENT, add_special_tokens=False)
    print(f"document: {len(ids)} tokens, vocabulary {vocab}")
    engines = []
    for cls in (LLG, XGR):
        t0 = time.perf_counter()
        try:
            engines.append(cls(tok, vocab))
        except ImportError:
            print(f"{cls.name}: not installed, skipped")
            continue
        print(f"{cls.name}: tokenizer setup {time.perf_counter() - t0:.2f} s")
    for e in engines:
        runs = [mask_times(e, ids) for _ in range(args.runs)]
        med = statistics.median(r[1] for r in runs)
        print(f"{e.name}: compile {statistics.median(r[0] for r in runs) * 1e3:.1f} ms, mask per token "
              f"median {med * 1e6:.0f} us (runs: {', '.join(f'{r[1] * 1e6:.0f}' for r in runs)} us), "
              f"mean {statistics.median(r[2] for r in runs) * 1e6:.0f} us")
    for e in engines:
        cov = coverage(e, tok)
        n_ok = sum(v == "ok" for v in cov.values())
        print(f"{e.name}: coverage {n_ok}/{len(cov)}; " + "; ".join(f"{k}: {v}" for k, v in cov.items() if v != "ok"))


if __name__ == "__main__":
    main()
