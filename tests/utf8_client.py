"""The openai client with a non-ASCII API key, and a burst of big requests run in a process of its own.

httpx encodes header strings as ASCII, so the openai package cannot send a non-ASCII key by itself
(UnicodeEncodeError before any byte is sent). With the Authorization header given as UTF-8 bytes
and an http client that passes header strings on as UTF-8, it sends what curl and browsers send.

`python -m tests.utf8_client URL MODEL KIND CHARS REPEAT` (the key on stdin, then a line to start)
sends REPEAT requests whose prompt (KIND=prompt) or user message (KIND=messages) has CHARS
characters, and prints one JSON line per request: its start and end on the system's monotonic
clock, its status and error body. Encoding a 5 MB body holds the GIL for ~20 ms: in the process
that measures a stream's chunk times, that would show up as a gap the server did not cause.
(It still shares the CPUs: each 5 MB request costs the client 20-60 ms of its own.)
"""

from __future__ import annotations

import json
import random
import sys
import time

import openai


class UTF8HeaderClient(openai.DefaultHttpxClient):
    def build_request(self, method, url, *, headers=None, **kwargs):
        if headers is not None:
            items = headers.items() if hasattr(headers, "items") else headers
            headers = [(k, v.encode("utf-8") if isinstance(v, str) else v) for k, v in items]
        return super().build_request(method, url, headers=headers, **kwargs)


def utf8_client(base_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120,
                         default_headers={"Authorization": ("Bearer " + api_key).encode()},
                         http_client=UTF8HeaderClient(timeout=120))


def long_text(chars: int) -> str:
    """Words, not one repeated letter: a realistic tokenization cost per character."""
    rng = random.Random(0)
    words = ["the", "mountain", "river", "a", "of", "silence", "Hello,", "world."]
    return " ".join(rng.choice(words) for _ in range(chars // 4 + 1))[:chars]


def main(argv: list[str]) -> None:
    url, model, kind, chars, repeat = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    client = utf8_client(url, sys.stdin.readline().rstrip("\n"))
    text = long_text(chars)
    client.models.list()  # connection, lazy imports: not part of the first timed request
    _ = client.completions, client.chat.completions
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(repeat):
        start = time.monotonic()
        try:
            if kind == "prompt":
                client.completions.create(model=model, prompt=text, max_tokens=1)
            else:
                client.chat.completions.create(model=model, max_tokens=1, messages=[{"role": "user", "content": text}])
            status, body = 200, None
        except openai.APIStatusError as exc:
            status, body = exc.status_code, exc.body
        print(json.dumps({"start": start, "end": time.monotonic(), "status": status, "error": body}), flush=True)
        time.sleep(0.3)


if __name__ == "__main__":
    main(sys.argv[1:])
