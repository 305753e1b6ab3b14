"""The relay: upstream SSE bytes -> events (:mod:`.sse`) -> per-choice text pieces (:mod:`.channels`) ->
retokenizer -> guard -> decider -> hold-back buffer (:mod:`.releaser`) -> client SSE bytes.

See ``docs/ARCHITECTURE.md`` for the contracts between these modules. Submodules are imported explicitly
(``from guardproxy.proxy.releaser import Releaser``); this package imports nothing eagerly.
"""
