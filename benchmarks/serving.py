"""Serving load test on 127.0.0.1: User-LLM from the cached user state vs the text prompt.

    nice -n 10 python benchmarks/serving.py                 # Gemma 3 270M, random encoder/bridge
    python benchmarks/serving.py --llm=tiny --requests=16    # a tiny random model (quick)

1. Append vs re-encode: the cost of appending one interaction to a user's encoder state
   holding n items (``IncrementalEncoder.append_device``: one position against the cached
   keys/values) vs a full re-encode of the n items (``UserEncoder.__call__``, jitted), at
   n = 1,000 and 10,000 (a rotary encoder; the state's window is the smallest power of two
   holding n + 1 items: 1,024 and 16,384); plus the whole engine append (encoder, host
   copies, in-memory store) at the served window for reference.
2. Generation through the HTTP server (uvicorn in this process, clients in threads): for
   histories of 50 / 200 / 1,000 items, ``--clients`` concurrent clients send a fixed number
   of requests (``--requests``; a cell also stops after ``--duration`` seconds), User-LLM
   (``method=userllm``: user tokens from the stored encoder outputs) vs text prompt
   (``method=tp``: the history serialized as text, cut from the oldest side to
   ``--tp_budget`` tokens).  TTFT = a request for one new token (prefill + first token);
   e2e = a favourite-genre request (trie-constrained greedy until EOS).  Each cell is warmed
   up first (compilation is not timed).

No checkpoint: the encoder, Perceiver, projector and cross-attention are random (the LLM is
the real Gemma 3 270M unless --llm=tiny); the catalogue is synthetic (``serving/tiny.py``).
Latency and cost do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from userllm_jax.models import encoder as enc  # noqa: E402
from userllm_jax.models import userllm as ul  # noqa: E402
from userllm_jax.serving import engine as engine_lib  # noqa: E402
from userllm_jax.serving import state as state_lib  # noqa: E402
from userllm_jax.serving import store as store_lib  # noqa: E402
from userllm_jax.serving import tiny  # noqa: E402


# encoder sizes of config_base.encoder_model: 'small' is MovieLens 100k / 1M's (d 64, 2 layers),
# 'large' the long-history datasets' (ML-20M, Amazon, Google Local: d 256, 4 layers)
ENCODER_SIZES = {"small": dict(embed_dim=64, num_layers=2, num_heads=2, mlp_dim=256),
                 "large": dict(embed_dim=256, num_layers=4, num_heads=4, mlp_dim=1024)}


def _encoder(num_items, max_len, seed=0, size="small"):
  cfg = enc.EncoderConfig(num_items=num_items, num_genres=8, num_ratings=7,
                          num_timegap_buckets=37,
                          features=("item", "genre", "rating", "timegap"), dropout=0.0,
                          max_len=max_len, position="rotary", **ENCODER_SIZES[size])
  return enc.UserEncoder(cfg, rngs=nnx.Rngs(seed))


def _events(rng, n, num_items, t0=10**6):
  return state_lib.Events.empty().extend(rng.integers(2, num_items, n), rng.integers(2, 7, n),
                                         t0 + np.cumsum(rng.integers(0, 5000, n)))


def _time(fn, reps):
  fn()  # compile / warm
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def bench_append(args, catalog, size):
  rows = []
  encoder = _encoder(catalog.num_items, 16384, size=size)
  gd, params = nnx.split(encoder)
  full = jax.jit(lambda p, b: nnx.merge(gd, p)(b)[0])
  rng = np.random.default_rng(0)
  for n in args.append_sizes:
    # the state's window: the smallest power of two that holds n + 1 items (an append reads
    # every slot of it, so a window much larger than the history would be timed, not n)
    cap = 1 << n.bit_length()
    inc = state_lib.IncrementalEncoder(encoder, catalog.item_genres, capacity=cap)
    ev = _events(rng, n + 1, catalog.num_items)
    batch = inc._batch(ev.tail(n + 1), n + 1)  # pylint: disable=protected-access
    t_full = _time(lambda: jax.block_until_ready(full(params, batch)), 3)
    cache = inc._empty  # pylint: disable=protected-access
    for s in range(0, n, 1024):   # the state holding the first n items, built in chunks
      e = min(n, s + 1024)
      cache = inc.append_device(cache, state_lib.Events(
          ev.item[s:e], ev.rating[s:e], ev.timestamp[s:e], ev.timegap[s:e]))
    one = ev.tail(1)
    t_app = _time(lambda: jax.block_until_ready(inc.append_device(cache, one).h_BxCxD), 20)
    rows.append((size, n, cap, t_app, t_full))
  return rows


def _percentiles(lat):
  a = np.asarray(lat) * 1e3
  return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def run_cell(url, bodies, clients, duration):
  import requests  # pylint: disable=g-import-not-at-top
  lat, errors = [], []
  lock = threading.Lock()
  it = iter(bodies)
  deadline = time.monotonic() + duration

  def worker():
    s = requests.Session()
    while time.monotonic() < deadline:
      with lock:
        body = next(it, None)
      if body is None:
        return
      t0 = time.perf_counter()
      r = s.post(f"{url}/v1/generate", json=body, timeout=600)
      dt = time.perf_counter() - t0
      with lock:
        (lat if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.text)

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for f in [pool.submit(worker) for _ in range(clients)]:
      f.result()
  wall = time.perf_counter() - t0
  if errors:
    raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0][:300]}")
  p50, p99 = _percentiles(lat)
  return {"n": len(lat), "p50_ms": p50, "p99_ms": p99, "rps": len(lat) / wall}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--llm", default="gemma3-270m", help="gemma3-270m | tiny")
  ap.add_argument("--histories", default="50,200,1000")
  ap.add_argument("--append_sizes", default="1000,10000")
  ap.add_argument("--append_encoders", default="small,large", help="small | large (see "
                  "ENCODER_SIZES); generation uses small")
  ap.add_argument("--requests", type=int, default=16, help="requests per User-LLM cell")
  ap.add_argument("--tp_requests", type=int, default=8, help="requests per TP cell")
  ap.add_argument("--clients", type=int, default=8)
  ap.add_argument("--duration", type=float, default=120.0, help="seconds per cell at most")
  ap.add_argument("--tp_budget", type=int, default=2000, help="fits the 2048 bucket")
  ap.add_argument("--capacity", type=int, default=1024, help="User-LLM encoder window")
  ap.add_argument("--skip_generation", action="store_true")
  args = ap.parse_args()
  args.histories = [int(x) for x in args.histories.split(",") if x]
  args.append_sizes = [int(x) for x in args.append_sizes.split(",") if x]
  args.append_encoders = [x for x in args.append_encoders.split(",") if x]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
        f"llm={args.llm}; encoder/bridge RANDOM (no checkpoint)", flush=True)
  catalog = tiny.tiny_catalog(2000)

  rows = [r for size in args.append_encoders for r in bench_append(args, catalog, size)]
  print("\nappend one interaction vs full re-encode (encoder only, median; target ratio "
        ">= 50x at 1,000 items, >= 200x at 10,000):")
  print(f"{'encoder':>14} {'history':>8} {'window':>7} {'append ms':>10} {'re-encode ms':>13} "
        f"{'ratio':>7}")
  for size, n, cap, a, f in rows:
    e = ENCODER_SIZES[size]
    name = f"{size} d{e['embed_dim']}x{e['num_layers']}"
    print(f"{name:>14} {n:>8} {cap:>7} {a * 1e3:>10.2f} {f * 1e3:>13.1f} {f / a:>6.0f}x",
          flush=True)
  if args.skip_generation:
    return

  # the model: real Gemma (or tiny) + random encoder / bridge
  if args.llm == "tiny":
    model, tok, catalog = tiny.tiny_parts(0, max_len=args.capacity, position="rotary",
                                          num_items=2000)
  else:
    from userllm_jax import weights  # pylint: disable=g-import-not-at-top
    t0 = time.time()
    gemma, tok = weights.load_gemma(args.llm)
    print(f"loaded {args.llm} in {time.time() - t0:.0f}s", flush=True)
    ucfg = ul.UserLLMConfig(mode="xattn", num_latents=8, perceiver_layers=1, perceiver_heads=4,
                            perceiver_head_dim=16, xattn_every=6, xattn_num_heads=2,
                            xattn_head_dim=64, xattn_mlp_dim=512)
    model = ul.build_userllm(ucfg, encoder=_encoder(catalog.num_items, args.capacity),
                             gemma=gemma, rngs=nnx.Rngs(1))
  ecfg = engine_lib.EngineConfig(capacity=args.capacity, tp_budget_tokens=args.tp_budget,
                                 batch_sizes=(args.clients,), max_batch_wait_ms=20.0,
                                 prompt_buckets=(32, 64, 128, 256, 512, 1024, 2048, 4096),
                                 max_prompt_tokens=32, target_tokens=16)
  eng = engine_lib.Engine(model, tok, catalog, store_lib.MemoryStore(), ecfg)
  rng = np.random.default_rng(1)
  users = {}
  for n in args.histories:
    users[n] = [f"h{n}_u{i}" for i in range(args.clients)]
    for u in users[n]:
      ev = _events(rng, n, catalog.num_items)
      eng.append(u, [{"item_id": int(i), "timestamp": int(t), "rating": 3}
                     for i, t in zip(ev.item, ev.timestamp)])
  # one engine append of one interaction (encoder + host copies + store write)
  u = users[args.histories[-1]][0]
  last = eng.store.get(u).events.timestamp[-1]
  eng.append(u, [{"item_id": 5, "timestamp": int(last), "rating": 3}])
  t0 = time.perf_counter()
  for j in range(5):
    eng.append(u, [{"item_id": 5, "timestamp": int(last) + j + 1, "rating": 3}])
  t_engine_append = (time.perf_counter() - t0) / 5

  import uvicorn  # pylint: disable=g-import-not-at-top
  from userllm_jax.serving import app as app_lib  # pylint: disable=g-import-not-at-top
  application = app_lib.create_app(eng, app_lib.ServerConfig(max_concurrency=256))
  server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=0,
                                         log_level="warning", access_log=False))
  th = threading.Thread(target=server.run, daemon=True)
  th.start()
  while not server.started:
    time.sleep(0.05)
  url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
  prompt = "What is the user's favorite genre?\n"
  results = {}
  for n in args.histories:
    for method in ("userllm", "tp"):
      count = args.requests if method == "userllm" else args.tp_requests
      for kind in ("ttft", "e2e"):
        mk = (lambda u: {"user_id": u, "task": "free_text", "prompt": prompt, "method": method,
                         "max_new_tokens": 1}) if kind == "ttft" else (
            lambda u: {"user_id": u, "task": "fav_genre", "method": method})
        bodies = [mk(users[n][i % args.clients]) for i in range(count)]
        # warm up (compile): a batch takes the prompt bucket of its longest member: all users
        # together (the largest bucket), then one request alone per other bucket they hit
        by_bucket = {eng.prompt_bucket(eng.make_request(mk(u)), eng.load_state(u)): u
                     for u in users[n]}
        run_cell(url, [mk(u) for u in users[n]], args.clients, 1e9)
        for b, u in sorted(by_bucket.items())[:-1]:
          run_cell(url, [mk(u)], 1, 1e9)
        r = run_cell(url, bodies, args.clients, args.duration)
        results[(n, method, kind)] = r
        print(f"  history {n:>5} {method:>7} {kind:>4}: {r}", flush=True)
  server.should_exit = True
  th.join(timeout=30)

  print(f"\ngeneration through the server, {args.clients} concurrent clients "
        f"(TP budget {args.tp_budget} tokens; User-LLM window {args.capacity}):")
  print("targets at 200 items: TP/UL p50 >= 50x for ttft, >= 5x for e2e; p99/p50 <= 2")
  print(f"{'history':>7} {'kind':>4} | {'User-LLM p50/p99 ms':>20} {'req/s':>6} | "
        f"{'TP p50/p99 ms':>18} {'req/s':>6} | {'TP/UL p50':>9} {'UL p99/p50':>10} "
        f"{'TP p99/p50':>10}")
  for n in args.histories:
    for kind in ("ttft", "e2e"):
      a, b = results[(n, "userllm", kind)], results[(n, "tp", kind)]
      print(f"{n:>7} {kind:>4} | {a['p50_ms']:>9.0f}/{a['p99_ms']:<10.0f} {a['rps']:>6.2f} | "
            f"{b['p50_ms']:>8.0f}/{b['p99_ms']:<9.0f} {b['rps']:>6.2f} | "
            f"{b['p50_ms'] / a['p50_ms']:>8.1f}x {a['p99_ms'] / a['p50_ms']:>9.2f}x "
            f"{b['p99_ms'] / b['p50_ms']:>9.2f}x")
  print(f"\nengine append of one interaction (encoder + host copies + in-memory store), "
        f"window {args.capacity}: {t_engine_append * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
