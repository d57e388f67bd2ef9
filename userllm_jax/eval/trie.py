"""A prefix trie over the tokenized catalogue titles, for constrained decoding.

Every catalogue title is tokenized exactly as the stage-2 targets are
(``tokenizer.encode(title)`` without BOS, then EOS; see
``data/tasks.py:tokenize_example``) and inserted into a trie.  Decoding that
only ever picks a token the trie allows from the current prefix ends, at EOS,
on a real catalogue item, so every beam of a constrained beam search is an
item of the catalogue.

Two views of the same trie:

* Python: :meth:`TitleTrie.allowed` (allowed next tokens after a prefix),
  :meth:`TitleTrie.items_for` (the item ids whose title is a token sequence).
* Arrays for jitted decoding: :class:`TrieArrays` holds a CSR edge list plus a
  dense child table for the root (the one node with thousands of children), and which
  nodes are *forced* (a single path down to their leaf: every further token is the only one
  allowed).
  The decoding state of one sequence is a node id (``int32``); :func:`allowed_mask`
  gives the boolean mask of allowed tokens for a batch of states and
  :func:`advance` moves the states by the chosen tokens.  After EOS (a leaf),
  and in the DEAD state (-1, a token the trie does not allow was forced in),
  only EOS and PAD are allowed, so finished beams stay finished.

:func:`make_sampler_processor` wraps this as the logits processor of
``models/sampler.py`` (``fn(tokens_so_far_BxN, logits_BxV) -> allowed mask``);
:func:`make_logits_processor` is the same for a ``fn(logits, generated, step)``
convention.  Both re-derive each sequence's state from the tokens generated
so far, so beam reordering needs no carried state.

:class:`TrieConstraint` (``make_constraint`` / ``TitleTrie.to_constraint``) is the cheaper
path: passed as ``trie=`` to the sampler, it carries each row's node id through the loop and
restricts the logits to the trie's token set (``K`` embedding rows instead of ``V``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEAD = -1
NEG_INF = -1e30  # large finite negative: keeps log-softmax finite


class TitleTrie:
  """A prefix trie over token sequences (titles + EOS), with item ids at the leaves."""

  def __init__(self, sequences: Sequence[Sequence[int]], *, eos_id: int, pad_id: int = 0,
               item_ids: Optional[Sequence[int]] = None):
    if not sequences:
      raise ValueError("TitleTrie: no sequences (is the catalogue empty?)")
    if item_ids is not None and len(item_ids) != len(sequences):
      raise ValueError(f"TitleTrie: {len(item_ids)} item ids for {len(sequences)} sequences")
    self.eos_id = int(eos_id)
    self.pad_id = int(pad_id)
    # children[node] = {token: child}; node 0 is the root.
    self._children: list[dict[int, int]] = [{}]
    self._items: dict[int, list[int]] = {}  # leaf node -> item ids
    self._forced: Optional[np.ndarray] = None
    for i, seq in enumerate(sequences):
      seq = [int(t) for t in seq]
      if not seq or seq[-1] != self.eos_id:
        raise ValueError(f"TitleTrie: sequence {i} does not end with eos_id={self.eos_id}: {seq}")
      if self.eos_id in seq[:-1] or self.pad_id in seq:
        raise ValueError(f"TitleTrie: sequence {i} contains eos/pad before its end: {seq}")
      node = 0
      for tok in seq:
        nxt = self._children[node].get(tok)
        if nxt is None:
          nxt = len(self._children)
          self._children.append({})
          self._children[node][tok] = nxt
        node = nxt
      self._items.setdefault(node, []).append(int(item_ids[i]) if item_ids is not None else i)

  @classmethod
  def from_titles(cls, titles: Sequence[str], tokenizer, *, item_ids: Optional[Sequence[int]] = None,
                  skip_empty: bool = True) -> "TitleTrie":
    """Tokenizes ``titles`` with ``tokenizer.encode`` (no BOS) and appends ``tokenizer.eos_id``.

    ``item_ids[i]`` is the item id of ``titles[i]`` (default ``i``).  Empty
    titles (e.g. the PAD/OOV rows of an item vocabulary) are skipped when
    ``skip_empty``; otherwise they raise.
    """
    seqs, ids = [], []
    for i, title in enumerate(titles):
      if not title:
        if skip_empty:
          continue
        raise ValueError(f"TitleTrie.from_titles: title {i} is empty")
      seqs.append(list(tokenizer.encode(title)) + [tokenizer.eos_id])
      ids.append(item_ids[i] if item_ids is not None else i)
    return cls(seqs, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, item_ids=ids)

  @property
  def num_nodes(self) -> int:
    return len(self._children)

  def _walk(self, prefix: Iterable[int]) -> int:
    node = 0
    for tok in prefix:
      node = self._children[node].get(int(tok), DEAD) if node != DEAD else DEAD
      if node == DEAD:
        return DEAD
    return node

  def allowed(self, prefix: Sequence[int]) -> list[int]:
    """Sorted allowed next tokens after ``prefix`` (EOS/PAD only after EOS or off the trie)."""
    node = self._walk(prefix)
    if node == DEAD or not self._children[node]:
      return sorted({self.eos_id, self.pad_id})
    return sorted(self._children[node])

  def is_complete(self, seq: Sequence[int]) -> bool:
    """True if ``seq`` (ignoring trailing PAD/EOS after the first EOS) is a full title + EOS."""
    seq = list(seq)
    if self.eos_id not in seq:
      return False
    seq = seq[:seq.index(self.eos_id) + 1]
    node = self._walk(seq)
    return node != DEAD and node in self._items

  @property
  def forced_nodes(self) -> np.ndarray:
    """``bool [num_nodes]``: the node's subtree is a single path (a leaf is forced): from
    there on the trie allows exactly one token at each step, down to EOS."""
    if self._forced is None:
      forced = np.zeros(self.num_nodes, bool)
      for node in range(self.num_nodes - 1, -1, -1):   # children have larger ids than parents
        ch = self._children[node]
        forced[node] = not ch or (len(ch) == 1 and forced[next(iter(ch.values()))])
      self._forced = forced
    return self._forced

  def decisive_length(self, seq: Sequence[int]) -> int:
    """The number of leading tokens of ``seq`` (a complete sequence, EOS included) that
    decide it: after them the trie is at a forced node, so each later token is the only one
    allowed (a constrained log-probability of exactly 0).  Raises unless ``seq`` is one of
    the trie's complete sequences."""
    node, decided = 0, None
    forced = self.forced_nodes
    for k, tok in enumerate(seq):
      if decided is None and forced[node]:
        decided = k
      node = self._children[node].get(int(tok), DEAD)
      if node == DEAD:
        raise ValueError(f"TitleTrie.decisive_length: {list(seq)} leaves the trie at token {k}")
    if node not in self._items:
      raise ValueError(f"TitleTrie.decisive_length: {list(seq)} is not a complete sequence")
    return len(seq) if decided is None else decided

  def nodes_along(self, seq: Sequence[int]) -> list[int]:
    """The node before each token of ``seq`` (``nodes_along(s)[j]`` = the node after
    ``s[:j]``); raises if ``seq`` leaves the trie."""
    nodes, node = [], 0
    for k, tok in enumerate(seq):
      nodes.append(node)
      node = self._children[node].get(int(tok), DEAD)
      if node == DEAD:
        raise ValueError(f"TitleTrie.nodes_along: {list(seq)} leaves the trie at token {k}")
    return nodes

  def children_tokens(self, node: int) -> list[int]:
    """Sorted tokens of ``node``'s edges (what the trie allows there; [] at a leaf)."""
    return sorted(self._children[node])

  def item_paths(self) -> list[tuple[int, list[int], list[int]]]:
    """``(item_id, nodes, tokens)`` for every item: its sequence's tokens (EOS included) and
    the node before each (``nodes[j]`` = the node after ``tokens[:j]``), in node order."""
    out, stack = [], [(0, [], [])]
    while stack:
      node, nodes, toks = stack.pop()
      for item in self._items.get(node, []):
        out.append((item, nodes, toks))
      for tok, child in sorted(self._children[node].items(), reverse=True):
        stack.append((child, nodes + [node], toks + [tok]))
    return out

  def items_for(self, seq: Sequence[int]) -> list[int]:
    """Item ids whose title tokenizes to ``seq`` (up to its first EOS); [] if none."""
    seq = list(seq)
    if self.eos_id in seq:
      seq = seq[:seq.index(self.eos_id) + 1]
    else:
      seq = seq + [self.eos_id]
    node = self._walk(seq)
    return list(self._items.get(node, [])) if node != DEAD else []

  def to_constraint(self, vocab_size: int) -> "TrieConstraint":
    """The restricted-vocabulary constraint for ``Sampler(...)(trie=...)``
    (see :class:`TrieConstraint`)."""
    return make_constraint(self.to_arrays(vocab_size))

  def to_arrays(self, vocab_size: int) -> "TrieArrays":
    """The array form for jitted decoding (see :class:`TrieArrays`)."""
    n = self.num_nodes
    edge_start = np.zeros(n, np.int32)
    edge_count = np.zeros(n, np.int32)
    tokens, children = [], []
    for node, ch in enumerate(self._children):
      edge_start[node] = len(tokens)
      edge_count[node] = len(ch)
      for tok in sorted(ch):
        if not 0 <= tok < vocab_size:
          raise ValueError(f"TitleTrie.to_arrays: token {tok} outside vocab_size={vocab_size}")
        tokens.append(tok)
        children.append(ch[tok])
    root_child = np.full(vocab_size, DEAD, np.int32)
    forced = self.forced_nodes
    for tok, child in self._children[0].items():
      root_child[tok] = child
    max_branch = max([len(ch) for ch in self._children[1:]] + [1])
    if not tokens:
      tokens, children = [0], [DEAD]
    return TrieArrays(
        edge_start=jnp.asarray(edge_start), edge_count=jnp.asarray(edge_count),
        edge_token=jnp.asarray(np.asarray(tokens, np.int32)),
        edge_child=jnp.asarray(np.asarray(children, np.int32)),
        root_child=jnp.asarray(root_child), forced=jnp.asarray(forced),
        max_branch=int(max_branch), vocab_size=int(vocab_size), eos_id=self.eos_id,
        pad_id=self.pad_id)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrieArrays:
  """CSR trie: node ``s`` has edges ``edge_start[s] : edge_start[s] + edge_count[s]``.

  ``root_child[V]`` is the root's dense child table (-1 where no edge);
  ``max_branch`` bounds the edge count of every non-root node; ``forced[s]``: the subtree of
  ``s`` is a single path (:attr:`TitleTrie.forced_nodes`).
  """
  edge_start: jax.Array   # [N] int32
  edge_count: jax.Array   # [N] int32
  edge_token: jax.Array   # [E] int32
  edge_child: jax.Array   # [E] int32
  root_child: jax.Array   # [V] int32
  forced: jax.Array       # [N] bool
  max_branch: int = dataclasses.field(metadata=dict(static=True))
  vocab_size: int = dataclasses.field(metadata=dict(static=True))
  eos_id: int = dataclasses.field(metadata=dict(static=True))
  pad_id: int = dataclasses.field(metadata=dict(static=True))


def _window(trie: TrieArrays, state_B: jax.Array):
  """The (token, child, valid) edges of each state, padded to max_branch: [B, M] each."""
  safe_B = jnp.maximum(state_B, 0)
  offs_M = jnp.arange(trie.max_branch, dtype=jnp.int32)
  idx_BxM = trie.edge_start[safe_B][:, None] + offs_M[None, :]
  valid_BxM = (offs_M[None, :] < trie.edge_count[safe_B][:, None]) & (state_B[:, None] > 0)
  idx_BxM = jnp.clip(idx_BxM, 0, trie.edge_token.shape[0] - 1)
  return trie.edge_token[idx_BxM], trie.edge_child[idx_BxM], valid_BxM


def allowed_mask(trie: TrieArrays, state_B: jax.Array) -> jax.Array:
  """Boolean ``[B, V]`` mask of the tokens allowed from each state."""
  state_B = jnp.asarray(state_B, jnp.int32)
  b = state_B.shape[0]
  tok_BxM, _, valid_BxM = _window(trie, state_B)
  rows_BxM = jnp.broadcast_to(jnp.arange(b)[:, None], tok_BxM.shape)
  cols_BxM = jnp.where(valid_BxM, tok_BxM, trie.vocab_size)  # out of range -> dropped
  mask_BxV = jnp.zeros((b, trie.vocab_size), bool).at[rows_BxM, cols_BxM].set(True, mode="drop")
  root_V = trie.root_child >= 0
  mask_BxV = jnp.where((state_B == 0)[:, None], root_V[None, :], mask_BxV)
  # Leaves (after EOS) and DEAD: only EOS / PAD.
  has_edges_B = jnp.where(state_B >= 0, trie.edge_count[jnp.maximum(state_B, 0)], 0) > 0
  end_V = jnp.zeros((trie.vocab_size,), bool).at[trie.eos_id].set(True).at[trie.pad_id].set(True)
  return jnp.where(has_edges_B[:, None], mask_BxV, end_V[None, :])


def advance(trie: TrieArrays, state_B: jax.Array, token_B: jax.Array) -> jax.Array:
  """Next states after emitting ``token_B``; a token with no edge leads to DEAD (-1).

  From a leaf or DEAD, EOS/PAD keep the state (finished beams stay finished).
  """
  state_B = jnp.asarray(state_B, jnp.int32)
  token_B = jnp.asarray(token_B, jnp.int32)
  tok_BxM, child_BxM, valid_BxM = _window(trie, state_B)
  hit_BxM = valid_BxM & (tok_BxM == token_B[:, None])
  inner_B = jnp.where(jnp.any(hit_BxM, axis=1), jnp.sum(jnp.where(hit_BxM, child_BxM, 0), axis=1),
                      DEAD)
  root_B = trie.root_child[jnp.clip(token_B, 0, trie.vocab_size - 1)]
  nxt_B = jnp.where(state_B == 0, root_B, inner_B)
  has_edges_B = jnp.where(state_B >= 0, trie.edge_count[jnp.maximum(state_B, 0)], 0) > 0
  is_end_tok_B = (token_B == trie.eos_id) | (token_B == trie.pad_id)
  stay_B = (~has_edges_B) & is_end_tok_B
  return jnp.where(stay_B, state_B, jnp.where(has_edges_B, nxt_B, DEAD))


def complete_forced(trie: TrieArrays, state_B: jax.Array, tokens_BxN: jax.Array,
                    start_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes the rest of each forced state's single path (down to and including EOS) into
  ``tokens_BxN`` from position ``start_B`` on; ``(tokens_BxN, added_B)``.

  Rows whose state is not forced (or DEAD) are left as they are (``added_B = 0``); tokens
  past ``N`` are dropped (``added_B`` still counts them).  The tokens are ``trie``'s ids
  (the real ids for ``TrieConstraint.full``).
  """
  state_B = jnp.asarray(state_B, jnp.int32)
  b, n = tokens_BxN.shape
  rows_B = jnp.arange(b)
  go_B = (state_B >= 0) & trie.forced[jnp.maximum(state_B, 0)]

  def body(_, c):
    st_B, toks, added_B = c
    safe_B = jnp.maximum(st_B, 0)
    step_B = go_B & (st_B >= 0) & (trie.edge_count[safe_B] > 0)
    e_B = jnp.clip(trie.edge_start[safe_B], 0, trie.edge_token.shape[0] - 1)
    pos_B = jnp.where(step_B, start_B + added_B, n)          # n: out of range -> dropped
    toks = toks.at[rows_B, pos_B].set(trie.edge_token[e_B], mode="drop")
    st_B = jnp.where(step_B, trie.edge_child[e_B], st_B)
    return st_B, toks, added_B + step_B.astype(jnp.int32)

  _, tokens_BxN, added_B = jax.lax.fori_loop(
      0, n, body, (state_B, tokens_BxN, jnp.zeros((b,), jnp.int32)))
  return tokens_BxN, added_B


def state_after(trie: TrieArrays, generated_BxS: jax.Array, num_generated) -> jax.Array:
  """States after the first ``num_generated`` tokens of ``generated_BxS`` (a jittable loop).

  ``num_generated`` is a scalar or one count per row (``[B]``).
  """
  generated_BxS = jnp.asarray(generated_BxS, jnp.int32)
  b, s = generated_BxS.shape

  def body(i, st_B):
    nxt_B = advance(trie, st_B, generated_BxS[:, i])
    return jnp.where(i < num_generated, nxt_B, st_B)

  return jax.lax.fori_loop(0, s, body, jnp.zeros((b,), jnp.int32))


def mask_logits(trie: TrieArrays, logits_BxV: jax.Array, state_B: jax.Array) -> jax.Array:
  """Sets the logits of tokens the trie does not allow to a large negative value."""
  v = logits_BxV.shape[-1]
  mask_BxV = allowed_mask(trie, state_B)
  if v != trie.vocab_size:
    if v < trie.vocab_size:
      raise ValueError(f"mask_logits: logits have {v} entries, trie was built for {trie.vocab_size}")
    mask_BxV = jnp.pad(mask_BxV, ((0, 0), (0, v - trie.vocab_size)))
  return jnp.where(mask_BxV, logits_BxV, jnp.asarray(NEG_INF, logits_BxV.dtype))


def make_sampler_processor(trie: TrieArrays) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The ``models/sampler.py`` hook: ``fn(tokens_so_far_BxN, logits_BxV) -> allowed_BxV``.

  ``tokens_so_far_BxN`` holds each row's generated tokens, ``-1`` where none
  yet; the trie state is re-derived from them, so beam reordering needs no
  carried state.  Returns the boolean mask of allowed tokens (the sampler
  sets the others to -inf).  Build it once per trie and reuse it: the
  sampler's jit cache is keyed on the function object.
  """
  def processor(tokens_so_far_BxN, logits_BxV):
    tokens_so_far_BxN = jnp.asarray(tokens_so_far_BxN, jnp.int32)
    n_B = jnp.sum(tokens_so_far_BxN >= 0, axis=1)
    state_B = state_after(trie, jnp.maximum(tokens_so_far_BxN, 0), n_B)
    mask_BxV = allowed_mask(trie, state_B)
    v = logits_BxV.shape[-1]
    if v != trie.vocab_size:
      if v < trie.vocab_size:
        raise ValueError(f"trie processor: logits have {v} entries, trie was built for "
                         f"{trie.vocab_size}")
      mask_BxV = jnp.pad(mask_BxV, ((0, 0), (0, v - trie.vocab_size)))
    return mask_BxV
  return processor


def make_logits_processor(trie: TrieArrays) -> Callable[..., jax.Array]:
  """A logits processor ``fn(logits_BxV, generated_BxS, step) -> logits_BxV``.

  ``generated_BxS`` holds the tokens generated so far (position ``i < step``
  valid; the rest ignored); the state is re-derived from them on each call, so
  the processor needs no carried state and works for any beam reordering.
  """
  def processor(logits_BxV, generated_BxS, step):
    state_B = state_after(trie, generated_BxS, step)
    return mask_logits(trie, logits_BxV, state_B)
  return processor


# ---------------------------------------------------------------------------------------------
# Restricted-vocabulary constraint for models/sampler.py (``trie=`` argument).


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrieConstraint:
  """A trie for ``Sampler.generate(trie=...)`` / ``Sampler.beam_search(trie=...)``.

  Two views of the same trie:

  * ``full``: :class:`TrieArrays` over the real vocabulary (the full-vocabulary reference:
    logits over all ``V`` tokens, then the mask);
  * ``local``: the same trie over a *restricted* vocabulary of ``K`` tokens:
    ``vocab_ids[k]`` (sorted ascending) is the real id of local token ``k``; ``vocab_ids``
    is the union of every token any node allows plus EOS and PAD (what leaves and the DEAD
    state allow).  The sampler computes logits only against these ``K`` embedding rows
    (``Gemma3(..., logits_vocab_ids=vocab_ids)``), masks with ``local`` and maps the chosen
    local index back through ``vocab_ids``.

  Both views allow exactly the same real tokens from every state, so constrained scores
  (mask, then log-softmax over the allowed tokens) are the same quantity in both.  The
  decoding state of a sequence is its node id, carried through the loop (``init_state``,
  ``advance``); node ids are identical in both views.  A pytree: pass it into ``jax.jit`` as
  an argument (its shapes, not its values, key the compilation cache).
  """
  vocab_ids: jax.Array    # [K] int32, sorted real token ids
  full: TrieArrays        # real ids, vocab_size V
  local: TrieArrays       # local ids, vocab_size K

  @property
  def num_tokens(self) -> int:
    return int(self.vocab_ids.shape[0])

  def init_state(self, n: int) -> jax.Array:
    return jnp.zeros((n,), jnp.int32)

  def allowed(self, state_B: jax.Array, restricted: bool) -> jax.Array:
    """Boolean ``[B, K]`` (restricted) or ``[B, V]`` mask of the allowed next tokens."""
    return allowed_mask(self.local if restricted else self.full, state_B)

  def advance(self, state_B: jax.Array, token_B: jax.Array, restricted: bool) -> jax.Array:
    """States after ``token_B`` (local ids if ``restricted``, else real ids)."""
    return advance(self.local if restricted else self.full, state_B, token_B)

  def forced(self, state_B: jax.Array) -> jax.Array:
    """Boolean ``[B]``: the state is forced (a single path to its leaf; not DEAD)."""
    state_B = jnp.asarray(state_B, jnp.int32)
    return (state_B >= 0) & self.full.forced[jnp.maximum(state_B, 0)]

  def complete(self, state_B, tokens_BxN, start_B):
    """:func:`complete_forced` with real token ids (node ids are the same in both views)."""
    return complete_forced(self.full, state_B, tokens_BxN, start_B)


def make_constraint(trie: "TitleTrie | TrieArrays", vocab_size: Optional[int] = None
                    ) -> TrieConstraint:
  """The :class:`TrieConstraint` of a :class:`TitleTrie` (needs ``vocab_size``) or of its
  :class:`TrieArrays` (``TitleTrie.to_arrays(V)``).  Built on the host with numpy, once per
  trie; reuse it across calls."""
  if isinstance(trie, TitleTrie):
    if vocab_size is None:
      raise ValueError("make_constraint: vocab_size is required for a TitleTrie")
    arr = trie.to_arrays(vocab_size)
  elif isinstance(trie, TrieArrays):
    arr = trie
    if vocab_size is not None and vocab_size != arr.vocab_size:
      raise ValueError(f"make_constraint: vocab_size={vocab_size} but the arrays were built "
                       f"for {arr.vocab_size}")
  else:
    raise ValueError(f"make_constraint: trie must be a TitleTrie or TrieArrays, got "
                     f"{type(trie).__name__}")
  edge_token = np.asarray(arr.edge_token, np.int64)
  edge_child = np.asarray(arr.edge_child, np.int64)
  edge_count = np.asarray(arr.edge_count)
  real_edges = edge_token[edge_child >= 0] if int(edge_count.sum()) else edge_token[:0]
  vocab = np.unique(np.concatenate([real_edges, [arr.eos_id, arr.pad_id]])).astype(np.int32)
  to_local = lambda t: np.searchsorted(vocab, t).astype(np.int32)
  root_tok = np.nonzero(np.asarray(arr.root_child) >= 0)[0]
  root_local = np.full(len(vocab), DEAD, np.int32)
  root_local[to_local(root_tok)] = np.asarray(arr.root_child)[root_tok]
  local = TrieArrays(
      edge_start=arr.edge_start, edge_count=arr.edge_count,
      edge_token=jnp.asarray(to_local(edge_token)), edge_child=arr.edge_child,
      root_child=jnp.asarray(root_local), forced=arr.forced, max_branch=arr.max_branch,
      vocab_size=len(vocab),
      eos_id=int(to_local(arr.eos_id)), pad_id=int(to_local(arr.pad_id)))
  return TrieConstraint(vocab_ids=jnp.asarray(vocab), full=arr, local=local)

