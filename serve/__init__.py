"""s2s-serve: TGI's HTTP API over an export directory, with dynamic batching, streaming and back-pressure.

One concern a module:

- `schema.py`   TGI's request/response shapes, every parameter validated once, `ServeError`
- `backend.py`  the `GenerationBackend` protocol the app calls, and its result types
- `batcher.py`  the dynamic batcher (queue, grouping, worker thread): s2s-serve's backend
- `generation.py` one batch on the model: greedy / sampling token by token, beam search whole
- `detokenize.py` token text as tokens arrive
- `app.py`      the Starlette routes (`create_app(backend, validator, info)`), SSE, 429, errors
- `metrics.py`  Prometheus metrics
- `cli.py`      the `s2s-serve` command: flags, logging, uvicorn, SIGTERM drain

Sits above the runtime (`runtime` imports none of this, nor any web framework).
"""
