"""The HTTP service (Starlette on uvicorn).

Endpoints (JSON in and out; errors are ``{"error": message}`` with a 4xx/5xx status):

* ``POST /v1/users/{user_id}/interactions`` ``{"events": [{"item_id", "timestamp",
  "rating"?}, ...]}`` -> the user's new state metadata (write endpoint: API key when set).
* ``POST /v1/generate`` ``{"user_id", "task": "next_item"|"fav_genre"|"free_text",
  "prompt"?, "method"?: "userllm"|"tp", "max_new_tokens"?, "num_beams"?}`` -> the answer
  (``items`` ranked for next_item, ``genre`` for fav_genre, ``text``), ``cold_start``.
* ``GET /v1/users/{user_id}`` -> state metadata (404 if unknown).
* ``GET /health`` -> ``{"status": "ok", ...}``; ``GET /metrics`` -> Prometheus text format.

Limits (:class:`ServerConfig`): request body size (413), concurrent requests in flight (503
beyond it), and the engine's limits (events per append, prompt tokens, new tokens, beams).
Every check runs before anything is written: a 4xx leaves the store unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from typing import Optional

import anyio
import prometheus_client as pc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from userllm_jax.serving.engine import Batcher, Engine, RequestError


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  api_key: Optional[str] = None          # protects the write endpoints when set
  max_body_bytes: int = 1 << 20
  max_concurrency: int = 64              # requests in flight; 503 beyond
  request_timeout_s: float = 600.0


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def create_app(engine: Engine, config: ServerConfig = ServerConfig(), *,
               batcher: Optional[Batcher] = None) -> Starlette:
  """The Starlette app around ``engine`` (a :class:`Batcher` is made when not given)."""
  batcher = batcher or Batcher(engine)
  registry = engine.metrics.registry
  req_total = pc.Counter("userllm_http_requests", "HTTP requests", ("endpoint", "status"),
                         registry=registry)
  latency = pc.Histogram("userllm_http_request_seconds", "HTTP request latency",
                         ("endpoint",), registry=registry,
                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
  in_flight = pc.Gauge("userllm_http_in_flight", "Requests in flight", registry=registry)
  users = pc.Gauge("userllm_store_users", "Users in the store", registry=registry)
  users.set_function(engine.store.count)
  state = {"in_flight": 0}
  started = time.time()

  async def read_json(request: Request):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
      raise RequestError(413, f"request body of {length} bytes > max_body_bytes="
                              f"{config.max_body_bytes}")
    body = b""
    async for chunk in request.stream():
      body += chunk
      if len(body) > config.max_body_bytes:
        raise RequestError(413, f"request body > max_body_bytes={config.max_body_bytes}")
    try:
      return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RequestError(400, f"malformed JSON: {e}") from e

  def check_key(request: Request):
    if config.api_key is None:
      return
    got = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if got is None and auth.lower().startswith("bearer "):
      got = auth[7:]
    if got is None or not hmac.compare_digest(got.encode(), config.api_key.encode()):
      raise RequestError(401, "missing or wrong API key (X-API-Key or Authorization: Bearer)")

  def endpoint(name: str):
    def wrap(fn):
      async def handler(request: Request):
        t0 = time.perf_counter()
        if state["in_flight"] >= config.max_concurrency:
          resp = _error(503, f"over max_concurrency={config.max_concurrency}; retry later")
        else:
          state["in_flight"] += 1
          in_flight.inc()
          try:
            resp = await fn(request)
          except RequestError as e:
            resp = _error(e.status, e.message)
          except Exception as e:  # pylint: disable=broad-except
            resp = _error(500, f"{type(e).__name__}: {e}")
          finally:
            state["in_flight"] -= 1
            in_flight.dec()
        req_total.labels(name, str(resp.status_code)).inc()
        latency.labels(name).observe(time.perf_counter() - t0)
        return resp
      return handler
    return wrap

  @endpoint("append")
  async def append(request: Request):
    check_key(request)
    user_id = engine.check_user_id(request.path_params["user_id"])
    body = await read_json(request)
    if not isinstance(body, dict) or set(body) != {"events"}:
      raise RequestError(400, 'body: expected {"events": [...]}')
    events = body["events"]
    engine.parse_events(events)  # validate before taking a worker thread
    meta = await anyio.to_thread.run_sync(engine.append, user_id, events)
    return JSONResponse(meta)

  @endpoint("generate")
  async def generate(request: Request):
    body = await read_json(request)
    req = engine.make_request(body)
    fut = batcher.submit(req)
    out = await asyncio.wait_for(asyncio.wrap_future(fut), config.request_timeout_s)
    return JSONResponse(out)

  @endpoint("user")
  async def user(request: Request):
    meta = await anyio.to_thread.run_sync(engine.user_metadata, request.path_params["user_id"])
    if meta is None:
      raise RequestError(404, f"user {request.path_params['user_id']!r}: no state")
    return JSONResponse(meta)

  async def health(request: Request):
    del request
    return JSONResponse({"status": "ok", "encoder_fingerprint": engine.fingerprint,
                         "mode": engine.mode, "window_capacity": engine.capacity,
                         "uptime_s": time.time() - started})

  async def metrics(request: Request):
    del request
    return Response(pc.generate_latest(registry), media_type=pc.CONTENT_TYPE_LATEST)

  routes = [Route("/v1/users/{user_id}/interactions", append, methods=["POST"]),
            Route("/v1/generate", generate, methods=["POST"]),
            Route("/v1/users/{user_id}", user, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"])]
  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    yield
    batcher.close()

  app = Starlette(routes=routes, lifespan=lifespan)
  app.state.engine = engine
  app.state.batcher = batcher
  return app
