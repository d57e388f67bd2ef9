"""Tests for data/pipeline.py: batch contents, no leakage, epochs, sharding,
packing, exact resume (also through Orbax) and evaluation batches."""

import numpy as np
import pytest

from userllm_jax.data import pipeline
from userllm_jax.data import records
from userllm_jax.data.schema import DataError, Interaction

MAX_LEN = 6
# User u has LENGTHS[u] interactions with items "u{u}_{k}" (unique to the
# user), so every item id tells which user and which position it came from.
LENGTHS = [3, 4, 5, 9, 12, 20, 2, 7, 30, 8, 6, 10, 15, 11, 4, 13, 16, 5]


def build(tmp_path, lengths=LENGTHS, name="ds"):
  rows = []
  for u, n in enumerate(lengths):
    for k in range(n):
      rows.append(Interaction(f"u{u}", f"u{u}_{k}", 1000 + 60 * k * (u + 1),
                              float(1 + (u + k) % 5), f"t{u}_{k}",
                              (f"g{k % 3}", f"g{(k + u) % 4}")[:1 + k % 2]))
  return records.build_and_write(rows, tmp_path / name, name="unit")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  return build(tmp_path_factory.mktemp("pipe"))


def decode(ds, item_id):
  """(user index, position) of an item id (0 -> None)."""
  if item_id == 0:
    return None
  u, k = ds.vocabs["item"].tokens[item_id][1:].split("_")
  return int(u), int(k)


def small_reads():
  import grain  # pylint: disable=g-import-not-at-top
  return grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def rows_of(batch):
  """Per row and segment: (user, positions of inputs, positions of targets)."""
  out = []
  for r in range(batch["item_BxT"].shape[0]):
    seg = batch["segment_BxT"][r]
    for s in sorted(set(seg.tolist()) - {0}):
      m = seg == s
      ins = [decode(DS[0], i) for i in batch["item_BxT"][r][m]]
      tgs = [decode(DS[0], i) for i in batch["target_item_BxT"][r][m]]
      out.append((r, s, ins, tgs, batch["position_BxT"][r][m]))
  return out


DS = []


@pytest.fixture(autouse=True)
def _remember(ds):
  DS[:] = [ds]


@pytest.mark.parametrize("packing", [False, True])
def test_batch_fields_and_windows(ds, packing):
  it = pipeline.make_train_iterator(ds, max_len=MAX_LEN, batch_size=4, seed=0,
                                    packing=packing)
  g = ds.max_genres
  for b in take(it, 6):
    assert set(b) == {"item_BxT", "genre_BxTxG", "rating_BxT", "timegap_BxT",
                      "position_BxT", "segment_BxT", "target_item_BxT",
                      "target_genre_BxTxG", "target_rating_BxT"}
    for k, v in b.items():
      assert v.dtype == np.int32, k
      assert v.shape == ((4, MAX_LEN, g) if "genre" in k else (4, MAX_LEN)), k
    pad = b["segment_BxT"] == 0
    for k in ("item_BxT", "rating_BxT", "timegap_BxT", "target_item_BxT",
              "target_rating_BxT", "position_BxT"):
      assert (b[k][pad] == 0).all(), k
    assert (b["item_BxT"][~pad] >= 2).all()
    # Genres are the item table's; targets' genres the targets'.
    np.testing.assert_array_equal(b["genre_BxTxG"], ds.item_genres[b["item_BxT"]])
    np.testing.assert_array_equal(b["target_genre_BxTxG"],
                                  ds.item_genres[b["target_item_BxT"]])
    for _, _, ins, tgs, pos in rows_of(b):
      users = {x[0] for x in ins + tgs}
      assert len(users) == 1  # one user per segment
      u = users.pop()
      ks = [x[1] for x in ins]
      # A contiguous window; targets are the next items.
      assert ks == list(range(ks[0], ks[0] + len(ks)))
      assert [x[1] for x in tgs] == [k + 1 for k in ks]
      np.testing.assert_array_equal(pos, np.arange(len(ks)))
      # Never the held-out valid (T-2) or test (T-1) item.
      assert max(x[1] for x in tgs) <= LENGTHS[u] - 3
      assert len(ks) == min(MAX_LEN, LENGTHS[u] - 3)
    if not packing:
      assert (b["segment_BxT"] <= 1).all()
      # Padded at the end.
      for r in range(4):
        n = int((~pad[r]).sum())
        assert (~pad[r][:n]).all()


def test_epochs_cover_each_training_user_once_and_reshuffle(ds):
  eligible = [u for u, n in enumerate(LENGTHS) if n >= 4]
  n = len(eligible)  # 16
  it = pipeline.make_train_iterator(ds, max_len=MAX_LEN, batch_size=4, seed=1,
                                    num_epochs=2)
  batches = list(it)
  assert len(batches) == 2 * n // 4
  per_epoch = []
  for e in range(2):
    users, crops = [], []
    for b in batches[e * n // 4:(e + 1) * n // 4]:
      for _, _, ins, _, _ in rows_of(b):
        users.append(ins[0][0])
        crops.append((ins[0][0], ins[0][1]))
    assert sorted(users) == eligible
    per_epoch.append((users, dict(crops)))
  assert per_epoch[0][0] != per_epoch[1][0]  # order changes per epoch
  assert per_epoch[0][1] != per_epoch[1][1]  # crops change per epoch
  # Same seed -> same stream; other seed -> another one.
  again = list(pipeline.make_train_iterator(ds, max_len=MAX_LEN, batch_size=4,
                                            seed=1, num_epochs=2))
  assert_batches_equal(batches, again)
  other = next(pipeline.make_train_iterator(ds, max_len=MAX_LEN, batch_size=4,
                                            seed=2))
  assert not np.array_equal(other["item_BxT"], batches[0]["item_BxT"])


def test_shards_are_disjoint_and_cover_each_epoch(ds):
  eligible = [u for u, n in enumerate(LENGTHS) if n >= 4]
  seen = []
  for s in range(2):
    it = pipeline.make_train_iterator(ds, max_len=MAX_LEN, batch_size=2,
                                      seed=5, shard_index=s, shard_count=2)
    epochs = []
    for _ in range(2):  # 8 users per shard per epoch = 4 batches of 2
      users = [r[2][0][0] for b in take(it, 4) for r in rows_of(b)]
      epochs.append(users)
    seen.append(epochs)
  for e in range(2):
    a, b = set(seen[0][e]), set(seen[1][e])
    assert not a & b
    assert sorted(a | b) == eligible


def test_two_shards_read_exactly_the_examples_of_one(ds):
  """Process s of 2 gets block s (rows 4s .. 4s+3) of the 1-process batch, crops included (the
  crop's rng follows the global element index), over epochs: the processes' batches side by
  side are the 1-process batch, row for row."""
  one = take(pipeline.make_train_iterator(ds, max_len=MAX_LEN, batch_size=8, seed=5), 5)
  for s in range(2):
    halves = take(pipeline.make_train_iterator(ds, max_len=MAX_LEN, batch_size=4, seed=5,
                                               shard_index=s, shard_count=2), 5)
    for full, half in zip(one, halves):
      for key, value in full.items():
        np.testing.assert_array_equal(half[key], value[4 * s:4 * s + 4], err_msg=key)


@pytest.mark.parametrize("packing,skip", [(False, 3), (False, 9), (True, 5)])
def test_resume_is_exact(ds, packing, skip):
  # 16 users / batch 4 = 4 batches per epoch: skip=9 resumes after an epoch
  # boundary, and the 6 batches read after it cross another one.
  kw = dict(max_len=MAX_LEN, batch_size=4, seed=7, packing=packing,
            read_options=small_reads())
  ref = take(pipeline.make_train_iterator(ds, **kw), skip + 6)
  it = pipeline.make_train_iterator(ds, **kw)
  take(it, skip)
  state = it.get_state()
  take(it, 2)  # advance past the saved point; the state must not move
  fresh = pipeline.make_train_iterator(ds, **kw)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 6), ref[skip:])


def test_resume_through_orbax(ds, tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  kw = dict(max_len=MAX_LEN, batch_size=3, seed=11, packing=True,
            read_options=small_reads())
  ref = take(pipeline.make_train_iterator(ds, **kw), 10)
  it = pipeline.make_train_iterator(ds, **kw)
  take(it, 6)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(6, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  take(it, 3)
  fresh = pipeline.make_train_iterator(ds, **kw)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    assert mngr.latest_step() == 6
    mngr.restore(6, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(fresh, 4), ref[6:])


def test_long_histories_stream(tmp_path):
  # Two users of 12,000 items: each example reads one record and crops it.
  big = build(tmp_path, lengths=[12_000, 10_500, 3], name="big")
  it = pipeline.make_train_iterator(big, max_len=64, batch_size=2, seed=0)
  for b in take(it, 4):
    assert (b["segment_BxT"] == 1).all()
    starts = [decode(big, int(i))[1] for i in b["item_BxT"][:, 0]]
    assert all(0 <= s <= 12_000 - 2 - 65 for s in starts)


def test_too_few_users(tmp_path):
  tiny = build(tmp_path, lengths=[3, 2, 4], name="tiny")
  with pytest.raises(DataError, match="1 users have >= 4 interactions.*shard_count=2"):
    pipeline.make_train_iterator(tiny, max_len=4, batch_size=1, seed=0,
                                 shard_count=2, shard_index=1)
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.make_train_iterator(tiny, max_len=4, batch_size=1, seed=0,
                                 shard_count=2, shard_index=2)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_batches(ds, split):
  ev = pipeline.make_eval_batches(ds, split, max_len=MAX_LEN, batch_size=5)
  eligible = [u for u, n in enumerate(LENGTHS) if n >= 3]
  assert len(ev) == -(-len(eligible) // 5)
  rows = []
  for b in ev:
    assert b["item_BxT"].shape == (5, MAX_LEN)
    assert b["genre_BxTxG"].shape == (5, MAX_LEN, ds.max_genres)
    for r in range(5):
      if not b["mask_B"][r]:
        assert b["user_index_B"][r] == -1 and b["length_B"][r] == 0
        assert (b["item_BxT"][r] == 0).all()
        continue
      u = int(b["user_index_B"][r])
      t = LENGTHS[u] - (2 if split == "valid" else 1)
      assert decode(ds, int(b["target_item_B"][r])) == (u, t)
      n = int(b["length_B"][r])
      assert n == min(MAX_LEN, t)
      hist = [decode(ds, int(i)) for i in b["item_BxT"][r][:n]]
      assert hist == [(u, k) for k in range(t - n, t)]  # last n before target
      assert (b["item_BxT"][r][n:] == 0).all()
      np.testing.assert_array_equal(b["segment_BxT"][r],
                                    (np.arange(MAX_LEN) < n).astype(np.int32))
      rows.append(u)
    mask = ev.seen_mask(b)
    for r in range(5):
      if b["mask_B"][r]:
        u = int(b["user_index_B"][r])
        t = LENGTHS[u] - (2 if split == "valid" else 1)
        seen = {decode(ds, i) for i in np.nonzero(mask[r])[0] if i >= 2}
        assert seen == {(u, k) for k in range(t)}  # whole history, not target
        assert not mask[r, b["target_item_B"][r]]
      assert mask[r, :2].all()
  assert rows == eligible


def test_eval_rejects_bad_arguments(ds):
  with pytest.raises(ValueError, match="split"):
    pipeline.make_eval_batches(ds, "train", max_len=4, batch_size=2)
  with pytest.raises(DataError, match=r"users \[6\] have < 3"):
    pipeline.make_eval_batches(ds, "test", max_len=4, batch_size=2,
                               users=[0, 6])


def test_window_helpers():
  rng = np.random.default_rng(0)
  starts = {pipeline.random_window(10, 4, rng)[0] for _ in range(200)}
  assert starts == set(range(7))
  assert pipeline.random_window(3, 4, rng) == (0, 3)
  assert pipeline.last_window(10, 4) == (6, 10)
  assert pipeline.last_window(2, 4) == (0, 2)
  with pytest.raises(ValueError, match="longer than"):
    pipeline.pad_to(np.zeros(5), 4)
  with pytest.raises(ValueError, match=">= 2 items"):
    pipeline.next_item_example({"item": np.arange(5)}, 2, 3, np.zeros((5, 1)))


def test_epoch_shuffle_is_a_fresh_permutation_per_epoch():
  import pickle  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  ds = pipeline.epoch_shuffle(grain.MapDataset.range(10), 3).repeat(3)
  got = [ds[i] for i in range(30)]
  blocks = [got[10 * e:10 * (e + 1)] for e in range(3)]
  for e, b in enumerate(blocks):
    assert sorted(b) == list(range(10)), b  # a permutation of the epoch
  assert blocks[0] != blocks[1] != blocks[2]
  np.testing.assert_array_equal(
      blocks[1], np.random.default_rng([3, 1]).permutation(10))
  # Random access in any order and after pickling gives the same elements.
  assert [ds[i] for i in reversed(range(30))] == got[::-1]
  ds2 = pickle.loads(pickle.dumps(ds))
  assert [ds2[i] for i in range(30)] == got
  with pytest.raises(ValueError, match="seed"):
    pipeline.epoch_shuffle(grain.MapDataset.range(3), -1)
