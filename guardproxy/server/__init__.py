"""The aiohttp server and the httpx upstream client: routes, request glue, relays, metrics."""
