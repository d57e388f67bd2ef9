"""launch/: every launcher's dry run (the lines of launch/README.md, run as documented) and
the GKE JobSet renderer.  Checks process counts, coordinator, the flags passed to
``python -m userllm_jax.main`` (defined by main.py, valid values) and the workdir."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))

import gke_jobset  # noqa: E402

MAIN_FLAGS = {"config", "workdir", "distributed", "coordinator_address", "num_processes",
              "process_id"}
LINE = re.compile(r"^process (\d+)/(\d+) on (\S+): env (.*)$")


def _main_flags():
  """{flag: enum values or None} of userllm_jax.main's flags (imported in a fresh interpreter)."""
  code = ("import json; from absl import flags; import userllm_jax.main; "
          "print(json.dumps({n: getattr(flags.FLAGS[n].parser, 'enum_values', None) "
          "for n in flags.FLAGS}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                       capture_output=True, text=True, check=True)
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(out.stdout.strip().splitlines()[-1])


def _env(**kw):
  env = dict(os.environ, PYTHONPATH=REPO, **kw)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  for k in ("DRY_RUN", "TOPOLOGY", "SLURM_JOB_NODELIST", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES"):
    if k not in kw:
      env.pop(k, None)
  return env


def _run(cmd: str) -> str:
  out = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, (cmd, out.stdout, out.stderr)
  return out.stdout


def _processes(stdout: str):
  """[(i, n, host, env dict, argv)] of the 'process I/N on HOST: env ...' lines."""
  procs = []
  for line in stdout.splitlines():
    m = LINE.match(line)
    if not m:
      continue
    words = shlex.split(m.group(4))
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
      k, v = words.pop(0).split("=", 1)
      env[k] = v
    procs.append((int(m.group(1)), int(m.group(2)), m.group(3), env, words))
  return procs


def _flags(argv):
  """--name=value flags after '-m userllm_jax.main' (asserted to be there)."""
  i = argv.index("-m")
  assert argv[i + 1] == "userllm_jax.main", argv
  out = {}
  for a in argv[i + 2:]:
    assert a.startswith("--") and "=" in a, f"not a --flag=value: {a!r} in {argv}"
    k, v = a[2:].split("=", 1)
    out.setdefault(k, v)
  return out


def _readme_dry_runs():
  text = open(os.path.join(REPO, "launch", "README.md")).read()
  block = text.split("## Dry runs", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
  rows = []
  for line in block.strip().splitlines():
    cmd, expect = line.split("# ->")
    rows.append((cmd.strip(), int(expect.split()[0])))
  return rows


README_RUNS = _readme_dry_runs()


def test_readme_lists_every_launcher():
  text = " ".join(c for c, _ in README_RUNS)
  for name in ("single_gpu.sh", "tpu_vm.sh", "slurm.sbatch", "gke_jobset.py"):
    assert name in text
  assert {"v5e-16", "v5e-8"} <= set(re.findall(r"v5e-\d+", text))


@pytest.mark.parametrize("cmd, nproc", README_RUNS, ids=[c.split()[2 if c.startswith("DRY")
                                                                  else 1] for c, _ in README_RUNS])
def test_readme_dry_run(cmd, nproc):
  out = _run(cmd)
  procs = _processes(out)
  assert [p[:2] for p in procs] == [(i, nproc) for i in range(nproc)], out
  known = MAIN_FLAGS
  words = shlex.split(cmd.split("launch/", 1)[1])
  given_workdir = None
  if "slurm" in cmd or "single_gpu" in cmd or "tpu_vm" in cmd:
    pos = [w for w in words[1:] if not w.startswith("--") and w != "run"]
    config, given_workdir = pos[0], pos[1]
    overrides = [w for w in words if w.startswith("--config.")]
  else:
    config = "configs/encoder_movielens_1m.py"
    given_workdir = re.search(r"--workdir=(\S+)", cmd).group(1)
    overrides = []
  hosts = set()
  for i, n, host, env, argv in procs:
    flags = _flags(argv)
    assert set(flags) - {k for k in flags if k.startswith("config.")} <= known, flags
    assert flags["config"] == config and flags["workdir"] == given_workdir
    assert [a for a in argv if a.startswith("--config.")] == overrides
    hosts.add(host)
    if "tpu_vm" in cmd or "gke" in cmd:
      assert flags["distributed"] == "auto" and "coordinator_address" not in flags
    elif "slurm" in cmd:
      assert flags["coordinator_address"] == "gpu01:12355" == env["COORDINATOR_ADDRESS"]
      assert flags["num_processes"] == str(n) and flags["process_id"] == str(i)
      assert env["SLURM_PROCID"] == str(i)
      assert "distributed" not in flags          # explicit flags imply mode 'explicit'
    else:
      assert not {"distributed", "coordinator_address", "num_processes"} & set(flags)
      assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".75"
  assert len(hosts) == nproc                     # one process per host
  if "tpu_vm" in cmd:
    # The gcloud line runs the same command on every worker.
    gcloud = [l for l in out.splitlines() if l.startswith("gcloud ")]
    assert len(gcloud) == 1
    g = shlex.split(gcloud[0])
    assert "--worker=all" in g and "--zone=us-west4-a" in g
    remote = [a for a in g if a.startswith("--command=")][0][len("--command="):]
    assert procs[0][4] == shlex.split(remote.split("nohup ", 1)[1].split(" >", 1)[0])
  if "slurm" in cmd:
    assert "srun --kill-on-bad-exit=1 bash -c" in out
    assert "coordinator gpu01:12355, 2 processes, workdir /shared/runs/enc" in out


def test_flags_are_defined_by_main():
  defined = _main_flags()
  assert MAIN_FLAGS <= set(defined)
  assert {"auto", "explicit", "off"} <= set(defined["distributed"])


def test_slurm_node_list_expansion_and_port():
  out = _run("DRY_RUN=1 SLURM_JOB_NODELIST='a1,b[7-8],c[09-10]' SLURM_NTASKS=5 "
             "COORDINATOR_PORT=2222 launch/slurm.sbatch cfg.py /w")
  procs = _processes(out)
  assert [p[2] for p in procs] == ["a1", "b7", "b8", "c09", "c10"]
  assert all(_flags(p[4])["coordinator_address"] == "a1:2222" for p in procs)
  bad = subprocess.run(["bash", "-c", "DRY_RUN=1 launch/slurm.sbatch cfg.py /w"], cwd=REPO,
                       env=_env(), capture_output=True, text=True)
  assert bad.returncode != 0 and "SLURM_JOB_NODELIST" in bad.stderr


def test_tpu_topologies_agree_with_the_gke_table():
  for name, (_, _, hosts, chips) in gke_jobset.TOPOLOGIES.items():
    out = _run(f"DRY_RUN=1 TOPOLOGY={name} TPU_NAME=t ZONE=z launch/tpu_vm.sh run c.py gs://b/w")
    assert f"topology {name}: {hosts} hosts x {chips} chips" in out, (name, out)
    assert len(_processes(out)) == hosts


def test_gke_yaml_is_the_rendered_v5e16_jobset():
  with open(os.path.join(REPO, "launch", "gke_xpk.yaml")) as f:
    assert f.read() == gke_jobset.render("v5e-16")


@pytest.mark.parametrize("topology, hosts, chips, physical", [
    ("v5e-16", 4, 4, "4x4"), ("v5e-8", 1, 8, "2x4"), ("v6e-16", 4, 4, "4x4"),
    ("v5p-16", 2, 4, "2x2x2")])
def test_gke_jobset_fields(topology, hosts, chips, physical):
  doc = yaml.safe_load(gke_jobset.render(
      topology, image="img:1", workdir="gs://b/run",
      overrides=("--config.mesh.fsdp=-1", "--config.model.features=('item',)")))
  assert doc["kind"] == "JobSet"
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == hosts
  pod = job["template"]["spec"]
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == physical
  (container,) = pod["containers"]
  assert container["image"] == "img:1"
  assert container["resources"]["limits"]["google.com/tpu"] == chips
  argv = container["command"]
  assert argv[:3] == ["python", "-m", "userllm_jax.main"]
  assert _flags(argv) == {"config": "configs/encoder_movielens_1m.py", "workdir": "gs://b/run",
                          "distributed": "auto", "config.mesh.fsdp": "-1",
                          "config.model.features": "('item',)"}
  assert pod["terminationGracePeriodSeconds"] >= 120
