"""The title trie: allowed tokens, array form vs Python form, constrained beams are catalogue titles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from userllm_jax.eval import trie as trie_lib

TITLES = ["Heat (1995)", "Heathers (1988)", "Hea", "Toy Story (1995)", "Toy Story 2 (1999)",
          "Fargo (1996)", "Heat (1995)"]  # a duplicate title (two item ids)


class CharTokenizer:
  """Character-level stand-in: id = 3 + byte (pad 0, eos 1, bos 2)."""
  pad_id, eos_id, bos_id = 0, 1, 2
  vocab_size = 3 + 256

  def encode(self, text, add_bos=False):
    ids = [3 + b for b in text.encode("utf-8")]
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def built():
  tok = CharTokenizer()
  t = trie_lib.TitleTrie.from_titles(TITLES, tok, item_ids=list(range(10, 10 + len(TITLES))))
  return tok, t, t.to_arrays(tok.vocab_size)


def test_python_allowed(built):
  tok, t, _ = built
  assert t.allowed([]) == sorted({tok.encode(x)[0] for x in TITLES})
  # After "Hea": end of the title "Hea" (eos) or continue with "t".
  assert t.allowed(tok.encode("Hea")) == sorted([tok.eos_id, tok.encode("t")[0]])
  assert t.allowed(tok.encode("Heat")) == [tok.encode(" ")[0], tok.encode("h")[0]]
  assert t.allowed(tok.encode("Heat (1995)")) == [tok.eos_id]
  # After EOS, and off the trie: only eos / pad.
  assert t.allowed(tok.encode("Fargo (1996)") + [tok.eos_id]) == [tok.pad_id, tok.eos_id]
  assert t.allowed(tok.encode("Zzz")) == [tok.pad_id, tok.eos_id]
  assert t.items_for(tok.encode("Heat (1995)")) == [10, 16]
  assert t.items_for(tok.encode("Hea") + [tok.eos_id, 0, 0]) == [12]
  assert t.items_for(tok.encode("Heat (199")) == []
  assert t.is_complete(tok.encode("Fargo (1996)") + [tok.eos_id, tok.pad_id])
  assert not t.is_complete(tok.encode("Fargo"))


def test_bad_sequences():
  with pytest.raises(ValueError, match="does not end with eos_id=1"):
    trie_lib.TitleTrie([[5, 6]], eos_id=1)
  with pytest.raises(ValueError, match="no sequences"):
    trie_lib.TitleTrie([], eos_id=1)
  with pytest.raises(ValueError, match="outside vocab_size"):
    trie_lib.TitleTrie([[500, 1]], eos_id=1).to_arrays(100)


def test_arrays_match_python(built):
  tok, t, arr = built
  prefixes = [[], tok.encode("Hea"), tok.encode("Heat"), tok.encode("Toy Story"),
              tok.encode("Heat (1995)") + [tok.eos_id], tok.encode("Zzz"), tok.encode("F")]
  s = max(len(p) for p in prefixes)
  gen = np.zeros((len(prefixes), s), np.int32)
  lens = []
  for i, p in enumerate(prefixes):
    gen[i, :len(p)] = p
    lens.append(len(p))
  # state_after with a per-row length: walk each row separately.
  for i, p in enumerate(prefixes):
    st = trie_lib.state_after(arr, jnp.asarray(gen[i:i + 1]), lens[i])
    mask = np.asarray(trie_lib.allowed_mask(arr, st))[0]
    assert sorted(np.nonzero(mask)[0].tolist()) == t.allowed(p), p


def _beam_search(logits_fn, processor, beams, max_len, eos_id, pad_id):
  """A plain reference beam search (batch 1) applying `processor` at every step."""
  seqs = np.zeros((1, max_len), np.int32)
  scores = np.zeros((1,), np.float64)
  done = np.zeros((1,), bool)
  for step in range(max_len):
    logits = np.asarray(logits_fn(seqs, step))
    logits = np.asarray(processor(jnp.asarray(logits), jnp.asarray(seqs), step), np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    cand = []
    for b in range(seqs.shape[0]):
      if done[b]:
        cand.append((scores[b], b, pad_id))
        continue
      for tok in np.argsort(-logp[b])[:beams]:
        if logp[b, tok] < -1e20:
          continue
        cand.append((scores[b] + logp[b, tok], b, int(tok)))
    cand.sort(key=lambda c: -c[0])
    cand = cand[:beams]
    new = np.zeros((len(cand), max_len), np.int32)
    for i, (sc, b, tok) in enumerate(cand):
      new[i] = seqs[b]
      new[i, step] = tok
    seqs = new
    scores = np.array([c[0] for c in cand])
    done = np.array([done[c[1]] or c[2] == eos_id for c in cand])
    if done.all():
      break
  return seqs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constrained_beams_are_catalogue_titles(built, seed):
  tok, t, arr = built
  processor = jax.jit(trie_lib.make_logits_processor(arr))
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(64, tok.vocab_size)) * 3.0

  def logits_fn(seqs, step):  # random logits that depend on the prefix
    h = (seqs[:, :step].sum(axis=1) * 7 + step) % 64
    return table[h]

  seqs = _beam_search(logits_fn, processor, beams=4, max_len=24, eos_id=tok.eos_id, pad_id=tok.pad_id)
  assert seqs.shape[0] == 4
  titles = set(TITLES)
  for row in seqs:
    row = row.tolist()
    assert t.is_complete(row), row
    text = tok.decode(row[:row.index(tok.eos_id)])
    assert text in titles, text


def test_unconstrained_would_leave_catalogue(built):
  """Control: the same search without the processor does not produce titles."""
  tok, t, _ = built
  rng = np.random.default_rng(0)
  table = rng.normal(size=(64, tok.vocab_size)) * 3.0
  seqs = _beam_search(lambda s, i: table[(s[:, :i].sum(axis=1) * 7 + i) % 64],
                      lambda l, g, s: l, beams=4, max_len=24, eos_id=tok.eos_id, pad_id=tok.pad_id)
  assert not any(t.is_complete(r.tolist()) for r in seqs)


def test_mask_logits_pads_larger_vocab(built):
  tok, _, arr = built
  logits = jnp.zeros((1, tok.vocab_size + 5))
  out = trie_lib.mask_logits(arr, logits, jnp.zeros((1,), jnp.int32))
  assert out.shape == logits.shape
  assert bool(jnp.all(out[0, tok.vocab_size:] < -1e20))


def _tiny_gemma(vocab_size, seed=0):
  from flax import nnx
  from userllm_jax.models import gemma
  cfg = gemma.tiny(vocab_size=vocab_size, num_layers=2)
  return gemma.Gemma3(cfg, rngs=nnx.Rngs(seed))


def test_sampler_beam_search_with_trie_gives_catalogue_titles(built, seed=0):
  """models/sampler.py beam search + the trie processor: every beam is a catalogue title."""
  from userllm_jax.models import sampler as sampler_lib
  tok, t, arr = built
  model = _tiny_gemma(tok.vocab_size, seed)
  proc = trie_lib.make_sampler_processor(arr)
  prompts = [tok.encode("Recommend:", add_bos=True), tok.encode("Next?", add_bos=True)]
  s = sampler_lib.Sampler(model, eos_id=tok.eos_id, pad_id=tok.pad_id)
  out = s.beam_search(prompts, num_beams=4, max_new_tokens=24, logits_processor=proc)
  titles = set(TITLES)
  n_titles = 0
  for b in range(2):
    seen = set()
    for k in range(4):
      if out.scores_BxK[b, k] < -1e29:
        continue  # filler (fewer distinct titles than beams)
      row = out.tokens_BxKxN[b, k].tolist()
      assert out.finished_BxK[b, k], row
      assert t.is_complete(row), row
      text = tok.decode(row[:row.index(tok.eos_id)])
      assert text in titles
      seen.add(text)
      n_titles += 1
    assert len(seen) >= 2
  # Control: without the processor the random model does not produce titles.
  free = s.beam_search(prompts, num_beams=4, max_new_tokens=24)
  assert not any(t.is_complete(r.tolist()) for r in free.tokens_BxKxN.reshape(-1, 24))
  # Greedy generation with the same processor.
  g = s.generate(prompts, max_new_tokens=24, logits_processor=proc)
  for row in g.tokens_BxN:
    assert t.is_complete(row.tolist())


def test_forced_nodes_and_decisive_lengths(built):
  """Hand-computed: the tokens after which each title is the only one left."""
  tok, t, arr = built
  enc = lambda s: tok.encode(s) + [tok.eos_id]
  # 'F' is the only title starting with F; "Toy Story " branches into '(' and '2';
  # "Hea" ends there or goes on ('t'): only its EOS decides it; "Heat" branches (' ', 'h').
  want = {"Fargo (1996)": 1, "Toy Story (1995)": len("Toy Story ("),
          "Toy Story 2 (1999)": len("Toy Story 2"), "Hea": 4, "Heat (1995)": 5,
          "Heathers (1988)": 5}
  for title, k in want.items():
    assert t.decisive_length(enc(title)) == k, title
    nodes = t.nodes_along(enc(title)[:k])
    assert nodes[0] == 0 and len(nodes) == k
    # every later prefix allows exactly one token; the decisive prefix's node is forced
    for j in range(k, len(enc(title))):
      assert t.allowed(enc(title)[:j]) == [enc(title)[j]]
    assert not t.forced_nodes[nodes[-1]]
  with pytest.raises(ValueError, match="leaves the trie"):
    t.decisive_length(enc("Zzz"))
  with pytest.raises(ValueError, match="not a complete"):
    t.decisive_length(tok.encode("Toy Story"))
  # the array form completes a forced state's path, EOS included, from a given position
  st = trie_lib.state_after(arr, jnp.asarray([tok.encode("Heat "), tok.encode("Heat ")]), 5)
  st = jnp.concatenate([st, jnp.zeros((1,), jnp.int32)])     # the root: not forced
  toks = jnp.full((3, 12), -1, jnp.int32)
  out, added = trie_lib.complete_forced(arr, st, toks, jnp.asarray([0, 3, 0]))
  rest = enc("(1995)")
  assert np.asarray(added).tolist() == [len(rest), len(rest), 0]
  np.testing.assert_array_equal(np.asarray(out)[0, :len(rest)], rest)
  np.testing.assert_array_equal(np.asarray(out)[1, 3:3 + len(rest)], rest)
  assert (np.asarray(out)[2] == -1).all()


def test_item_paths_walk_every_title_with_its_nodes(built):
  """Every item (duplicates included) with its tokens and the node before each."""
  tok, t, _ = built
  paths = t.item_paths()
  assert sorted(i for i, _, _ in paths) == list(range(10, 10 + len(TITLES)))
  for item, nodes, toks in paths:
    title = TITLES[item - 10]
    assert toks == tok.encode(title) + [tok.eos_id]
    assert nodes == t.nodes_along(toks)
    assert item in t.items_for(toks)
