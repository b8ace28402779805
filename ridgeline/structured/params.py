"""StructuredOutputsParams: the constraint one request decodes under, validated on construction.

Exactly one of json (a JSON Schema), json_object, regex, choice or grammar (a Lark grammar in
llguidance's dialect, or GBNF/EBNF as llama.cpp writes it) is set, as in vLLM. Construction turns
it into an llguidance grammar and checks it without a tokenizer (a few milliseconds), so an
invalid or unsatisfiable schema, regex or grammar is a ValueError naming the field at request
creation, before the request reaches the engine.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

# Compact separators and no free whitespace: what models write anyway, and a small model cannot
# wander into an endless run of newlines inside an object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 1 << 20  # a schema or grammar longer than this is refused before compiling it
KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputsParams:
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    field_name: str = field(default="structured_outputs", repr=False, compare=False)  # for error messages
    llg_grammar: str = field(init=False, repr=False, compare=False)  # llguidance's grammar, compiled per tokenizer

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if (getattr(self, k) not in (None, False))]
        if len(set_kinds) != 1:
            raise ValueError(f"{self.field_name} must set exactly one of {', '.join(KINDS)}; "
                             f"got {', '.join(set_kinds) or 'none'}")
        kind = set_kinds[0]
        name = f"{self.field_name}.{kind}"
        self.llg_grammar = self._build(kind, name)
        if len(self.llg_grammar) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"{name} is too large ({len(self.llg_grammar)} characters; at most {MAX_GRAMMAR_CHARS})")
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self.llg_grammar)
        if is_error:
            raise ValueError(f"{name} is invalid: {' '.join(messages[0].split())}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def _build(self, kind: str, name: str) -> str:
        M = llguidance.LLMatcher
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = _json.loads(schema)
                except ValueError as exc:
                    raise ValueError(f"{name} is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"{name} must be a JSON Schema object")
            return M.grammar_from_json_schema(_json.dumps(schema), defaults=JSON_OPTIONS)
        if kind == "json_object":
            if self.json_object is not True:
                raise ValueError(f"{name} must be true or unset")
            return M.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        if kind == "regex":
            if not isinstance(self.regex, str) or not self.regex:
                raise ValueError(f"{name} must be a non-empty string")
            return M.grammar_from_regex(self.regex)
        if kind == "choice":
            c = self.choice
            if not isinstance(c, (list, tuple)) or not c or not all(isinstance(s, str) and s for s in c):
                raise ValueError(f"{name} must be a non-empty list of non-empty strings")
            return M.grammar_from_lark("start: " + " | ".join(_json.dumps(s) for s in c))
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            raise ValueError(f"{name} must be a non-empty string")
        text = self.grammar
        if "::=" in text:  # GBNF / EBNF (llama.cpp's), converted to Lark
            try:
                text = gbnf_to_lark(text)
            except Exception as exc:  # noqa: BLE001 -- the converter raises plain Exceptions on bad input
                raise ValueError(f"{name} is not a valid GBNF grammar: {exc}") from None
        return M.grammar_from_lark(text)

    @classmethod
    def coerce(cls, value: Any, field_name: str = "structured_outputs") -> "StructuredOutputsParams | None":
        """None, an instance, or a dict of its fields (vLLM's JSON form)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(KINDS)
            if unknown:
                raise ValueError(f"{field_name} has unknown keys {sorted(unknown)}; expected one of {', '.join(KINDS)}")
            return cls(**value, field_name=field_name)
        raise ValueError(f"{field_name} must be a StructuredOutputsParams or a dict, got {type(value).__name__}")
