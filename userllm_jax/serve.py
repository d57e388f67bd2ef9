"""Serve personalised generation over HTTP (see docs/SERVING.md).

    python -m userllm_jax.serve --config=configs/userllm_movielens_100k.py --checkpoint=runs/main
    python -m userllm_jax.serve --demo=tiny --port=8080        # a tiny random model, no checkpoint

Listens on 127.0.0.1 unless ``--host`` says otherwise.  The user-state store is
``--store`` (default ``<checkpoint>/serving/users.sqlite``; ``:memory:`` for a throwaway).
The API key for the write endpoints comes from ``--api_key`` or ``$USERLLM_API_KEY``.
"""

from __future__ import annotations

import os

from absl import app as absl_app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A User-LLM config file.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The main job's workdir.")
_METHOD = flags.DEFINE_string("method", None,
                              "The stage-2 method served (userllm_xattn_proj, userllm_soft_prompt, "
                              "...); default: the config's first User-LLM method")
_DEMO = flags.DEFINE_enum("demo", None, ["tiny"], "Serve a tiny random model (no checkpoint).")
_SEED = flags.DEFINE_integer("seed", 0, "--demo=tiny: parameter seed.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Listen address.")
_PORT = flags.DEFINE_integer("port", 8080, "Listen port (0: any free port).")
_STORE = flags.DEFINE_string("store", None, "SQLite file of the user states, or ':memory:'.")
_API_KEY = flags.DEFINE_string("api_key", None, "API key for the write endpoints.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Request body limit.")
_MAX_CONC = flags.DEFINE_integer("max_concurrency", 64, "Requests in flight (503 beyond).")
_MAX_EVENTS = flags.DEFINE_integer("max_events_per_append", 10_000, "Events per append.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", 64, "Prompt tokens (with BOS).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Free-text new tokens (cap).")
_BEAMS = flags.DEFINE_integer("num_beams", 4, "next_item beams (default per request).")
_TP_BUDGET = flags.DEFINE_integer("tp_budget_tokens", 512, "Text-prompt history budget.")
_CAPACITY = flags.DEFINE_integer("capacity", 0, "Encoder window (0: encoder max_len).")
_WAIT = flags.DEFINE_float("max_batch_wait_ms", 5.0, "Batching window.")
_PORT_FILE = flags.DEFINE_string("port_file", None, "Write the bound port here (tests).")


def main(argv):
  del argv
  import uvicorn  # pylint: disable=g-import-not-at-top
  from userllm_jax.serving import app as app_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.serving import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.serving import loading  # pylint: disable=g-import-not-at-top
  from userllm_jax.serving import store as store_lib  # pylint: disable=g-import-not-at-top

  ecfg = engine_lib.EngineConfig(
      capacity=_CAPACITY.value or None, max_events_per_append=_MAX_EVENTS.value,
      max_prompt_tokens=_MAX_PROMPT.value, max_new_tokens=_MAX_NEW.value,
      num_beams=_BEAMS.value, tp_budget_tokens=_TP_BUDGET.value,
      max_batch_wait_ms=_WAIT.value)
  store_path = _STORE.value
  if _DEMO.value == "tiny":
    from userllm_jax.serving import tiny  # pylint: disable=g-import-not-at-top
    model, tok, catalog = tiny.tiny_parts(_SEED.value)
    tp_llm = None
  else:
    if _CONFIG.value is None or not _CHECKPOINT.value:
      raise flags.ValidationError("--config and --checkpoint are required (or --demo=tiny)")
    model, tok, catalog, tp_llm = loading.load_parts(_CONFIG.value, _CHECKPOINT.value,
                                                     _METHOD.value)
    store_path = store_path or os.path.join(_CHECKPOINT.value, "serving", "users.sqlite")
  if not store_path or store_path == ":memory:":
    store = store_lib.MemoryStore()
  else:
    store = store_lib.SQLiteStore(store_path)
  engine = engine_lib.Engine(model, tok, catalog, store, ecfg, tp_llm=tp_llm)
  server_cfg = app_lib.ServerConfig(api_key=_API_KEY.value or os.environ.get("USERLLM_API_KEY"),
                                    max_body_bytes=_MAX_BODY.value,
                                    max_concurrency=_MAX_CONC.value)
  application = app_lib.create_app(engine, server_cfg)
  config = uvicorn.Config(application, host=_HOST.value, port=_PORT.value, log_level="warning",
                          access_log=False)
  server = uvicorn.Server(config)

  if _PORT_FILE.value:
    import asyncio  # pylint: disable=g-import-not-at-top

    async def serve():
      task = asyncio.create_task(server.serve())
      while not server.started:
        await asyncio.sleep(0.05)
        if task.done():
          return await task
      port = server.servers[0].sockets[0].getsockname()[1]
      tmp = _PORT_FILE.value + ".tmp"
      with open(tmp, "w") as f:
        f.write(str(port))
      os.replace(tmp, _PORT_FILE.value)
      return await task
    asyncio.run(serve())
  else:
    server.run()


if __name__ == "__main__":
  absl_app.run(main)
