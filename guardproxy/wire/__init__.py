"""Bytes and JSON shapes on the wire: SSE decoding/encoding, JSON, upstream chunks, OpenAI/Azure error shapes.

Imports neither torch nor aiohttp."""
