"""The serving engine: appends (incremental user state) and batched personalised generation.

The engine takes in-memory objects -- a :class:`~userllm_jax.models.userllm.UserLLM`, a
tokenizer, a :class:`~userllm_jax.data.tasks.Catalog` and a
:class:`~userllm_jax.serving.store.UserStateStore` -- so tests build it from tiny random
models; :mod:`userllm_jax.serving.loading` builds those objects from a trained workdir.

Generation (:meth:`Engine.generate_batch`): requests of one *group* (same method, task,
``max_new_tokens`` and beams) are decoded together by ``models/sampler.Sampler`` with the
Gemma KV cache: prompts are left-padded to a length bucket and the batch is padded to a
batch-size bucket (``EngineConfig.prompt_buckets`` / ``batch_sizes``), so requests of any
length and count reuse a few compiled programs instead of recompiling per request.

* ``method='userllm'``: the user tokens come from the stored encoder outputs of the user's
  window (Perceiver + projector run on them; the encoder does not run at all); a user with
  no history (cold start) gets an all-False user mask -- cross-attention adds exactly zero and
  a soft prompt is fully masked, i.e. the plain LLM -- and the response says
  ``"cold_start": true``.
* ``method='tp'``: the text-prompt baseline through the same engine: the user's history is
  serialized as text (``data/tasks.serialize_history``, newest last, cut from the oldest side
  to ``tp_budget_tokens`` tokens) before the task prompt; the LLM gets no user tokens.
* tasks: ``next_item`` (trie-constrained over the catalogue titles; beam search, the beams
  are the ranked items), ``fav_genre`` (trie-constrained greedy over the genre names),
  ``free_text`` (unconstrained greedy, the prompt is the caller's).

Bad input raises :class:`RequestError` (an HTTP status and a message) before anything is
written.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import re
import threading
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.data import tasks as tasks_lib
from userllm_jax.eval import trie as trie_lib
from userllm_jax.models import sampler as sampler_lib
from userllm_jax.models import userllm as userllm_lib
from userllm_jax.serving import state as state_lib
from userllm_jax.serving import store as store_lib

TASKS = ("next_item", "fav_genre", "free_text")
METHODS = ("userllm", "tp")
_USER_ID_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


class RequestError(ValueError):
  """Bad input: ``status`` (4xx) and a message naming the field."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  capacity: Optional[int] = None        # encoder window (default: encoder max_len)
  refill: Optional[int] = None          # window length after a restart (default capacity/2)
  max_events_per_append: int = 10_000
  max_stored_events: int = 20_000       # raw history kept per user (>= capacity)
  max_prompt_tokens: int = 64           # the caller's prompt, BOS included
  max_prompt_chars: int = 4_096
  max_new_tokens: int = 32              # free text: default and cap
  target_tokens: int = 40               # next_item / fav_genre: new-token limit
  num_beams: int = 4                    # next_item default
  max_beams: int = 8
  tp_budget_tokens: int = 512           # text-prompt history budget
  batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
  prompt_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
  max_batch_wait_ms: float = 5.0


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
  user_id: str
  task: str
  prompt: str
  method: str = "userllm"
  max_new_tokens: int = 32
  num_beams: int = 1

  @property
  def group(self) -> tuple:
    return (self.method, self.task, self.max_new_tokens, self.num_beams)


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise RequestError(413, f"{what} {n} exceeds the largest bucket {buckets[-1]}")


def _rating_key(s) -> Optional[str]:
  try:
    return f"{float(s):g}"
  except (TypeError, ValueError):
    return None


class Engine:
  """See the module doc.  Thread-safe: appends lock per user; generation runs in the caller's
  thread (:class:`Batcher` calls it from one worker thread)."""

  def __init__(self, model, tokenizer, catalog: tasks_lib.Catalog,
               store: store_lib.UserStateStore, config: EngineConfig = EngineConfig(), *,
               tp_llm=None, registry=None):
    self.model = model
    self.tokenizer = tokenizer
    self.catalog = catalog
    self.store = store
    self.config = config
    self.mode = model.mode
    self.inc = state_lib.IncrementalEncoder(model.encoder, catalog.item_genres,
                                            capacity=config.capacity, refill=config.refill)
    self.fingerprint = self.inc.fingerprint
    self.capacity = self.inc.capacity
    if config.max_stored_events < self.capacity:
      raise ValueError(f"EngineConfig.max_stored_events={config.max_stored_events} < window "
                       f"capacity {self.capacity}")
    self.num_items = int(model.encoder.cfg.num_items)
    self._rating_ids = {}
    for i, name in enumerate(catalog.rating_names):
      key = _rating_key(name)
      if i >= 2 and key is not None:
        self._rating_ids[key] = i
    # tries: next item over the catalogue titles, favourite genre over the genre names
    vocab = model.gemma.cfg.vocab_size
    item_ids = [i for i, t in enumerate(catalog.item_titles) if t and i < self.num_items]
    self._valid_items = np.zeros(self.num_items, bool)
    self._valid_items[item_ids] = True
    self.item_trie = trie_lib.TitleTrie.from_titles([catalog.item_titles[i] for i in item_ids],
                                                    tokenizer, item_ids=item_ids)
    genre_ids = catalog.favourite_genre_candidates
    self.genre_trie = trie_lib.TitleTrie.from_titles(
        [str(catalog.genre_names[g]) for g in genre_ids], tokenizer, item_ids=genre_ids)
    self._processors = {
        "next_item": trie_lib.make_sampler_processor(self.item_trie.to_arrays(vocab)),
        "fav_genre": trie_lib.make_sampler_processor(self.genre_trie.to_arrays(vocab)),
        "free_text": None}
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    self.sampler = sampler_lib.Sampler(model.gemma, eos_id=eos, pad_id=pad)
    self.tp_sampler = sampler_lib.Sampler(tp_llm if tp_llm is not None else model.gemma,
                                          eos_id=eos, pad_id=pad)
    self._tp_has_xattn = bool((tp_llm if tp_llm is not None else model.gemma)
                              .cfg.cross_attention_layers)
    # user tokens from cached encoder outputs (UserLLM.embed_users without the encoder),
    # jitted over the Perceiver's and the projector's state only
    perceiver = model.perceiver
    user_vector = bool(model.cfg.user_vector_token)
    self.num_user_tokens = (perceiver.cfg.num_latents if perceiver is not None
                            else self.capacity) + int(user_vector)
    self.llm_dim = model.gemma.cfg.embed_dim
    llm_dtype = model.gemma.dtype
    pg, ps = nnx.split(perceiver) if perceiver is not None else (None, None)
    jg, js = nnx.split(model.projector)
    self._bridge_state = (ps, js)

    def _user_tokens(states, h_BxCxD, valid_BxC):
      ps_, js_ = states
      return userllm_lib.user_tokens_from_encoded(
          nnx.merge(pg, ps_) if pg is not None else None, nnx.merge(jg, js_), h_BxCxD,
          valid_BxC, dtype=llm_dtype, user_vector=user_vector)

    self._user_tokens = jax.jit(_user_tokens)
    self._locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
    self._locks_lock = threading.Lock()
    self.metrics = _Metrics(registry)

  # -- users --------------------------------------------------------------------------------

  def _lock(self, user_id: str) -> threading.Lock:
    with self._locks_lock:
      return self._locks[user_id]

  @staticmethod
  def check_user_id(user_id) -> str:
    if not isinstance(user_id, str) or not _USER_ID_RE.match(user_id):
      raise RequestError(400, f"user_id: expected 1-128 characters of [A-Za-z0-9_.:@-], got "
                              f"{str(user_id)[:40]!r}")
    return user_id

  def load_state(self, user_id: str) -> state_lib.UserState:
    """The user's state; one computed with another encoder is recomputed (and stored),
    never used.  A user never seen gets an empty (unstored, version 0) state."""
    st = self.store.get(user_id)
    if st is None:
      return state_lib.new_state(user_id, self.fingerprint)
    if st.fingerprint == self.fingerprint:
      return st
    with self._lock(user_id):
      st = self.store.get(user_id)
      if st.fingerprint == self.fingerprint:
        return st
      t0 = time.perf_counter()
      wlen = min(st.window_len, self.capacity, len(st.events))
      cache = (self.inc.to_host(self.inc.encode_window(st.events, wlen)) if wlen else None)
      new = dataclasses.replace(st, fingerprint=self.fingerprint, window_len=wlen, cache=cache,
                                updated_at=time.time())
      st = self.store.put(new, expected_version=st.version)
      self.metrics.recomputed.inc()
      self.metrics.encode_seconds.labels("recompute").observe(time.perf_counter() - t0)
      return st

  def parse_events(self, events) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(item, rating, timestamp)`` arrays from JSON events; RequestError on bad input."""
    if not isinstance(events, list) or not events:
      raise RequestError(400, "events: expected a non-empty list of {item_id, timestamp, "
                              "rating?} objects")
    if len(events) > self.config.max_events_per_append:
      raise RequestError(413, f"events: {len(events)} events > max_events_per_append="
                              f"{self.config.max_events_per_append}")
    items, ratings, stamps = [], [], []
    for i, e in enumerate(events):
      if not isinstance(e, dict):
        raise RequestError(400, f"events[{i}]: expected an object, got {type(e).__name__}")
      unknown = set(e) - {"item_id", "timestamp", "rating"}
      if unknown:
        raise RequestError(400, f"events[{i}]: unknown field(s) {sorted(unknown)}")
      item = e.get("item_id")
      if isinstance(item, bool) or not isinstance(item, int):
        raise RequestError(400, f"events[{i}].item_id: expected an integer, got {item!r}")
      if not (0 <= item < self.num_items and self._valid_items[item]):
        raise RequestError(422, f"events[{i}].item_id: unknown item id {item} (catalogue ids "
                                f"are 2..{self.num_items - 1} with a title)")
      ts = e.get("timestamp")
      if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise RequestError(400, f"events[{i}].timestamp: expected an integer >= 0 (seconds), "
                                f"got {ts!r}")
      r = e.get("rating")
      if r is None:
        rid = 1  # OOV: rating unknown
      else:
        key = _rating_key(r) if not isinstance(r, bool) else None
        if key not in self._rating_ids:
          raise RequestError(422, f"events[{i}].rating: unknown rating {r!r}; known: "
                                  f"{sorted(self._rating_ids)}")
        rid = self._rating_ids[key]
      items.append(item)
      ratings.append(rid)
      stamps.append(ts)
    stamps_a = np.asarray(stamps, np.int64)
    if np.any(np.diff(stamps_a) < 0):
      raise RequestError(422, "events: timestamps must be non-decreasing (chronological)")
    return np.asarray(items, np.int32), np.asarray(ratings, np.int32), stamps_a

  def append(self, user_id: str, events) -> dict[str, Any]:
    """Appends interactions; returns the new state's metadata."""
    self.check_user_id(user_id)
    item, rating, ts = self.parse_events(events)
    with self._lock(user_id):
      st = self.load_state(user_id)
      if len(st.events) and ts[0] < st.events.timestamp[-1]:
        raise RequestError(422, f"events[0].timestamp {int(ts[0])} is before the user's last "
                                f"event ({int(st.events.timestamp[-1])})")
      t0 = time.perf_counter()
      k = len(item)
      events_all = st.events.extend(item, rating, ts)
      cache, wlen, incremental = self.inc.apply(st.cache, st.window_len, events_all, k)
      dt = time.perf_counter() - t0
      new = dataclasses.replace(st, fingerprint=self.fingerprint,
                                events=events_all.tail(self.config.max_stored_events),
                                total_events=st.total_events + k, window_len=wlen, cache=cache,
                                updated_at=time.time())
      try:
        st = self.store.put(new, expected_version=st.version or None)
      except store_lib.VersionConflict as e:
        raise RequestError(409, str(e)) from e
    self.metrics.appended.inc(k)
    self.metrics.encode_seconds.labels("incremental" if incremental else "restart").observe(dt)
    return {**st.metadata(), "appended": k, "incremental": incremental, "encode_ms": dt * 1e3}

  def user_metadata(self, user_id: str) -> Optional[dict[str, Any]]:
    self.check_user_id(user_id)
    st = self.store.get(user_id)
    if st is None:
      return None
    meta = st.metadata()
    meta["state_current"] = st.fingerprint == self.fingerprint
    meta["window_capacity"] = self.capacity
    return meta

  # -- generation ---------------------------------------------------------------------------

  def make_request(self, body) -> GenerateRequest:
    """A validated :class:`GenerateRequest` from a JSON body (RequestError on bad input)."""
    if not isinstance(body, dict):
      raise RequestError(400, "body: expected a JSON object")
    unknown = set(body) - {"user_id", "task", "prompt", "method", "max_new_tokens",
                           "num_beams"}
    if unknown:
      raise RequestError(400, f"unknown field(s) {sorted(unknown)}")
    user_id = self.check_user_id(body.get("user_id"))
    task = body.get("task")
    if task not in TASKS:
      raise RequestError(400, f"task: expected one of {TASKS}, got {task!r}")
    method = body.get("method", "userllm")
    if method not in METHODS:
      raise RequestError(400, f"method: expected one of {METHODS}, got {method!r}")
    cfg = self.config
    prompt = body.get("prompt")
    if prompt is None:
      if task == "free_text":
        raise RequestError(400, "prompt: required for task 'free_text'")
      prompt = tasks_lib.prompt_for(task, self.catalog)
    if not isinstance(prompt, str) or not prompt:
      raise RequestError(400, "prompt: expected a non-empty string")
    if len(prompt) > cfg.max_prompt_chars:
      raise RequestError(413, f"prompt: {len(prompt)} characters > max_prompt_chars="
                              f"{cfg.max_prompt_chars}")
    n_tok = 1 + len(self.tokenizer.encode(prompt))
    if n_tok > cfg.max_prompt_tokens:
      raise RequestError(413, f"prompt: {n_tok} tokens (with BOS) > max_prompt_tokens="
                              f"{cfg.max_prompt_tokens}")
    limit = cfg.max_new_tokens if task == "free_text" else cfg.target_tokens
    mnt = body.get("max_new_tokens", limit)
    if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1:
      raise RequestError(400, f"max_new_tokens: expected a positive integer, got {mnt!r}")
    if mnt > limit:
      raise RequestError(413, f"max_new_tokens: {mnt} > limit {limit} for task {task!r}")
    beams = body.get("num_beams", cfg.num_beams if task == "next_item" else 1)
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
      raise RequestError(400, f"num_beams: expected a positive integer, got {beams!r}")
    if beams > cfg.max_beams:
      raise RequestError(413, f"num_beams: {beams} > max_beams={cfg.max_beams}")
    if task == "fav_genre" and beams != 1:
      raise RequestError(400, "num_beams: fav_genre is decoded greedily (num_beams=1)")
    return GenerateRequest(user_id, task, prompt, method, int(mnt), int(beams))

  def tp_text(self, st: state_lib.UserState, prompt: str) -> tuple[str, int]:
    """The text-prompt baseline's prompt for a user and the number of history items in it."""
    ev = st.events.tail(self.config.tp_budget_tokens)   # a line is >= 1 token
    cat = self.catalog
    items = []
    for it, r in zip(ev.item.tolist(), ev.rating.tolist()):
      title = cat.item_titles[it] if it < cat.num_items and cat.item_titles[it] else f"item {it}"
      items.append(tasks_lib.HistoryItem(title, cat.genres_text(cat.item_genres[it].tolist()),
                                         cat.rating_text(int(r))))
    ser = tasks_lib.serialize_history(items, self.tokenizer, self.config.tp_budget_tokens)
    return f"{tasks_lib.TP_HEADER}{ser.text}\n{prompt}", ser.num_items

  def prompt_ids(self, req: GenerateRequest, st: state_lib.UserState) -> tuple[list[int], int]:
    """The LLM prompt's token ids (BOS first) for a request and the history items it holds
    (TP: serialized in the text; User-LLM: the encoder window behind the user tokens)."""
    if req.method == "tp":
      text, n_items = self.tp_text(st, req.prompt)
    else:
      text, n_items = req.prompt, st.window_len
    return [self.tokenizer.bos_id] + list(self.tokenizer.encode(text)), n_items

  def prompt_bucket(self, req: GenerateRequest, st: state_lib.UserState) -> int:
    """The prompt-length bucket the request is decoded in (alone or with shorter ones)."""
    return _bucket(len(self.prompt_ids(req, st)[0]), self.config.prompt_buckets,
                   "prompt tokens")

  def user_llm_inputs(self, states: Sequence[state_lib.UserState], batch_size: int
                      ) -> dict[str, jax.Array]:
    """The Gemma keyword arguments of :meth:`UserLLM.llm_inputs` for ``states`` (rows past
    ``len(states)`` up to ``batch_size`` are cold), from the cached window outputs."""
    C = self.capacity
    h = np.zeros((batch_size, C, self.inc.cfg.embed_dim), np.float32)
    valid = np.zeros((batch_size, C), bool)
    for i, st in enumerate(states):
      if st.window_len:
        h[i, :st.window_len] = st.cache["h"]
        valid[i, :st.window_len] = True
    user, umask = self._user_tokens(self._bridge_state, jnp.asarray(h), jnp.asarray(valid))
    if self.mode == "xattn":
      return {"media_BxMxD": user, "media_mask_BxM": umask}
    return {"prefix_embeds_BxPxD": user, "prefix_mask_BxP": umask}

  def generate_batch(self, reqs: Sequence[GenerateRequest]) -> list[dict[str, Any]]:
    """Decodes one group of requests together (see the module doc)."""
    if not reqs:
      return []
    group = reqs[0].group
    if any(r.group != group for r in reqs):
      raise ValueError("generate_batch: requests of different groups")
    method, task, max_new, beams = group
    t0 = time.perf_counter()
    cfg = self.config
    states = [self.load_state(r.user_id) for r in reqs]
    prompts, info = map(list, zip(*[self.prompt_ids(r, st) for r, st in zip(reqs, states)]))
    n = len(reqs)
    B = _bucket(n, cfg.batch_sizes, "batch size")
    L = _bucket(max(len(p) for p in prompts), cfg.prompt_buckets, "prompt tokens")
    rows = prompts + [prompts[-1]] * (B - n)
    tokens, mask = sampler_lib.pad_prompts(rows, self.tokenizer.pad_id, length=L)
    kw = {}
    if method == "userllm":
      kw = self.user_llm_inputs(states, B)
      sampler = self.sampler
    else:
      sampler = self.tp_sampler
      if self._tp_has_xattn:
        N, D = self.num_user_tokens, self.llm_dim
        kw = {"media_BxMxD": jnp.zeros((B, N, D), self.model.gemma.dtype),
              "media_mask_BxM": jnp.zeros((B, N), bool)}
    proc = self._processors[task]
    t1 = time.perf_counter()
    if beams > 1:
      out = sampler.beam_search((tokens, mask), num_beams=beams, max_new_tokens=max_new,
                                logits_processor=proc, **kw)
      toks, scores, fin = out.tokens_BxKxN, out.scores_BxK, out.finished_BxK
    else:
      out = sampler.generate((tokens, mask), max_new_tokens=max_new, logits_processor=proc,
                             **kw)
      toks, scores, fin = (out.tokens_BxN[:, None], out.logprobs_BxN.sum(1)[:, None],
                           out.finished_B[:, None])
    t2 = time.perf_counter()
    results = []
    for i, (r, st) in enumerate(zip(reqs, states)):
      res = {"user_id": r.user_id, "task": task, "method": method,
             "cold_start": method == "userllm" and st.window_len == 0,
             "history_items_used": info[i], "state_version": st.version,
             "prompt_tokens": len(prompts[i]),
             "timing_ms": {"batch": (t2 - t0) * 1e3, "decode": (t2 - t1) * 1e3},
             "batch_size": n}
      res.update(self._decode(task, toks[i], scores[i], fin[i]))
      results.append(res)
    self.metrics.generated.labels(method, task).inc(n)
    self.metrics.cold.inc(sum(r["cold_start"] for r in results))
    self.metrics.batch_size.observe(n)
    return results

  def _decode(self, task, toks_KxN, scores_K, fin_K) -> dict[str, Any]:
    tok = self.tokenizer

    def text_of(row):
      row = [int(t) for t in row]
      if tok.eos_id in row:
        row = row[:row.index(tok.eos_id)]
      return tok.decode([t for t in row if t not in (tok.pad_id, tok.bos_id)])

    if task == "free_text":
      return {"text": text_of(toks_KxN[0]), "finished": bool(fin_K[0])}
    if task == "fav_genre":
      ids = self.genre_trie.items_for(list(toks_KxN[0])) if fin_K[0] else []
      g = ids[0] if ids else None
      return {"text": text_of(toks_KxN[0]) if g is not None else "", "genre_id": g,
              "genre": str(self.catalog.genre_names[g]) if g is not None else None}
    items = []
    for row, sc, f in zip(toks_KxN, scores_K, fin_K):
      if not f or not np.isfinite(sc) or sc < -1e29:
        continue
      for iid in self.item_trie.items_for(list(row)):
        items.append({"item_id": int(iid), "title": self.catalog.item_titles[iid],
                      "score": float(sc)})
    return {"text": items[0]["title"] if items else "", "items": items}


class _Metrics:
  """Prometheus metrics of the engine (in ``registry``; a private one when None)."""

  def __init__(self, registry=None):
    import prometheus_client as pc  # pylint: disable=g-import-not-at-top
    self.registry = registry if registry is not None else pc.CollectorRegistry()
    r = self.registry
    self.appended = pc.Counter("userllm_appended_events", "Interactions appended", registry=r)
    self.recomputed = pc.Counter("userllm_state_recomputed",
                                 "States recomputed (written with another encoder)", registry=r)
    self.generated = pc.Counter("userllm_generations", "Generations served",
                                ("method", "task"), registry=r)
    self.cold = pc.Counter("userllm_cold_start_generations",
                           "Generations for users without history", registry=r)
    self.batch_size = pc.Histogram("userllm_generate_batch_size", "Requests per decoded batch",
                                   buckets=(1, 2, 4, 8, 16, 32), registry=r)
    self.encode_seconds = pc.Histogram("userllm_encode_seconds", "Encoder time per append",
                                       ("kind",), registry=r)


class Batcher:
  """Collects generate requests for up to ``max_wait_ms`` (or ``max_batch`` requests) and
  decodes each group together on one worker thread."""

  def __init__(self, engine: Engine, *, max_batch: Optional[int] = None,
               max_wait_ms: Optional[float] = None):
    self.engine = engine
    self.max_batch = int(max_batch or max(engine.config.batch_sizes))
    self.max_wait_s = (engine.config.max_batch_wait_ms if max_wait_ms is None
                       else max_wait_ms) / 1e3
    self._q: queue.Queue = queue.Queue()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="userllm-batcher", daemon=True)
    self._thread.start()

  def submit(self, req: GenerateRequest) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    self._q.put((req, fut))
    return fut

  def close(self) -> None:
    self._stop.set()
    self._q.put(None)
    self._thread.join(timeout=10)

  def _run(self) -> None:
    while not self._stop.is_set():
      first = self._q.get()
      if first is None:
        break
      items = [first]
      deadline = time.monotonic() + self.max_wait_s
      while len(items) < self.max_batch:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          break
        try:
          nxt = self._q.get(timeout=remaining)
        except queue.Empty:
          break
        if nxt is None:
          self._stop.set()
          break
        items.append(nxt)
      groups: dict[tuple, list] = collections.defaultdict(list)
      for req, fut in items:
        groups[req.group].append((req, fut))
      for members in groups.values():
        for s in range(0, len(members), self.max_batch):
          chunk = members[s:s + self.max_batch]
          try:
            outs = self.engine.generate_batch([r for r, _ in chunk])
            for (_, fut), o in zip(chunk, outs):
              fut.set_result(o)
          except BaseException as e:  # pylint: disable=broad-except
            for _, fut in chunk:
              if not fut.done():
                fut.set_exception(e)
