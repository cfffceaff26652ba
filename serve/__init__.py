"""The serving layer, between the voice loop and the engine core: the OpenAI HTTP API (Starlette), the client of
a remote OpenAI-compatible server (`RemoteEngine`, httpx), Prometheus metrics, the synthetic-user load generator,
and the engine's command-line helpers. Everything here drives an `engine.backend.Backend`.

May import engine and tradeoff_kernels; must not import voice, tui or bench.
"""
