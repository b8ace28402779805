"""The request fields that constrain decoding, turned into one StructuredOutputsParams or a 400.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema":
{"name", "schema", "strict"}}) and vLLM's extras (`structured_outputs` with its json / regex /
choice / grammar / json_object keys, and the older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`). At most one may constrain a request; an invalid or
unsatisfiable schema, regex or grammar is a 400 whose `param` is the field that holds it.
"""

from __future__ import annotations

from typing import Any

from ..structured import StructuredOutputsParams
from .protocol import APIError

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def build(param: str, **kw: Any) -> StructuredOutputsParams:
    """StructuredOutputsParams(**kw), its ValueError a 400 naming `param` (the request's field)."""
    kind = next(iter(kw))
    try:
        return StructuredOutputsParams(**kw)
    except ValueError as exc:
        msg = " ".join(str(exc).split()).replace(f"structured_outputs.{kind}", param, 1)
        if not msg.startswith(param):
            msg = f"{param}: {msg}"
        raise APIError(400, msg, param=param) from None


def _response_format(rf: Any) -> StructuredOutputsParams | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise APIError(400, "response_format: must be an object with a 'type'", param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return build("response_format", json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise APIError(400, "response_format.json_schema: must be an object with 'name' and 'schema'",
                           param="response_format.json_schema")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise APIError(400, "response_format.json_schema.name: must be a string",
                           param="response_format.json_schema.name")
        if "strict" in js and js["strict"] is not None and not isinstance(js["strict"], bool):
            raise APIError(400, "response_format.json_schema.strict: must be a boolean",
                           param="response_format.json_schema.strict")
        schema = js.get("schema", {"type": "object"})  # OpenAI: schema is optional (any JSON object)
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema: must be a JSON Schema object",
                           param="response_format.json_schema.schema")
        # strict or not, the output is decoded under the schema (a stricter promise than OpenAI's non-strict)
        return build("response_format.json_schema.schema", json=schema)
    raise APIError(400, f"response_format.type: must be text, json_object or json_schema, got {kind!r}",
                   param="response_format.type")


def _vllm_structured(so: Any) -> StructuredOutputsParams:
    if not isinstance(so, dict):
        raise APIError(400, "structured_outputs: must be an object", param="structured_outputs")
    keys = {k: v for k, v in so.items() if v is not None and v is not False}
    known = {"json", "regex", "choice", "grammar", "json_object"}
    unknown = set(keys) - known - {"disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                                   "whitespace_pattern", "backend"}
    if unknown:
        raise APIError(400, f"structured_outputs: unsupported keys {sorted(unknown)}", param="structured_outputs")
    chosen = [k for k in keys if k in known]
    if len(chosen) != 1:
        raise APIError(400, f"structured_outputs: set exactly one of {', '.join(sorted(known))}",
                       param="structured_outputs")
    kind = chosen[0]
    return build(f"structured_outputs.{kind}", **{kind: keys[kind]})


def structured_outputs(fields: Any) -> StructuredOutputsParams | None:
    """The constraint of a completions or chat request (`fields`: its pydantic model), or None."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = getattr(fields, "response_format", None)
    if rf is not None:
        so = _response_format(rf)
        if so is not None:
            found.append(("response_format", so))
    if getattr(fields, "structured_outputs", None) is not None:
        found.append(("structured_outputs", _vllm_structured(fields.structured_outputs)))
    for name, kind in GUIDED.items():
        value = getattr(fields, name, None)
        if value is not None:
            found.append((name, build(name, **{kind: value})))
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise APIError(400, f"{found[1][0]}: only one constraint per request (got {names})", param=found[1][0])
    return found[0][1] if found else None
