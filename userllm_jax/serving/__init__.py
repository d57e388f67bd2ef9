"""Serving personalised generation (issue 11).

* :mod:`.state` -- a user's raw history and incremental encoder state (the window rule).
* :mod:`.store` -- the durable, versioned user-state store (SQLite WAL by default).
* :mod:`.engine` -- appends and batched, bucketed generation (User-LLM and text prompt).
* :mod:`.app` -- the HTTP service (Starlette + uvicorn) with Prometheus metrics.
* :mod:`.loading` -- the one place that builds an engine's model from a config + workdir.
* :mod:`.tiny` -- a deterministic tiny random model for tests and demos.

See docs/SERVING.md.
"""
