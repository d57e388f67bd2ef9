"""The HTTP service end to end: a server subprocess on 127.0.0.1 (--demo=tiny), appends,
concurrent generation equal to offline generation, 4xx for bad input with the store
unchanged, and recomputation of a state written with another encoder.

The end-to-end test is in the default run: the HTTP client works in a thread while this
process computes the offline reference, so the server (~42 s CPU: start-up and the
compilation of each decoding program) and the reference (~28 s CPU) overlap on two cores."""

import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import requests

from userllm_jax.data import sequences as seqlib
from userllm_jax.data import tasks as tasks_lib
from userllm_jax.eval import trie as trie_lib
from userllm_jax.models import sampler as sampler_lib
from userllm_jax.serving import engine as engine_lib
from userllm_jax.serving import state as state_lib
from userllm_jax.serving import store as store_lib
from userllm_jax.serving import tiny

KEY = "s3cret"
CAP = 8  # tiny encoder max_len


class _Server:
  """A server subprocess; :meth:`url` waits until it listens (the test works meanwhile)."""

  def __init__(self, d: pathlib.Path, proc: subprocess.Popen):
    self.d, self.proc = d, proc
    self._url = None

  def url(self) -> str:
    port_file = self.d / "port"
    t0 = time.time()
    while self._url is None:
      if port_file.exists():
        self._url = f"http://127.0.0.1:{port_file.read_text()}"
      elif self.proc.poll() is not None or time.time() - t0 > 1200:
        raise RuntimeError(f"server did not start: {(self.d / 'log').read_text()[-3000:]}")
      else:
        time.sleep(0.1)
    return self._url


@pytest.fixture(scope="module")
def server():
  # not under pytest's basetemp: a concurrent pytest session may rotate (delete) it
  d = pathlib.Path(tempfile.mkdtemp(prefix="userllm_serve_"))
  cmd = [sys.executable, "-m", "userllm_jax.serve", "--demo=tiny", "--port=0",
         f"--port_file={d / 'port'}", f"--store={d / 'users.sqlite'}", f"--api_key={KEY}",
         "--max_events_per_append=50", "--num_beams=2", "--max_batch_wait_ms=200",
         "--max_body_bytes=20000", "--max_prompt_tokens=32"]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  log = open(d / "log", "w")
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  try:
    yield _Server(d, proc)
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()
    shutil.rmtree(d, ignore_errors=True)


def _events(rng, n, t0=1000):
  stamps = t0 + np.cumsum(rng.integers(0, 4000, n))
  return [{"item_id": int(i), "timestamp": int(t), "rating": int(r)}
          for i, t, r in zip(rng.integers(2, 40, n), stamps, rng.integers(1, 6, n))]


def _post(url, body, key=KEY, raw=None):
  headers = {"X-API-Key": key} if key else {}
  if raw is not None:
    return requests.post(url, data=raw, headers={**headers, "Content-Type": "application/json"},
                         timeout=600)
  return requests.post(url, json=body, headers=headers, timeout=600)


def _offline(model, tok, catalog, sent):
  """Offline answers (next_item rankings, fav_genre ids): Sampler on the same model with
  UserLLM.llm_inputs of a full encode of each user's rule window."""
  vocab = model.gemma.cfg.vocab_size
  item_ids = [i for i, t in enumerate(catalog.item_titles) if t]
  items_trie = trie_lib.TitleTrie.from_titles([catalog.item_titles[i] for i in item_ids], tok,
                                              item_ids=item_ids)
  gids = catalog.favourite_genre_candidates
  genre_trie = trie_lib.TitleTrie.from_titles([catalog.genre_names[g] for g in gids], tok,
                                              item_ids=gids)
  rid = {"1": 2, "2": 3, "3": 4, "4": 5, "5": 6}
  B = len(sent)
  hist = {k: np.zeros((B, CAP) + ((2,) if k == "genre_BxTxG" else ()), np.int32)
          for k in ("item_BxT", "genre_BxTxG", "rating_BxT", "timegap_BxT", "position_BxT",
                    "segment_BxT")}
  for b, (events, wlen) in enumerate(sent):
    if not wlen:
      continue
    gaps = seqlib.timegap_ids(np.array([e["timestamp"] for e in events]))
    w = events[-wlen:]
    hist["item_BxT"][b, :wlen] = [e["item_id"] for e in w]
    hist["genre_BxTxG"][b, :wlen] = catalog.item_genres[hist["item_BxT"][b, :wlen]]
    hist["rating_BxT"][b, :wlen] = [rid[str(e["rating"])] for e in w]
    hist["timegap_BxT"][b, :wlen] = gaps[-wlen:]
    hist["position_BxT"][b, :wlen] = np.arange(wlen)
    hist["segment_BxT"][b, :wlen] = 1
  kw = model.llm_inputs(hist, deterministic=True)
  sampler = sampler_lib.Sampler(model.gemma, eos_id=tok.eos_id, pad_id=tok.pad_id)
  prompt = [tok.bos_id] + tok.encode(tasks_lib.prompt_for("next_item", catalog))
  out = sampler.beam_search([prompt] * B, num_beams=2, max_new_tokens=40, **kw,
                            logits_processor=trie_lib.make_sampler_processor(
                                items_trie.to_arrays(vocab)))
  items = [[i for row, f in zip(out.tokens_BxKxN[b], out.finished_BxK[b]) if f
            for i in items_trie.items_for(list(row))] for b in range(B)]
  prompt = [tok.bos_id] + tok.encode(tasks_lib.prompt_for("fav_genre", catalog))
  out = sampler.generate([prompt] * B, max_new_tokens=40, **kw,
                         logits_processor=trie_lib.make_sampler_processor(
                             genre_trie.to_arrays(vocab)))
  genres = [genre_trie.items_for(list(out.tokens_BxN[b]))[0] for b in range(B)]
  return items, genres


def _drive(server, chunks, users):
  """The client side (runs in a thread while the test computes the offline reference):
  appends every user's chunks, then generates for all users concurrently (next_item and
  fav_genre), then once with the text-prompt path and once free text."""
  url = server.url()
  assert requests.get(f"{url}/health", timeout=60).json()["status"] == "ok"
  metas = {}
  for user, cs in chunks.items():
    for new in cs:
      r = _post(f"{url}/v1/users/{user}/interactions", {"events": new})
      assert r.status_code == 200, r.text
    metas[user] = r.json()
  bodies = [{"user_id": u, "task": t} for t in ("next_item", "fav_genre") for u in users]
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    outs = list(pool.map(lambda b: _post(f"{url}/v1/generate", b, key=None), bodies))
  for o in outs:
    assert o.status_code == 200, o.text
  res = {(b["user_id"], b["task"]): o.json() for b, o in zip(bodies, outs)}
  tp = _post(f"{url}/v1/generate", {"user_id": "u1", "task": "next_item", "method": "tp"},
             key=None)
  free = _post(f"{url}/v1/generate", {"user_id": "u1", "task": "free_text",
                                      "max_new_tokens": 4,
                                      "prompt": "Describe the user in one sentence.\n"},
               key=None)
  return metas, res, tp, free


def test_service_end_to_end(server):
  rng = np.random.default_rng(0)
  # u0: 5 events at once; u1: 3 + 4 + 6 (crosses the window capacity 8); u2: 1 by 1 x 10
  plan = {"u0": [5], "u1": [3, 4, 6], "u2": [1] * 10}
  chunks, sent = {}, {"cold": ([], 0)}
  for user, sizes in plan.items():
    chunks[user], t, wlen = [], 1000, 0
    for k in sizes:
      chunks[user].append(_events(rng, k, t))
      t = chunks[user][-1][-1]["timestamp"]
      wlen, _ = state_lib.next_window(wlen, k, CAP, CAP // 2)
    sent[user] = (sum(chunks[user], []), wlen)
  # u1: 3+4 -> 7; +6 > 8 -> restart with max(4, 6) = 6.  u2: 8, then restart with 4, then 5.
  assert [sent[u][1] for u in plan] == [5, 6, 5]
  users = ["u0", "u1", "u2", "cold"]

  # The server works (HTTP in a thread) while this process computes the offline reference.
  with concurrent.futures.ThreadPoolExecutor(1) as ex:
    client = ex.submit(_drive, server, chunks, users)
    model, tok, catalog = tiny.tiny_parts(0)
    want_items, want_genre = _offline(model, tok, catalog, [sent[u] for u in users])
    metas, res, tp, free = client.result(timeout=1200)
  # personalisation is visible at this scale: the users do not all get the same answer
  assert len({tuple(w) for w in want_items}) > 1 and len(set(want_genre)) > 1

  for user in plan:
    assert metas[user]["total_events"] == len(sent[user][0]), metas[user]
    assert metas[user]["version"] == len(chunks[user]), metas[user]
    assert metas[user]["window_len"] == sent[user][1], metas[user]
  assert res[("cold", "next_item")]["cold_start"] and not res[("u0", "next_item")]["cold_start"]
  assert max(o["batch_size"] for o in res.values()) > 1     # decoded together
  for u, wi, wg in zip(users, want_items, want_genre):
    assert [x["item_id"] for x in res[(u, "next_item")]["items"]] == wi, u
    assert res[(u, "fav_genre")]["genre_id"] == wg, u

  # the text-prompt path and free text through the same server
  assert tp.status_code == 200 and tp.json()["prompt_tokens"] > 20 and tp.json()["items"], tp.text
  assert tp.json()["history_items_used"] == len(sent["u1"][0])
  assert free.status_code == 200 and isinstance(free.json()["text"], str), free.text

  # bad input: a 4xx with a message, and the store unchanged
  url = server.url()
  before = {u: requests.get(f"{url}/v1/users/{u}", timeout=60).json() for u in plan}
  app = f"{url}/v1/users/u0/interactions"
  good = _events(rng, 1, 10**9)
  bad = [
      (lambda: _post(app, None, raw=b'{"events": [1,'), 400, "malformed JSON"),
      (lambda: _post(app, {"events": [{**good[0], "item_id": 999}]}), 422, "unknown item"),
      (lambda: _post(app, {"events": [{**good[0], "item_id": 1}]}), 422, "unknown item"),
      (lambda: _post(app, {"events": _events(rng, 51, 10**9)}), 413, "max_events_per_append"),
      (lambda: _post(app, {"events": [{**good[0], "timestamp": -5}]}), 400, "timestamp"),
      (lambda: _post(app, {"events": [{**good[0], "timestamp": 5}]}), 422, "before"),
      (lambda: _post(app, {"events": [{**good[0], "rating": 11}]}), 422, "rating"),
      (lambda: _post(app, {"events": []}), 400, "non-empty"),
      (lambda: _post(app, {"events": good}, key="wrong"), 401, "API key"),
      (lambda: _post(app, {"events": good}, key=None), 401, "API key"),
      (lambda: _post(app, None, raw=b'{"events": []}' + b" " * 30000), 413, "max_body_bytes"),
      (lambda: _post(f"{url}/v1/users/bad%20id/interactions", {"events": good}), 400,
       "user_id"),
      (lambda: _post(f"{url}/v1/generate", {"user_id": "u0", "task": "poem"}), 400, "task"),
      (lambda: _post(f"{url}/v1/generate", {"user_id": "u0", "task": "next_item",
                                             "max_new_tokens": -3}), 400, "max_new_tokens"),
      (lambda: _post(f"{url}/v1/generate", {"user_id": "u0", "task": "next_item",
                                             "num_beams": 0}), 400, "num_beams"),
      (lambda: _post(f"{url}/v1/generate", {"user_id": "u0", "task": "free_text",
                                             "prompt": "item " * 40}), 413, "prompt"),
      (lambda: _post(f"{url}/v1/generate", {"user_id": "u0", "task": "free_text"}), 400,
       "prompt"),
      (lambda: _post(f"{url}/v1/generate", None, raw=b"[not json"), 400, "malformed"),
  ]
  for call, status, words in bad:
    r = call()
    assert r.status_code == status, (words, r.status_code, r.text)
    assert words.lower() in r.json()["error"].lower(), (words, r.text)
  after = {u: requests.get(f"{url}/v1/users/{u}", timeout=60).json() for u in plan}
  assert after == before
  assert requests.get(f"{url}/v1/users/nobody", timeout=60).status_code == 404
  metrics = requests.get(f"{url}/metrics", timeout=60).text
  assert "userllm_http_requests_total" in metrics and "userllm_appended_events_total" in metrics


def test_state_from_another_encoder_is_recomputed(tmp_path):
  model, tok, catalog = tiny.tiny_parts(0)
  path = str(tmp_path / "u.sqlite")
  e1 = engine_lib.Engine(model, tok, catalog, store_lib.SQLiteStore(path))
  rng = np.random.default_rng(3)
  e1.append("a", _events(rng, 6))
  old = e1.store.get("a")
  assert old.fingerprint == e1.fingerprint
  # another encoder checkpoint: one parameter differs
  blk = model.encoder.stack.blocks[0]
  blk.up_bias[...] = blk.up_bias[...] + 0.5
  e2 = engine_lib.Engine(model, tok, catalog, store_lib.SQLiteStore(path))
  assert e2.fingerprint != e1.fingerprint
  assert e2.user_metadata("a")["state_current"] is False
  st = e2.load_state("a")
  assert st.fingerprint == e2.fingerprint and st.version == old.version + 1
  want = np.asarray(e2.inc.encode_window(st.events, st.window_len).h_BxCxD[0, :st.window_len])
  np.testing.assert_allclose(st.cache["h"], want, atol=1e-6)
  assert not np.allclose(st.cache["h"], old.cache["h"], atol=1e-3)   # the old one was not used
  assert e2.store.get("a").fingerprint == e2.fingerprint


def test_served_method_defaults_to_the_configs_first_user_llm_method():
  """No --method: the config's first User-LLM method (what its job trained); bad ones raise."""
  import ml_collections
  from userllm_jax.serving import loading
  cfg = ml_collections.ConfigDict(dict(methods=("tp_lora", "userllm_xattn_proj",
                                                "userllm_soft_prompt")))
  assert loading.served_method(cfg) == "userllm_xattn_proj"
  assert loading.served_method(cfg, "userllm_soft_prompt") == "userllm_soft_prompt"
  with pytest.raises(ValueError, match="User-LLM method"):
    loading.served_method(cfg, "tp_lora")
  cfg.methods = ("tp_lora",)
  with pytest.raises(ValueError, match="no User-LLM method"):
    loading.served_method(cfg)
