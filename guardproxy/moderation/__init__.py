"""One response's moderation, pure and synchronous (no I/O, no torch, no aiohttp): channels, retokenizer,
decider, releaser, and the response moderator both the streamed and the JSON path use."""
