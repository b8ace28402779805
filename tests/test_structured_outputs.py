"""Structured outputs with the default model: outputs under a JSON schema parse and validate,
regex / choice / grammar outputs match, invalid constraints are ValueErrors naming the field, and
the masks change nothing they should not (overlap on or off, prefix caching on or off, n > 1,
preemption, speculative decoding)."""

from __future__ import annotations

import json
import re

import pytest

from ridgeline import LLM, SamplingParams
from ridgeline.structured import StructuredOutputsParams
from ridgeline.structured.masks import OVERLAP_MIN_ROWS

ENGINE = dict(max_model_len=1024, kv_cache_memory="64MiB")
PROMPT = [{"role": "user", "content": "Give me a JSON record about a fictional person."}]

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                      "age": {"type": "integer", "minimum": 18, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
        "level": {"enum": ["low", "mid", "high"]}, "ok": {"type": "boolean"}},
     "required": ["tags", "level", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
     "required": ["id", "score", "address"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[a-z]{3}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "number", "minimum": -1, "maximum": 1},
                                      "label": {"type": ["string", "null"], "maxLength": 12}},
     "required": ["kind", "x", "label"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50}, {"type": "string", "enum": ["none", "many"]}]},
    {"$defs": {"person": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 12},
                                                           "born": {"type": "integer", "minimum": 1900, "maximum": 2024}},
                          "required": ["first", "born"], "additionalProperties": False}},
     "type": "object", "properties": {"author": {"$ref": "#/$defs/person"}, "editor": {"$ref": "#/$defs/person"}},
     "required": ["author", "editor"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
                                      "amount": {"type": "number", "minimum": 0, "maximum": 1000},
                                      "paid": {"type": "boolean"}},
     "required": ["date", "amount", "paid"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
]


def validate(value, schema: dict, path: str = "$", root: dict | None = None) -> None:
    """The subset of JSON Schema the tests use, checked independently of the grammar engine."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return validate(value, root["$defs"][name], path, root)
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                return validate(value, sub, path, root)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{path}: no anyOf branch matches: {errors}")
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != const"
        return
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in enum"
        return
    t = schema.get("type")
    if isinstance(t, list):
        if value is None and "null" in t:
            return
        t = next(x for x in t if x != "null")
    if t == "object":
        assert isinstance(value, dict), f"{path}: not an object"
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            assert k in value, f"{path}: missing {k}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for k, v in value.items():
            if k in props:
                validate(v, props[k], f"{path}.{k}", root)
    elif t == "array":
        assert isinstance(value, list), f"{path}: not an array"
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30), f"{path}: length"
        for i, v in enumerate(value):
            validate(v, schema["items"], f"{path}[{i}]", root)
    elif t == "string":
        assert isinstance(value, str), f"{path}: not a string"
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 30), f"{path}: length"
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{path}: {value!r} !~ {schema['pattern']}"
    elif t in ("integer", "number"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}: not a number"
        if t == "integer":
            assert isinstance(value, int), f"{path}: not an integer"
        assert schema.get("minimum", -1e300) <= value <= schema.get("maximum", 1e300), f"{path}: range"
    elif t == "boolean":
        assert isinstance(value, bool), f"{path}: not a boolean"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(**ENGINE)


def texts(llm: LLM, prompt, params: SamplingParams) -> list[str]:
    if isinstance(prompt, list):
        return [o.text for o in llm.chat(prompt, params, use_tqdm=False)[0].outputs]
    return [o.text for o in llm.generate(prompt, params, use_tqdm=False)[0].outputs]


@pytest.mark.parametrize("kw, field", [
    (dict(json={"type": "strin"}), "structured_outputs.json"),
    (dict(json="{not json"), "structured_outputs.json"),
    (dict(json={"type": "integer", "minimum": 5, "maximum": 3}), "structured_outputs.json"),  # unsatisfiable
    (dict(regex="[a-"), "structured_outputs.regex"),
    (dict(grammar="start: undefined_rule"), "structured_outputs.grammar"),
    (dict(grammar="root ::= missing"), "structured_outputs.grammar"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(regex="a", choice=["a"]), "structured_outputs must set exactly one"),
])
def test_invalid_constraints_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        SamplingParams(structured_outputs=kw)


def test_unknown_key_and_type_refused():
    with pytest.raises(ValueError, match="structured_outputs has unknown keys"):
        SamplingParams(structured_outputs={"json_schema": {}})
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs="json")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llm, temperature):
    for i, schema in enumerate(SCHEMAS):
        params = SamplingParams(temperature=temperature, seed=i, n=2, max_tokens=120,
                                structured_outputs=StructuredOutputsParams(json=schema))
        outs = llm.chat(PROMPT, params, use_tqdm=False)[0].outputs
        for o in outs:
            assert o.finish_reason == "stop", (schema, o.text)
            validate(json.loads(o.text), schema)


def test_json_object_regex_choice_grammar(llm):
    obj = texts(llm, PROMPT, SamplingParams(temperature=1.0, seed=0, n=2, max_tokens=120,
                                            structured_outputs={"json_object": True}))
    for t in obj:
        assert isinstance(json.loads(t), dict)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for t in texts(llm, "Ticket code:", SamplingParams(temperature=1.0, seed=1, n=50, max_tokens=16,
                                                       structured_outputs={"regex": pattern})):
        assert re.fullmatch(pattern, t), t
    choices = ["yes", "no", "not sure"]
    got = texts(llm, "Is the sky green? Answer:", SamplingParams(temperature=1.5, seed=2, n=50, max_tokens=8,
                                                                 structured_outputs={"choice": choices}))
    assert set(got) <= set(choices)
    lark = 'start: "The answer is " NUM "."\nNUM: /[1-9][0-9]?/'
    for t in texts(llm, "Q: 2+2? A:", SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=16,
                                                     structured_outputs={"grammar": lark})):
        assert re.fullmatch(r"The answer is [1-9][0-9]?\.", t), t
    gbnf = 'root ::= "(" [a-c]+ ")"'
    for t in texts(llm, "Letters:", SamplingParams(temperature=1.0, seed=4, n=4, max_tokens=12,
                                                   structured_outputs={"grammar": gbnf})):
        assert re.fullmatch(r"\([a-c]+\)", t) or not t.endswith(")"), t  # ")" closes it; else cut by length


def test_min_tokens_logprobs_and_stop_strings(llm):
    # min_tokens cannot hold back EOS once the grammar is complete: the choice still ends
    got = llm.generate("Answer:", SamplingParams(temperature=0, max_tokens=10, min_tokens=5, logprobs=2,
                                                 structured_outputs={"choice": ["yes", "no"]}), use_tqdm=False)
    o = got[0].outputs[0]
    assert o.text in ("yes", "no") and o.finish_reason == "stop"
    assert o.logprobs and all(lp[t].logprob > float("-inf") for lp, t in zip(o.logprobs, o.token_ids))
    # a stop string inside the constrained output cuts it there
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"], "additionalProperties": False}
    cut = texts(llm, PROMPT, SamplingParams(temperature=0, max_tokens=60, stop=['"b"'],
                                            structured_outputs={"json": schema}))[0]
    assert cut.startswith('{"a": ') and '"b"' not in cut


def test_dead_end_grammar_ends_with_grammar_error(llm):
    """A grammar that compiles but leads nowhere ends with finish_reason "grammar_error" (the reason
    in stop_reason), never a hang or unconstrained tokens; requests beside it are unaffected."""
    dead = 'start: A B\nA: "x"\nB: /[^\\x00-\\U0010FFFF]/'  # B matches no character at all
    endless = 'start: a\na: "x" a'  # never accepts: the parser gives up
    outs = llm.generate(["Go:", "Go:", "Answer:"], [
        SamplingParams(temperature=0, max_tokens=20, structured_outputs={"grammar": dead}),
        SamplingParams(temperature=0, max_tokens=20, structured_outputs={"grammar": endless}),
        SamplingParams(temperature=0, max_tokens=5, structured_outputs={"choice": ["yes", "no"]})], use_tqdm=False)
    first, second, ok = (o.outputs[0] for o in outs)
    assert first.text == "x" and first.finish_reason == "grammar_error" and "no further token" in first.stop_reason
    assert second.finish_reason in ("grammar_error", "length") and set(second.text) <= {"x"}
    assert ok.text in ("yes", "no") and ok.finish_reason == "stop"


def test_same_outputs_without_overlap_and_without_prefix_caching(llm):
    params = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=100, structured_outputs={"json": SCHEMAS[2]})
    grammar = llm.engine.runner.grammar
    grammar.overlap_min_rows = 1  # every step's masks in the worker thread
    try:
        ref = texts(llm, PROMPT, params)
        grammar.overlap = False
        assert texts(llm, PROMPT, params) == ref
    finally:
        grammar.overlap, grammar.overlap_min_rows = True, OVERLAP_MIN_ROWS
    assert texts(llm, PROMPT, params) == ref  # the prompt's blocks are cached now
    no_cache = LLM(**ENGINE, enable_prefix_caching=False)
    assert texts(no_cache, PROMPT, params) == ref


def test_preemption_and_speculation_keep_outputs(llm):
    """Greedy constrained outputs of a batch squeezed into a pool too small for it (preemption,
    recomputation) and of a speculative engine (proposals verified against the masked target rows)
    equal the plain engine's; sampled ones under speculation still validate."""
    prompts = [f"Record number {i} as JSON:" for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": SCHEMAS[i % 2]})
              for i in range(6)]
    ref = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    small = LLM(max_model_len=96, num_kv_blocks=6, block_size=16, max_num_seqs=6)
    got = [o.outputs[0].text for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.get_stats().num_preemptions > 0, "the small pool should have forced preemption"
    assert got == ref
    for t, p in zip(got, params):
        validate(json.loads(t), p.structured_outputs.json)
    spec = LLM(**ENGINE, speculative="ngram", num_speculative_tokens=4, speculative_adaptive=False,
               prompt_lookup_min=1)
    # the prompt holds JSON the n-gram lookup proposes from, valid and invalid for the schema alike
    shown = 'Example: {"tags": ["a", "b"], "level": "low", "ok": true} and {"name": "Ann", "age": 7}. Now yours:'
    outs = spec.generate(prompts + [shown], params + [params[1]], use_tqdm=False)
    assert [o.outputs[0].text for o in outs[:-1]] == ref
    assert outs[-1].outputs[0].text == llm.generate(shown, params[1], use_tqdm=False)[0].outputs[0].text
    stats = spec.get_stats()
    assert stats.spec_decode_num_draft_tokens > 0 and stats.spec_decode_num_accepted_tokens > 0
    sampled = SamplingParams(temperature=1.0, seed=11, n=4, max_tokens=80, structured_outputs={"json": SCHEMAS[1]})
    for o in spec.generate(shown, sampled, use_tqdm=False)[0].outputs:
        validate(json.loads(o.text), SCHEMAS[1])


# ---------------------------------------------------------------------- server (openai client)

SERVER_ARGS = ["--dtype", "auto", "--quantization", "auto", "--max-model-len", "1024", "--max-num-seqs", "16"]


@pytest.fixture(scope="module")
def server():
    from .test_server import Server

    s = Server(*SERVER_ARGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    from .test_server import API_KEY

    c = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    c.model_name = c.models.list().data[0].id
    return c


def test_server_response_format_json_schema(client):
    schema = SCHEMAS[2]
    rf = {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model=client.model_name, messages=PROMPT, max_tokens=120, n=3,
                                       temperature=1.0, seed=5, response_format=rf)
    assert len(r.choices) == 3
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        validate(json.loads(ch.message.content), schema)
    stream = client.chat.completions.create(model=client.model_name, messages=PROMPT, max_tokens=120, n=2,
                                            temperature=1.0, seed=6, response_format=rf, stream=True)
    texts_by_index = {0: "", 1: ""}
    for c in stream:
        for ch in c.choices:
            texts_by_index[ch.index] += ch.delta.content or ""
    for t in texts_by_index.values():
        validate(json.loads(t), schema)
    # streamed, greedy: the pieces concatenate to the non-streamed output, which validates
    plain = client.chat.completions.create(model=client.model_name, messages=PROMPT, max_tokens=120,
                                           temperature=0, response_format=rf).choices[0].message.content
    stream = client.chat.completions.create(model=client.model_name, messages=PROMPT, max_tokens=120,
                                            temperature=0, response_format=rf, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == plain
    validate(json.loads(plain), schema)
    obj = client.chat.completions.create(model=client.model_name, messages=PROMPT, max_tokens=120, temperature=1.0,
                                         seed=0, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_server_completions_guided_fields(client):
    r = client.completions.create(model=client.model_name, prompt="Order id:", max_tokens=16, n=6, temperature=1.0,
                                  seed=1, extra_body={"guided_regex": r"[A-Z]{3}-[0-9]{4}"})
    assert all(re.fullmatch(r"[A-Z]{3}-[0-9]{4}", c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.completions.create(model=client.model_name, prompt="Is water wet? Answer:", max_tokens=8, n=6,
                                  temperature=1.0, seed=2, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.text for c in r.choices} <= {"yes", "no"}
    r = client.completions.create(model=client.model_name, prompt="JSON:", max_tokens=60, temperature=0,
                                  extra_body={"guided_json": SCHEMAS[0]})
    validate(json.loads(r.choices[0].text), SCHEMAS[0])
    r = client.completions.create(model=client.model_name, prompt="Reply:", max_tokens=8, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "b", "schema": {"type": "boolean"}}}})
    assert r.choices[0].text in ("true", "false")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
    ({"structured_outputs": {"json": {"type": "integer", "minimum": 3, "maximum": 1}}}, "structured_outputs.json"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_server_invalid_constraint_is_400_and_others_finish(server, client, body, param):
    import threading

    import httpx

    from .test_server import API_KEY

    done = {}

    def long_request():
        done["r"] = client.chat.completions.create(model=client.model_name, messages=PROMPT, max_tokens=40,
                                                   temperature=0, response_format={"type": "json_object"})

    t = threading.Thread(target=long_request)
    t.start()
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": client.model_name, "messages": PROMPT, "max_tokens": 5, **body}, timeout=60)
    t.join(120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert done["r"].choices[0].finish_reason in ("stop", "length")
