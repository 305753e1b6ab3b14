"""A local OpenAI-compatible upstream for the proxy benchmarks: a fixed answer as SSE chunks, fast or paced.

    python bench/upstream.py --port PORT [--tokens 500] [--rate 0]

``POST /v1/chat/completions`` with ``"stream": true`` answers ``max_tokens`` content chunks (default ``--tokens``),
one word per chunk (each word is one Qwen3 token: a space and a common English word), then a finish chunk and
``data: [DONE]``, one write per chunk as vLLM writes them. The model name picks the pace: ``paced-R`` sends R chunks
per second per stream (on a fixed schedule from the first chunk, so a late write does not slow the rest), anything
else uses ``--rate`` (0 = as fast as the event loop writes). Without ``"stream": true`` the same answer comes back
as one ``chat.completion`` JSON. ``GET /v1/models`` lists one model. The chunks are encoded once at start-up: the
server spends its time writing, not serialising.

The answer is safe English prose with no planted trigger; it never depends on the request's messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from aiohttp import web

#: Words of the answer, cycled: each is one token of the Qwen3 vocabulary with its leading space.
WORDS = ("the quick brown fox jumps over a lazy dog and then it runs back to the old house by the river where "
         "we sat in the sun all day long to read some good books about cats birds trees and small boats").split()
ID, CREATED, MODEL = "chatcmpl-bench", 1700000000, "bench-model"


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    """The chunk's JSON after its first key: ``,"id":...}`` + the blank line (see :func:`stamped`)."""
    obj = {"id": ID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"," + json.dumps(obj, separators=(",", ":")).encode()[1:] + b"\n\n"


def stamped(rest: bytes) -> bytes:
    """``data: {"bench_t":NOW`` + ``rest``: the chunk stamped with ``time.monotonic()`` as it is written (the
    benchmark clients read the stamp back to measure each chunk's transit time)."""
    return b'data: {"bench_t":' + (b"%.6f" % time.monotonic()) + rest


def answer_words(n: int) -> list[str]:
    """The ``n`` content pieces of an answer (``" word"`` each, the first without its space)."""
    return [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(n)]


class Answers:
    """Pre-encoded SSE chunks (unstamped, see :func:`stamped`): ``head`` (role), ``words[i]`` (content piece i,
    cycled past ``size``), ``finish`` (``finish_reason: "stop"``)."""

    def __init__(self, size: int = 4096):
        self.head = _chunk({"role": "assistant", "content": ""})
        self.words = [_chunk({"content": w}) for w in answer_words(size)]
        self.finish = _chunk({}, "stop")

    def content(self, i: int) -> bytes:
        return self.words[i] if i < len(self.words) else self.words[(i % (len(self.words) - 1)) + 1]


def pace_of(model: str, default: float) -> float:
    """Chunks per second per stream for a request's model name (``paced-R`` -> R; else ``default``)."""
    if isinstance(model, str) and model.startswith("paced-"):
        try:
            return max(0.0, float(model[len("paced-"):]))
        except ValueError:
            return default
    return default


def make_app(tokens: int, rate: float) -> web.Application:
    """The upstream app: ``tokens`` content chunks per answer by default, ``rate`` chunks/s (0 = unpaced)."""
    answers = Answers(max(4096, tokens))

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or tokens)
        if not body.get("stream"):
            text = "".join(answer_words(n))
            return web.json_response({"id": ID, "object": "chat.completion", "created": CREATED, "model": MODEL,
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                   "logprobs": None, "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}})
        pace = pace_of(body.get("model"), rate)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(stamped(answers.head))
        t0 = time.monotonic()
        for i in range(n):
            if pace:
                wait = t0 + i / pace - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            await resp.write(stamped(answers.content(i)))
        await resp.write(stamped(answers.finish) + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "created": CREATED,
                                                             "owned_by": "bench"}]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokens", type=int, default=500, help="content chunks per answer unless max_tokens is sent")
    p.add_argument("--rate", type=float, default=0.0, help="chunks/s per stream (0: as fast as possible)")
    args = p.parse_args(argv)
    web.run_app(make_app(args.tokens, args.rate), host=args.host, port=args.port, access_log=None,
                print=lambda *a: print(*a, file=sys.stderr), handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
