"""Two processes reading disjoint shards, checkpointing and resuming exactly.

The test launches this file twice as a script (``--worker``): processes 0 and
1 of a 2-process ``jax.distributed`` job on the CPU. Each builds
``make_train_iterator(shard_index=jax.process_index(), shard_count=2)``,
reads 3 batches, saves its iterator into one shared Orbax checkpoint
(``grain.checkpoint.CheckpointSave``: one state file per process), reads on
across an epoch boundary, then restores a fresh iterator from the checkpoint
and re-reads. The parent checks that the shards are disjoint, that their union
is every training user in each epoch, and that each process resumed exactly.
Also here: ``worker_count > 0`` (``mp_prefetch``) gives the same stream and
resumes exactly.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = [3, 4, 5, 9, 12, 20, 2, 7, 30, 8, 6, 10, 15, 11, 4, 13, 16, 5]
BATCH, MAX_LEN, SEED, SAVE_AT, TOTAL = 2, 5, 3, 3, 8  # 8 batches = 2 epochs


def build(directory):
  from userllm_jax.data import records  # pylint: disable=g-import-not-at-top
  from userllm_jax.data.schema import Interaction  # pylint: disable=g-import-not-at-top
  rows = [Interaction(f"u{u}", f"u{u}_{k}", 100 * k, 3.0, None, ("g",))
          for u, n in enumerate(LENGTHS) for k in range(n)]
  return records.build_and_write(rows, directory, name="mp")


def user_of(ds, batch):
  toks = ds.vocabs["item"].tokens
  return [int(toks[i][1:].split("_")[0]) for i in batch["item_BxT"][:, 0]]


def worker(pid, port, ds_dir, ckpt_dir, out_path):
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=pid)
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from userllm_jax.data import pipeline, records  # pylint: disable=g-import-not-at-top
  ds = records.open_dataset(ds_dir)
  kw = dict(max_len=MAX_LEN, batch_size=BATCH, seed=SEED,
            shard_index=jax.process_index(), shard_count=jax.process_count(),
            read_options=grain.ReadOptions(num_threads=1,
                                           prefetch_buffer_size=4))
  it = pipeline.make_train_iterator(ds, **kw)
  first = [next(it) for _ in range(SAVE_AT)]
  mngr = ocp.CheckpointManager(ckpt_dir)
  mngr.save(SAVE_AT, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  rest = [next(it) for _ in range(TOTAL - SAVE_AT)]
  fresh = pipeline.make_train_iterator(ds, **kw)
  mngr.restore(SAVE_AT, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(fresh)))
  mngr.close()
  again = [next(fresh) for _ in range(TOTAL - SAVE_AT)]
  same = all(np.array_equal(a[k], b[k]) for a, b in zip(rest, again)
             for k in a)
  batches = first + rest
  per_epoch = len(batches) // 2
  json.dump({
      "process_index": jax.process_index(),
      "epochs": [[u for b in batches[e * per_epoch:(e + 1) * per_epoch]
                  for u in user_of(ds, b)] for e in range(2)],
      "resume_equal": bool(same),
      "state_files": sorted(os.listdir(pathlib.Path(ckpt_dir) / str(SAVE_AT)
                                       / "data")),
  }, open(out_path, "w"))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_disjoint_shards_and_exact_resume(tmp_path):
  build(tmp_path / "ds")
  port = free_port()
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, __file__, "--worker", str(pid), str(port),
       str(tmp_path / "ds"), str(tmp_path / "ckpt"),
       str(tmp_path / f"out{pid}.json")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for pid in range(2)]
  logs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=240)
      logs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  res = [json.load(open(tmp_path / f"out{pid}.json")) for pid in range(2)]
  assert [r["process_index"] for r in res] == [0, 1]
  eligible = sorted(u for u, n in enumerate(LENGTHS) if n >= 4)
  for e in range(2):
    a, b = res[0]["epochs"][e], res[1]["epochs"][e]
    assert len(a) == len(b) == len(eligible) // 2
    assert not set(a) & set(b)
    assert sorted(a + b) == eligible
  assert res[0]["epochs"][0] != res[0]["epochs"][1]  # reshuffled
  for r in res:
    assert r["resume_equal"]
    # One Grain state file per process in the shared checkpoint.
    assert any("process_0-of-2" in f for f in r["state_files"])
    assert any("process_1-of-2" in f for f in r["state_files"])


def test_mp_prefetch_same_stream_and_resume(tmp_path):
  from userllm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = build(tmp_path / "ds")
  kw = dict(max_len=MAX_LEN, batch_size=BATCH, seed=SEED, packing=True)
  ref = [next(it) for it in [pipeline.make_train_iterator(ds, **kw)]
         for _ in range(10)]
  it = pipeline.make_train_iterator(ds, worker_count=1, **kw)
  try:
    got = [next(it) for _ in range(6)]
    state = it.get_state()
  finally:
    it.close()
  for a, b in zip(got, ref):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  fresh = pipeline.make_train_iterator(ds, worker_count=1, **kw)
  try:
    fresh.set_state(state)
    after = [next(fresh) for _ in range(4)]
  finally:
    fresh.close()
  for a, b in zip(after, ref[6:]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


if __name__ == "__main__":
  if len(sys.argv) == 7 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(REPO))
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5],
           sys.argv[6])
  else:
    sys.exit(f"usage: {sys.argv[0]} --worker PID PORT DS_DIR CKPT_DIR OUT")
