"""A Responses API answer's output items and their stream events, built from chat-style deltas.

The engine path is the chat completions' one, whose text (through tools.ToolStream when tools
are on) comes as deltas `{"content": text}` or `{"tool_calls": [{index, id, function: {name,
arguments}}]}`. Here they become the Responses API's output items in order of appearance: an
assistant `message` (one `output_text` part) and `function_call` items (`call_id`, `name`,
`arguments`), with the events OpenAI streams for each (`response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`, `response.function_call_arguments.delta`,
then the `.done` events). One builder serves both answers, so a streamed response's final
output is the non-streamed one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

Emit = Callable[..., str]  # emit(event_type, **payload) -> one server-sent event


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class OutputBuilder:
    def __init__(self, msg_id: str, emit: Emit | None = None):
        self.msg_id = msg_id
        self.emit = emit or (lambda kind, **payload: "")
        self.items: list[dict] = []  # in output order; a message's text and a call's arguments grow
        self._msg: int | None = None  # output index of the message
        self._calls: dict[int, int] = {}  # ToolStream's call index -> output index

    def open_message(self) -> list[str]:
        """The assistant message item, opened now (answers without tools always have one)."""
        if self._msg is not None:
            return []
        self._msg = len(self.items)
        self.items.append({"id": self.msg_id, "type": "message", "status": "in_progress", "role": "assistant",
                           "content": [], "_text": ""})
        where = {"item_id": self.msg_id, "output_index": self._msg}
        return [self.emit("response.output_item.added", output_index=self._msg, item=self._public(self._msg)),
                self.emit("response.content_part.added", **where, content_index=0, part=_part(""))]

    def feed(self, deltas: list[dict]) -> list[str]:
        events: list[str] = []
        for d in deltas:
            if d.get("content"):
                events += self.open_message()
                self.items[self._msg]["_text"] += d["content"]
                events.append(self.emit("response.output_text.delta", item_id=self.msg_id, output_index=self._msg,
                                        content_index=0, delta=d["content"], logprobs=[]))
            for tc in d.get("tool_calls") or []:
                events += self._call_delta(tc)
        return events

    def _call_delta(self, tc: dict) -> list[str]:
        fn = tc.get("function") or {}
        if tc["index"] not in self._calls:
            out = self._calls[tc["index"]] = len(self.items)
            self.items.append({"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                               "call_id": tc["id"], "name": fn.get("name", ""), "arguments": ""})
            return [self.emit("response.output_item.added", output_index=out, item=self._public(out))]
        out = self._calls[tc["index"]]
        args = fn.get("arguments") or ""
        if not args:
            return []
        self.items[out]["arguments"] += args
        return [self.emit("response.function_call_arguments.delta", item_id=self.items[out]["id"],
                          output_index=out, delta=args)]

    def close(self, status: str) -> list[str]:
        """The `.done` events of every item, in output order; `status` is the message's (a cut
        text is "incomplete")."""
        events: list[str] = []
        for i, item in enumerate(self.items):
            if item["type"] == "message":
                item["status"] = status
                text, where = item["_text"], {"item_id": item["id"], "output_index": i, "content_index": 0}
                events.append(self.emit("response.output_text.done", **where, text=text, logprobs=[]))
                events.append(self.emit("response.content_part.done", **where, part=_part(text)))
            else:
                item["status"] = "completed"
                events.append(self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                        name=item["name"], arguments=item["arguments"]))
            events.append(self.emit("response.output_item.done", output_index=i, item=self._public(i)))
        return events

    def output(self) -> list[dict]:
        return [self._public(i) for i in range(len(self.items))]

    def _public(self, i: int) -> dict:
        item = {k: v for k, v in self.items[i].items() if k != "_text"}
        if item["type"] == "message" and item["status"] != "in_progress":
            item["content"] = [_part(self.items[i]["_text"])]
        return item


def sse(kind: str, seq: int, payload: dict[str, Any]) -> str:
    body = {"type": kind, "sequence_number": seq, **payload}
    return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"
