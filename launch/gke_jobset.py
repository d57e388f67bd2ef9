"""Renders the GKE TPU JobSet of launch/gke_xpk.yaml for a named slice, or prints its plan.

    python launch/gke_jobset.py --topology=v5e-16 > jobset.yaml            # IMAGE/WORKDIR placeholders
    python launch/gke_jobset.py --topology=v5e-8 --image=us-docker.pkg.dev/P/R/userllm_jax:latest \\
        --workdir=gs://BUCKET/runs/enc --config=configs/encoder_movielens_1m.py \\
        -- --config.mesh.fsdp=-1 | kubectl apply -f -
    python launch/gke_jobset.py --topology=v5e-16 --dry_run     # what each pod runs

One pod per TPU host (``parallelism = completions = hosts``), ``google.com/tpu`` = chips per
host, node selectors for the accelerator and its physical topology; every pod runs the same
``python -m userllm_jax.main ... --distributed=auto``: on GKE TPU node pools JAX reads
``TPU_WORKER_ID`` / ``TPU_WORKER_HOSTNAMES`` (set by GKE) and makes worker 0 the coordinator.
``launch/gke_xpk.yaml`` is this script's output for ``--topology=v5e-16`` (tests/test_launch.py
checks that).  Standard library only.
"""

from __future__ import annotations

import argparse
import shlex
import sys

# name -> (GKE accelerator label, physical topology, hosts, chips per host)
TOPOLOGIES = {
    "v5e-4": ("tpu-v5-lite-podslice", "2x2", 1, 4),
    "v5e-8": ("tpu-v5-lite-podslice", "2x4", 1, 8),
    "v5e-16": ("tpu-v5-lite-podslice", "4x4", 4, 4),
    "v5e-32": ("tpu-v5-lite-podslice", "4x8", 8, 4),
    "v5e-64": ("tpu-v5-lite-podslice", "8x8", 16, 4),
    "v5e-256": ("tpu-v5-lite-podslice", "16x16", 64, 4),
    "v6e-8": ("tpu-v6e-slice", "2x4", 1, 8),
    "v6e-16": ("tpu-v6e-slice", "4x4", 4, 4),
    "v6e-64": ("tpu-v6e-slice", "8x8", 16, 4),
    "v5p-8": ("tpu-v5p-slice", "2x2x1", 1, 4),
    "v5p-16": ("tpu-v5p-slice", "2x2x2", 2, 4),
    "v5p-32": ("tpu-v5p-slice", "2x2x4", 4, 4),
    "v4-8": ("tpu-v4-podslice", "2x2x1", 1, 4),
    "v4-16": ("tpu-v4-podslice", "2x2x2", 2, 4),
    "v4-32": ("tpu-v4-podslice", "2x2x4", 4, 4),
}
# xpk's --tpu-type names
XPK_TYPES = {"v5e": "v5litepod", "v6e": "v6e", "v5p": "v5p", "v4": "v4"}

HEADER = """\
# GKE TPU slice: a JobSet running the same command in every TPU host pod.
# Rendered by `python launch/gke_jobset.py --topology={topology}` (edit that script, not this
# file; tests/test_launch.py checks they agree).  Other slices: --topology=v5e-8, v6e-16, ...
# jax.distributed auto-detects the slice (--distributed=auto; GKE sets TPU_WORKER_ID and
# TPU_WORKER_HOSTNAMES, worker 0 is the coordinator); WORKDIR is a gs:// bucket shared by all
# hosts (Orbax checkpoints; a restarted JobSet resumes from the latest one).
#
# Apply directly (after building and pushing an image that has `pip install '.[tpu,gguf]'`):
#   sed -e 's|IMAGE|us-docker.pkg.dev/PROJECT/REPO/userllm_jax:latest|' \\
#       -e 's|WORKDIR|gs://BUCKET/runs/encoder|' launch/gke_xpk.yaml | kubectl apply -f -
# or render with the values filled in:
#   python launch/gke_jobset.py --topology={topology} --image=IMAGE --workdir=gs://... | kubectl apply -f -
#
# Or let XPK (https://github.com/AI-Hypercomputer/xpk) generate the same JobSet:
#   xpk workload create --cluster CLUSTER --workload {name} \\
#     --tpu-type={xpk_type} --num-slices=1 \\
#     --docker-image=us-docker.pkg.dev/PROJECT/REPO/userllm_jax:latest \\
#     --command "{command}"
#   xpk workload list --cluster CLUSTER
#   xpk workload delete --cluster CLUSTER --workload {name}
#
# {topology}: {hosts} host(s) x {chips} chips = {hosts} pod(s), one process each.
# Multi-slice: replicas > 1 (and a mesh whose data axis spans the slices).
"""

BODY = """\
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: {name}
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: 4            # a restart resumes from the latest checkpoint in WORKDIR
  replicatedJobs:
    - name: slice
      replicas: 1
      template:
        spec:
          parallelism: {hosts}
          completions: {hosts}
          backoffLimit: 0
          template:
            spec:
              hostNetwork: true
              dnsPolicy: ClusterFirstWithHostNet
              # Node maintenance / preemption sends SIGTERM: the trainer checkpoints at the
              # next step (JAX preemption sync point, all hosts agree) and exits 0.
              terminationGracePeriodSeconds: 300
              nodeSelector:
                cloud.google.com/gke-tpu-accelerator: {accelerator}
                cloud.google.com/gke-tpu-topology: {physical}
              containers:
                - name: jax
                  image: {image}
                  ports:
                    - containerPort: 8471   # TPU runtime
                    - containerPort: 8080
                  securityContext:
                    privileged: true
                  command:
{command_yaml}
                  resources:
                    limits:
                      google.com/tpu: {chips}
"""


def command(config: str, workdir: str, overrides=()) -> list[str]:
  """The argv every pod runs."""
  return ["python", "-m", "userllm_jax.main", f"--config={config}", f"--workdir={workdir}",
          "--distributed=auto", *overrides]


def _yaml_str(s: str) -> str:
  plain = s and all(c.isalnum() or c in "-_./=:,@" for c in s) and not s[0] in "-:@"
  if plain or (s.startswith("--") and all(c.isalnum() or c in "-_./=:,@" for c in s)) or s == "-m":
    return s
  return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(topology: str, *, image: str = "IMAGE", workdir: str = "WORKDIR",
           config: str = "configs/encoder_movielens_1m.py", overrides=(),
           name: str = "userllm-encoder") -> str:
  if topology not in TOPOLOGIES:
    raise SystemExit(f"unknown --topology={topology}; known: {', '.join(TOPOLOGIES)}")
  accelerator, physical, hosts, chips = TOPOLOGIES[topology]
  argv = command(config, workdir, overrides)
  command_yaml = "\n".join(f"                    - {_yaml_str(a)}" for a in argv)
  xpk_cmd = " ".join(shlex.quote(a) for a in command(config, "gs://BUCKET/runs/encoder",
                                                     overrides))
  gen, size = topology.split("-")
  return (HEADER.format(topology=topology, name=name, xpk_type=f"{XPK_TYPES[gen]}-{size}",
                        command=xpk_cmd, hosts=hosts, chips=chips)
          + BODY.format(name=name, hosts=hosts, accelerator=accelerator, physical=physical,
                        image=image, command_yaml=command_yaml, chips=chips))


def plan(topology: str, **kw) -> str:
  """The dry run: one line per pod, the same format as the shell launchers' DRY_RUN=1."""
  _, _, hosts, chips = TOPOLOGIES[topology]
  argv = command(kw.get("config", "configs/encoder_movielens_1m.py"),
                 kw.get("workdir", "WORKDIR"), kw.get("overrides", ()))
  lines = [f"# gke: topology {topology}: {hosts} hosts x {chips} chips, {hosts} processes "
           "(one pod per host); coordinator: worker 0 (TPU_WORKER_HOSTNAMES), auto-detected "
           "by jax.distributed.initialize()"]
  lines += [f"process {i}/{hosts} on slice-0-{i}: env TPU_WORKER_ID={i} "
            + " ".join(shlex.quote(a) for a in argv) for i in range(hosts)]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", default="v5e-16", choices=sorted(TOPOLOGIES))
  p.add_argument("--image", default="IMAGE")
  p.add_argument("--workdir", default="WORKDIR")
  p.add_argument("--config", default="configs/encoder_movielens_1m.py")
  p.add_argument("--name", default="userllm-encoder")
  p.add_argument("--dry_run", action="store_true", help="print what each pod runs")
  p.add_argument("overrides", nargs="*", help="--config.a.b=value ... (after --)")
  args = p.parse_args(argv)
  kw = dict(image=args.image, workdir=args.workdir, config=args.config,
            overrides=tuple(args.overrides), name=args.name)
  if args.dry_run:
    kw.pop("image"), kw.pop("name")
    print(plan(args.topology, **kw))
  else:
    sys.stdout.write(render(args.topology, **kw))
  return 0


if __name__ == "__main__":
  sys.exit(main())
