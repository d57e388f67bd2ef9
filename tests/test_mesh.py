"""train/mesh.py: mesh shapes, the logical-axis rules, divisibility fallback, assert_sharded."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from userllm_jax.train import mesh as mesh_lib

import _train_worker as tw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = mesh_lib.MESH_AXES


def test_resolve_mesh_shape():
  assert mesh_lib.resolve_mesh_shape({"data": -1}, 8) == (8, 1, 1)
  assert mesh_lib.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 1}, 8) == (2, 4, 1)
  assert mesh_lib.resolve_mesh_shape({"data": 1, "fsdp": 2, "tensor": -1}, 8) == (1, 2, 4)
  assert mesh_lib.resolve_mesh_shape(None, 3) == (3, 1, 1)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="has 6 devices, but 8 are available"):
    mesh_lib.resolve_mesh_shape({"data": 2, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    mesh_lib.resolve_mesh_shape({"model": 2}, 2)


def test_make_mesh_uses_auto_axes():
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  assert mesh.axis_names == AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_to_spec_rules_and_fallback():
  shape = {"data": 2, "fsdp": 4, "tensor": 2}
  # Megatron MLP kernel: embed over fsdp, mlp over tensor.
  assert mesh_lib.logical_to_spec(("embed", "mlp"), (16, 64), shape) == P("fsdp", "tensor")
  # vocab x embed table.
  assert mesh_lib.logical_to_spec(("vocab", "embed"), (64, 16), shape) == P("tensor", "fsdp")
  # attention: head_dim is never sharded; trailing Nones are dropped.
  assert mesh_lib.logical_to_spec(("embed", "heads", "head_dim"), (16, 4, 8), shape) == \
      P("fsdp", "tensor")
  # 6 is not divisible by fsdp=4 -> replicated along that dim.
  assert mesh_lib.logical_to_spec(("embed", "mlp"), (6, 64), shape) == P(None, "tensor")
  # batch over (data, fsdp) jointly; falls back to data alone if 8 does not divide.
  assert mesh_lib.logical_to_spec(("batch", None), (16, 3), shape) == P(("data", "fsdp"))
  assert mesh_lib.logical_to_spec(("batch",), (6,), shape) == P("data")
  # the same mesh axis is never used twice in one array.
  assert mesh_lib.logical_to_spec(("mlp", "heads"), (8, 8), shape) == P("tensor")
  # size-1 mesh axes are left out.
  assert mesh_lib.logical_to_spec(("embed", "mlp"), (16, 64),
                                  {"data": 8, "fsdp": 1, "tensor": 1}) == P()
  with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
    mesh_lib.logical_to_spec(("hidden",), (4,), shape, name="layer/w")
  with pytest.raises(ValueError, match="do not match shape"):
    mesh_lib.logical_to_spec(("embed",), (4, 4), shape)


def test_state_partition_specs_follow_metadata():
  model = nnx.eval_shape(lambda: tw.TinyLM(rngs=nnx.Rngs(0)))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  specs = mesh_lib.state_partition_specs(
      params, AbstractMesh((2, 4, 2), AXES))
  assert specs == {"embed": P("tensor", "fsdp"), "w_in": P("fsdp", "tensor"),
                   "w_out": P("tensor", "fsdp"), "b_in": P("tensor"),
                   "norm": {"scale": P("fsdp")}}
  assert jax.tree.structure(nnx.to_pure_dict(params)) == jax.tree.structure(
      specs, is_leaf=lambda x: isinstance(x, P))


def test_assert_sharded_on_a_4_device_mesh():
  """shard_model places params by the rules; assert_sharded passes, and catches replication."""
  code = textwrap.dedent("""
      import json, sys
      import jax, jax.numpy as jnp
      from flax import nnx
      sys.path.insert(0, 'tests')
      import _train_worker as tw
      from userllm_jax.train import mesh as m
      mesh = m.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 1})
      model = m.shard_model(tw.TinyLM(rngs=nnx.Rngs(0)), mesh)
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      m.assert_sharded(params, mesh, min_size=1000)
      out = {'w_in': list(params['w_in'].sharding.spec),
             'shards': len(params['w_in'].addressable_shards),
             'shard_shape': list(params['w_in'].addressable_shards[0].data.shape)}
      params['w_in'] = jax.device_put(params['w_in'], jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))
      try:
        m.assert_sharded(params, mesh, min_size=1000)
        out['error'] = None
      except AssertionError as e:
        out['error'] = str(e)
      print('RESULT' + json.dumps(out))
  """)
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  out = json.loads(line[len("RESULT"):])
  assert out["w_in"] == ["fsdp"]
  assert out["shards"] == 4 and out["shard_shape"] == [4, 64]
  assert out["error"] is not None and "['w_in'] shape=(16, 64)" in out["error"]
  assert "embed" not in out["error"]   # the others are still sharded
