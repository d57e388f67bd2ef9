"""Downstream tasks: windows, favourite-genre tie rule, TP serializer budgets, tokenization, Grain batches."""

import dataclasses

import numpy as np
import pytest

from userllm_jax.data import tasks

GENRES = ["<pad>", "<oov>", "Drama", "Comedy", "Action", "Horror"]
RATINGS = ["<pad>", "<oov>", "1.0", "2.0", "3.0", "4.0", "5.0", "4.5"]
TITLES = ["", "", "Heat (1995)", "Toy Story (1995)", "Fargo (1996)",
          "Shawshank Redemption, The (1994)", "Alien (1979)", "Casino (1995)"]
ITEM_GENRES = np.array([[0, 0], [0, 0], [4, 2], [3, 0], [2, 3], [2, 0], [5, 4], [2, 0]], np.int32)


def _catalog(domain="movielens"):
  return tasks.Catalog(item_titles=TITLES, item_genres=ITEM_GENRES, genre_names=GENRES,
                       rating_names=RATINGS, domain=domain)


def _record(items, ratings=None, reviews=None):
  items = np.asarray(items, np.int32)
  n = len(items)
  return {"item": items, "genre": ITEM_GENRES[items],
          "rating": np.asarray(ratings if ratings is not None else [5] * n, np.int32),
          "timestamp": np.arange(n, dtype=np.int64) * 3600 + 10**9,
          "review": reviews}


def test_history_window_protocol():
  rec = _record([2, 3, 4, 5, 6, 7])
  h = tasks.history_window(rec, cut=5, window=3)
  assert int(h["length_B"]) == 3
  np.testing.assert_array_equal(h["item_BxT"], [4, 5, 6])
  np.testing.assert_array_equal(h["genre_BxTxG"], ITEM_GENRES[[4, 5, 6]])
  np.testing.assert_array_equal(h["segment_BxT"], [1, 1, 1])
  np.testing.assert_array_equal(h["position_BxT"], [0, 1, 2])
  assert (h["timegap_BxT"] > 0).all()
  # Shorter history than the window: left-aligned, zero padded.
  h = tasks.history_window(rec, cut=2, window=4)
  np.testing.assert_array_equal(h["item_BxT"], [2, 3, 0, 0])
  np.testing.assert_array_equal(h["segment_BxT"], [1, 1, 0, 0])
  np.testing.assert_array_equal(h["rating_BxT"], [5, 5, 0, 0])
  with pytest.raises(ValueError, match="cut=0 outside"):
    tasks.history_window(rec, cut=0, window=4)


def test_favourite_genre_counts_and_recency_ties():
  # Drama(2) x2, Comedy(3) x2 -> tie; Comedy's last occurrence (row 3) is later -> Comedy.
  g = np.array([[2, 0], [3, 0], [2, 0], [3, 0]])
  assert tasks.favourite_genre(g) == 3
  # Swap the order of the last two rows -> Drama is the most recent -> Drama.
  assert tasks.favourite_genre(g[[0, 1, 3, 2]]) == 2
  # Tie whose last occurrences are the same row: the first-listed genre wins.
  assert tasks.favourite_genre(np.array([[4, 5], [5, 4]])) == 5
  assert tasks.favourite_genre(np.array([[4, 5], [4, 5]])) == 4
  # A strict majority beats recency.
  assert tasks.favourite_genre(np.array([[2, 0], [2, 0], [3, 0]])) == 2
  # A genre repeated within one event counts once; padding and OOV ignored.
  assert tasks.favourite_genre(np.array([[4, 4], [5, 1], [5, 0]])) == 5
  # Only the first `length` rows count.
  assert tasks.favourite_genre(np.array([[2, 0], [3, 0], [3, 0]]), length=1) == 2
  assert tasks.favourite_genre(np.zeros((3, 2), np.int32)) == 0


def test_examples_targets_and_prompts():
  cat = _catalog()
  rec = _record([2, 3, 4, 5, 6], reviews=["a", "b", "c", "d", "Great movie."])
  ex = tasks.make_example(rec, 7, cut=4, task="next_item", catalog=cat, window=50)
  assert ex.target == "Alien (1979)" and ex.target_id == 6
  assert ex.prompt == "Which movie will the user watch next?\n"
  assert "Heat" not in ex.prompt  # no history in the User-LLM prompt
  ex = tasks.make_example(rec, 7, cut=4, task="fav_genre", catalog=cat)
  # history items 2,3,4,5: genres Action,Drama | Comedy | Drama,Comedy | Drama -> Drama (3)
  assert ex.target == "Drama" and ex.target_id == 2
  assert ex.prompt == "What is the user's favorite genre?\n"
  ex = tasks.make_example(rec, 7, cut=4, task="review", catalog=_catalog("amazon"))
  assert ex.target == "Great movie." and ex.prompt == "Write the user's review of Alien (1979).\n"
  assert tasks.make_example(_record([2, 3]), 0, 1, "review", cat) is None
  with pytest.raises(ValueError, match="unknown task"):
    tasks.make_example(rec, 0, 1, "rating", cat)


def test_build_examples_train_and_test_splits():
  cat = _catalog()
  data = [_record([2, 3, 4, 5, 6, 7]), _record([2, 3]), _record([7])]
  test = tasks.build_examples(data, [0, 1, 2], "next_item", cat, split="test", window=3)
  assert [(e.user_index, e.cut) for e in test] == [(0, 5), (1, 1)]  # user 2 has no history
  assert test[0].target == "Casino (1995)"
  train = tasks.build_examples(data, [0], "next_item", cat, split="train", window=3, min_history=2,
                               stride=2, max_examples_per_user=10)
  assert [e.cut for e in train] == [5, 3]
  tr, te = tasks.split_users(10, 3, seed=0)
  assert len(te) == 3 and len(tr) == 7 and not set(tr) & set(te)
  assert np.array_equal(te, tasks.split_users(10, 3, seed=0)[1])
  with pytest.raises(ValueError, match="num_test"):
    tasks.split_users(3, 3, seed=0)


def _sentencepiece_tokenizer(tmp_path):
  """A real SentencePiece BPE model trained on the titles (stands in for Gemma's)."""
  import sentencepiece as spm
  corpus = tmp_path / "corpus.txt"
  lines = [tasks.format_history_line(tasks.HistoryItem(t, ("Drama", "Comedy"), str(r)))
           for t in TITLES[2:] for r in range(1, 6)]
  corpus.write_text("\n".join(lines * 5))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=120, model_type="bpe", pad_id=0, eos_id=1, bos_id=2,
                                 unk_id=3, byte_fallback=False, minloglevel=2)
  proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))

  class SP:
    pad_id, eos_id, bos_id = 0, 1, 2

    def encode(self, text, add_bos=False):
      ids = proc.encode(text)
      return [2] + ids if add_bos else ids

    def decode(self, ids):
      return proc.decode(list(ids))

  return SP()


@pytest.mark.parametrize("tok_kind", ["word", "sentencepiece"])
def test_serialize_history_budget(tmp_path, tok_kind):
  items = [tasks.HistoryItem(t, ("Drama",), "4") for t in TITLES[2:]]
  tok = (tasks.WordTokenizer([tasks.format_history_line(i) for i in items]) if tok_kind == "word"
         else _sentencepiece_tokenizer(tmp_path))
  lines = [tasks.format_history_line(i) for i in items]
  assert lines[3] == "Shawshank Redemption, The (1994) (Drama), rated 4"
  full = tasks.serialize_history(items, tok, 10_000)
  assert full.num_items == len(items) and full.text == "\n".join(lines)
  assert full.num_tokens == len(tok.encode(full.text))
  for budget in range(0, full.num_tokens + 1):
    s = tasks.serialize_history(items, tok, budget)
    assert s.num_tokens <= budget
    assert s.num_tokens == len(tok.encode(s.text))
    # whole lines, newest kept, oldest cut
    assert s.text == "\n".join(lines[len(lines) - s.num_items:]) if s.num_items else s.text == ""
    # maximal: one more (older) item would not fit
    if s.num_items < len(items):
      bigger = "\n".join(lines[len(lines) - s.num_items - 1:])
      assert len(tok.encode(bigger)) > budget
  with pytest.raises(ValueError, match="budget_tokens"):
    tasks.serialize_history(items, tok, -1)


def test_format_line_optional_parts():
  assert tasks.format_history_line(tasks.HistoryItem("X")) == "X"
  assert tasks.format_history_line(tasks.HistoryItem("X", rating="3")) == "X, rated 3"
  cat = _catalog()
  assert cat.rating_text(7) == "4.5" and cat.rating_text(6) == "5" and cat.rating_text(0) is None


def test_tp_prompt_and_tokenization():
  cat = _catalog()
  rec = _record([2, 3, 4, 5, 6], ratings=[2, 3, 4, 5, 7])
  ex = tasks.make_example(rec, 0, cut=4, task="next_item", catalog=cat)
  corpus = TITLES + GENRES + [tasks.TP_HEADER, ex.prompt, "rated 1 2 3 4 4.5 5 (, ) \n"]
  tok = tasks.WordTokenizer(corpus)
  prompt, ser = tasks.tp_prompt(ex, cat, tok, budget_tokens=10_000)
  assert prompt.startswith(tasks.TP_HEADER + "Heat (1995) (Action, Drama), rated 1\n")
  assert prompt.endswith("Shawshank Redemption, The (1994) (Drama), rated 4\n" + ex.prompt)
  assert ser.num_items == 4
  f = tasks.tokenize_example(ex, ex.prompt, tok, max_prompt_tokens=16, max_target_tokens=8)
  p = [tok.bos_id] + tok.encode(ex.prompt)
  t = tok.encode(ex.target) + [tok.eos_id]
  assert f["tokens_BxL"].shape == (24,)
  np.testing.assert_array_equal(f["tokens_BxL"][:len(p) + len(t)], p + t)
  assert (f["tokens_BxL"][len(p) + len(t):] == 0).all()
  # loss only where the next token is a target token or EOS
  np.testing.assert_array_equal(f["targets_BxL"][f["loss_mask_BxL"] == 1], t)
  assert f["loss_mask_BxL"].sum() == len(t)
  assert int(f["prompt_len_B"]) == len(p) and f["input_mask_BxL"].sum() == len(p) + len(t)
  np.testing.assert_array_equal(f["item_BxT"][:4], [2, 3, 4, 5])
  with pytest.raises(tasks.ExampleTooLongError, match=r"user 0 task next_item cut 4: target has 5"):
    tasks.tokenize_example(ex, ex.prompt, tok, max_prompt_tokens=16, max_target_tokens=4)
  with pytest.raises(tasks.ExampleTooLongError, match="prompt has .* max_prompt_tokens=3"):
    tasks.tokenize_example(ex, ex.prompt, tok, max_prompt_tokens=3, max_target_tokens=8)


def test_stage2_grain_batches_and_prompt_batch():
  cat = _catalog()
  data = [_record([2, 3, 4, 5, 6, 7]), _record([3, 4, 2, 5]), _record([6, 7, 2])]
  exs = tasks.build_examples(data, range(3), "fav_genre", cat, split="test", window=4)
  tok = tasks.WordTokenizer(TITLES + GENRES + [exs[0].prompt])
  ds = tasks.stage2_dataset(exs, [e.prompt for e in exs], tok, max_prompt_tokens=12,
                            max_target_tokens=4, batch_size=2, seed=0)
  it = iter(ds)
  b1, b2 = next(it), next(it)
  assert b1["tokens_BxL"].shape == (2, 16) and b1["item_BxT"].shape == (2, 4) and b1["genre_BxTxG"].shape == (2, 4, 2)
  assert b1["loss_mask_BxL"].sum() == 4  # one-token genre + EOS, two rows
  # Same seed -> same order; a different seed -> (eventually) a different order.
  again = iter(tasks.stage2_dataset(exs, [e.prompt for e in exs], tok, max_prompt_tokens=12,
                                    max_target_tokens=4, batch_size=2, seed=0))
  np.testing.assert_array_equal(next(again)["user_index_B"], b1["user_index_B"])
  pb = tasks.prompt_batch(exs, [e.prompt for e in exs], tok, max_prompt_tokens=12)
  assert pb["prompt_tokens_BxP"].shape == (3, 12) and pb["item_BxT"].shape == (3, 4)
  assert (pb["prompt_tokens_BxP"][:, 0] == tok.bos_id).all()


def test_stage2_batches_with_targets_cut_to_their_deciding_tokens():
  """answer_cut (stage2/loss.AnswerTries.cut): next-item targets cut where the title trie
  decides them, padded to the longest *cut* target, each kept token's trie node in
  answer_node_BxN; batch_fn runs on every batch; a target outside the trie names its
  example."""
  from userllm_jax.eval import trie as trie_lib
  from userllm_jax.stage2 import loss as loss_lib
  cat = _catalog()
  data = [_record([2, 3, 4, 5, 6, 7]), _record([3, 4, 2, 5]), _record([6, 7, 2])]
  exs = tasks.build_examples(data, range(3), "next_item", cat, split="test", window=4)
  tok = tasks.WordTokenizer(TITLES + GENRES + [exs[0].prompt])
  titles = [t for t in TITLES if t]
  trie = trie_lib.TitleTrie.from_titles(titles, tok)
  seqs = [tok.encode(t) + [tok.eos_id] for t in titles]
  at = loss_lib.AnswerTries({"next_item": trie},
                            loss_lib.answer_vocabulary(seqs, eos_id=tok.eos_id))
  calls = []

  def batch_fn(b):
    calls.append(1)
    return at.add_allowed(b)
  ds = tasks.stage2_dataset(exs, [e.prompt for e in exs], tok, max_prompt_tokens=12,
                            max_target_tokens=8, batch_size=3, seed=0, batch_by_task=True,
                            answer_cut=at.cut, batch_fn=batch_fn)
  b = next(iter(ds))
  kept = [at.cut("next_item", tok.encode(e.target) + [tok.eos_id])[0] for e in exs]
  n = max(len(k) for k in kept)
  assert n < max(len(tok.encode(e.target)) + 1 for e in exs)   # something was cut
  assert b["answer_node_BxN"].shape == (3, n) and calls
  assert b["answer_allowed_BxNxK"].shape == (3, n, at.num_tokens)
  for r in range(3):
    p = int(b["prompt_len_B"][r])
    k = kept[[e.user_index for e in exs].index(int(b["user_index_B"][r]))]
    np.testing.assert_array_equal(b["targets_BxL"][r][b["loss_mask_BxL"][r] == 1], k)
    assert b["answer_node_BxN"][r, 0] == 0 and (b["answer_node_BxN"][r, len(k):] == -1).all()
    assert b["tokens_BxL"][r, p + len(k):].max() == tok.pad_id     # no EOS after the cut
    # the first slot allows every title's first token
    assert b["answer_allowed_BxNxK"][r, 0].sum() == len({s[0] for s in seqs})
  bad = [dataclasses.replace(exs[0], target="Zebra (2001)")]
  with pytest.raises(ValueError, match=r"user 0 task next_item cut \d+: .*not an answer"):
    tasks.stage2_dataset(bad, [bad[0].prompt], tok, max_prompt_tokens=12, max_target_tokens=8,
                         batch_size=1, seed=0, batch_by_task=True, answer_cut=at.cut)

  # Soft targets (Example.teacher, stage2/distill.py) ride along as teacher_BxI and become
  # each slot's distribution over its allowed tokens; half the rows without one is an error.
  probs = np.full(len(titles), 1.0 / len(titles), np.float32)  # over the trie's ids
  taught = [dataclasses.replace(e, teacher=probs) for e in exs]
  tb = next(iter(tasks.stage2_dataset(taught, [e.prompt for e in exs], tok,
                                      max_prompt_tokens=12, max_target_tokens=8,
                                      batch_size=3, seed=0, batch_by_task=True,
                                      answer_cut=at.cut, batch_fn=at.add_allowed)))
  q = tb["answer_teacher_BxNxK"]
  assert q.shape == tb["answer_allowed_BxNxK"].shape and "teacher_BxI" not in tb
  np.testing.assert_allclose(q[:, 0].sum(-1), 1.0, rtol=1e-6)
  assert not (q > 0)[~tb["answer_allowed_BxNxK"]].any()
  with pytest.raises(ValueError, match="task 'next_item' mix examples with and without"):
    tasks.stage2_dataset(taught[:1] + exs[1:], [e.prompt for e in exs], tok,
                         max_prompt_tokens=12, max_target_tokens=8, batch_size=3, seed=0,
                         batch_by_task=True, answer_cut=at.cut)


def test_word_tokenizer_roundtrip():
  tok = tasks.WordTokenizer(TITLES)
  for t in TITLES[2:]:
    assert tok.decode(tok.encode(t)) == t
  assert tok.encode("Zebra")[0] == tok.unk_id
  assert tok.decode(tok.encode("Heat (1995)") + [tok.eos_id] + tok.encode("Fargo")) == "Heat (1995)"


def test_genre_on_every_item_is_not_a_favourite():
  # Amazon's category path starts with the store's root ("Movies & TV") on every product:
  # it would be every user's favourite, so the task skips it and answers the next one.
  cat = tasks.Catalog(item_titles=["", "", "A", "B", "C"],
                      item_genres=np.array([[0, 0], [0, 0], [2, 3], [2, 4], [2, 4]]),
                      genre_names=["<pad>", "<oov>", "Movies & TV", "Drama", "Comedy"],
                      rating_names=["<pad>", "<oov>"], domain="amazon")
  assert cat.uninformative_genres == frozenset({2})
  assert cat.favourite_genre_candidates == [3, 4]
  g = np.array([[2, 3], [2, 4], [2, 4]])
  assert tasks.favourite_genre(g) == 2
  assert tasks.favourite_genre(g, ignore=cat.uninformative_genres) == 4
  rec = {"item": np.array([2, 3, 4, 2]), "genre": np.array([[2, 3], [2, 4], [2, 4], [2, 3]]),
         "rating": np.zeros(4, np.int32), "timegap": np.zeros(4, np.int32)}
  ex = tasks.make_example(rec, 0, 3, "fav_genre", cat, window=4)
  assert ex.target == "Comedy" and ex.target_id == 4
  # MovieLens-like catalogue: no genre on every item -> nothing skipped.
  ml = tasks.Catalog(item_titles=["", "", "A", "B"], item_genres=np.array([[0], [0], [2], [3]]),
                     genre_names=["<pad>", "<oov>", "Drama", "Comedy"],
                     rating_names=["<pad>", "<oov>"])
  assert ml.uninformative_genres == frozenset()


def test_stage2_stream_row_blocks_over_processes_at_one_global_position(monkeypatch):
  """stage2/examples.training_stream: process i of N keeps block i of the rows of the global
  batch of the 1-process stream (without a mesh: block process_index), and its position means
  the same on any process count (shard layout 'replicated', train/checkpoint.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from userllm_jax.stage2 import examples as examples_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  cat = _catalog()
  data = [_record([2, 3, 4, 5, 6, 7]), _record([3, 4, 2, 5]), _record([6, 7, 2])]
  exs = tasks.build_examples(data, range(3), "fav_genre", cat, split="test", window=4)
  tok = tasks.WordTokenizer(TITLES + GENRES + [exs[0].prompt])
  cfg = ml_collections.ConfigDict(dict(seed=0, max_target_tokens=4, train=dict(),
                                       tasks=dict(names=("fav_genre",))))
  streams = {}
  for count, index in ((1, 0), (2, 0), (2, 1)):
    monkeypatch.setattr(jax, "process_count", lambda c=count: c)
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    streams[count, index] = examples_lib.training_stream(
        cfg, exs, [e.prompt for e in exs], tok, max_prompt_tokens=12, batch_size=2)
  assert ckpt_lib.shard_layout(streams[2, 1]) == ckpt_lib.REPLICATED
  for _ in range(4):
    one, p0, p1 = (next(streams[k]) for k in ((1, 0), (2, 0), (2, 1)))
    for key in one:
      np.testing.assert_array_equal(p0[key], one[key][:1], err_msg=key)
      np.testing.assert_array_equal(p1[key], one[key][1:], err_msg=key)
  assert streams[2, 0].get_state() == streams[2, 1].get_state() == streams[1, 0].get_state()
