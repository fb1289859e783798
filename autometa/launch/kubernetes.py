"""Kubernetes: a Job of ``autometa worker`` pods (``autometa launch k8s``), as in
optuna-examples/kubernetes: N pods over one storage.

The manifest (``--dry-run``: written, not applied) is one ``batch/v1`` Job:

* ``parallelism`` = ``completions`` = N: N pods at once, each running ``autometa worker
  STUDY`` until the study's budget is claimed and no trial runs anywhere, then exiting 0;
  the Job completes when all N have. A pod that is lost (evicted, its node gone) is
  replaced by the Job controller, and its trial, whose heartbeat stops, is failed and run
  again by a worker still there (:mod:`autometa.engine.claim`).
* ``restartPolicy: OnFailure``: a worker that crashes restarts in its pod (each restart
  counts against ``backoffLimit``, for the whole Job).
* the storage URL from a Secret (``AUTOMETA_STORAGE`` from ``secretKeyRef``), never in the
  manifest: manifests are printed, committed and stored by the cluster.
* ``nvidia.com/gpu`` limits: whole GPUs (the NVIDIA device plugin splits none).
* the artifact store: ``s3://BUCKET`` (no volume) or a PersistentVolumeClaim mounted at the
  ``--artifacts`` path (``--artifacts-claim``); the data root likewise (``--data-claim``,
  read-only). Pods share no disk otherwise.

The image is ``docker/Dockerfile``'s (autometa with the pinned set and the study's plugins).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from autometa.config import SearchConfig
from autometa.errors import ConfigError, one_line, redact
from autometa.launch import STORAGE_ENV, WorkerJob
from autometa.study.urls import local_file

HELP = "a Kubernetes Job of worker pods (its manifest with --dry-run)"
EXTRA = ""

#: The key of ``--secret`` that holds the storage URL.
SECRET_KEY = "url"
#: Seconds a kubectl call may take (a cluster that does not answer).
KUBECTL_TIMEOUT = 120
#: The group id the image's user belongs to (docker/Dockerfile): mounted claims are made
#: writable for it (``fsGroup``).
IMAGE_GID = 1000
# Kubernetes names (RFC 1123 labels) and label values.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_CUT = re.compile(r"[^A-Za-z0-9_.-]+")
_PASSWORD = " (your password in place of ***)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Kubernetes' own flags."""
    parser.add_argument("--image", help="the worker image, e.g. REGISTRY/autometa-worker:TAG "
                                        "(built from docker/Dockerfile; required)")
    parser.add_argument("--secret", default="autometa-storage",
                        help=f"the Secret whose key '{SECRET_KEY}' holds the storage URL "
                             "(default autometa-storage): never written into the manifest")
    parser.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's)")
    parser.add_argument("--name", help="the Job's name (default: autometa-<study>)")
    parser.add_argument("--artifacts-claim", metavar="PVC",
                        help="PersistentVolumeClaim mounted at the --artifacts path in every "
                             "pod (ReadWriteMany); not needed with --artifacts s3://BUCKET")
    parser.add_argument("--data-claim", metavar="PVC",
                        help="PersistentVolumeClaim mounted read-only at the --data-root path "
                             "(default: none; the data in the image or none, e.g. sinusoid)")
    parser.add_argument("--env-secret", action="append", default=[], metavar="SECRET",
                        help="a Secret whose keys become the workers' environment, e.g. "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3:// "
                             "artifacts (repeatable)")
    parser.add_argument("--cpus", help="CPUs each pod requests, e.g. 4 or 500m")
    parser.add_argument("--memory", help="memory each pod requests and is limited to, e.g. "
                                         "16Gi")
    parser.add_argument("--backoff-limit", type=int, metavar="N",
                        help="worker restarts the whole Job allows before failing (default "
                             "3 per worker)")
    parser.add_argument("--output", help="write the manifest to this file (default: stdout)")


def check(args: argparse.Namespace, config: SearchConfig) -> None:
    """Refuse what pods cannot run, before anything is stored.

    Raises:
        ConfigError: no ``--image``, fractional GPUs, an artifact store or a storage file
            no pod reaches, a bad Job name, an ``--output`` in no folder, or (without
            ``--dry-run``) no kubectl, a cluster kubectl does not reach or a missing Secret;
            one line naming the fix.
    """
    if not args.image:
        raise ConfigError("give --image: the worker image pods run, e.g. "
                          "REGISTRY/autometa-worker:TAG (docker build -f docker/Dockerfile "
                          "-t REGISTRY/autometa-worker:TAG . && docker push ...)")
    gpus = args.gpus_per_worker
    if gpus != int(gpus):
        raise ConfigError(f"--gpus-per-worker {gpus:g}: Kubernetes gives pods whole GPUs "
                          "(nvidia.com/gpu); give an integer (0: CPU pods)")
    if args.backoff_limit is not None and args.backoff_limit < 0:
        raise ConfigError(f"--backoff-limit {args.backoff_limit}: expected 0 or more")
    mounts = _mounts(config.artifacts, args)
    if "://" in config.artifacts and args.artifacts_claim:
        raise ConfigError(f"--artifacts-claim {args.artifacts_claim} with --artifacts "
                          f"{config.artifacts}: an object store needs no volume; drop "
                          "--artifacts-claim, or give --artifacts DIR to mount it at")
    if "://" not in config.artifacts and not args.artifacts_claim:
        raise ConfigError(f"--artifacts {config.artifacts}: pods share no disk; give "
                          "--artifacts-claim PVC (a volume mounted there in every pod) or "
                          "--artifacts s3://BUCKET")
    file = local_file(config.storage)
    if file is not None and not any(_under(file.resolve(), m) for m in mounts):
        raise ConfigError(f"--storage {redact(config.storage)}: a file no pod reaches; give "
                          "a server pods reach, --storage postgresql://USER@HOST/DB")
    name = job_name(config.study or "", args.name)
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: a Kubernetes name is at most 63 lower-case "
                          "letters, digits and '-', starting and ending with a letter or digit")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ConfigError(f"--output {args.output}: its folder does not exist; give a file "
                          "in an existing folder")
    if not args.dry_run:
        _check_cluster(args, config.storage)


def job_name(study: str, name: str | None = None) -> str:
    """``name``, or ``autometa-<study>`` made a Kubernetes name (lower case, '-' for the
    rest, 63 characters at most)."""
    if name:
        return name
    cut = re.sub(r"[^a-z0-9-]+", "-", study.lower()).strip("-")
    return f"autometa-{cut}"[:63].rstrip("-") if cut else "autometa-worker"


def manifest(job: WorkerJob, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """The Job (a dict for ``yaml.safe_dump``) of ``workers`` pods running ``job`` in
    ``args.image``; the storage URL only as a reference to ``args.secret``."""
    gpus = int(args.gpus_per_worker)
    # The image's Python, the paths as mounted (none unless a claim is): the data root
    # without --data-claim is the image's working directory.
    job = replace(job, python="python", data_root=job.data_root if args.data_claim else None)
    labels = {"app.kubernetes.io/name": "autometa", "app.kubernetes.io/component": "worker",
              "autometa/study": _label(job.study)}
    resources: dict[str, dict[str, Any]] = {}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}  # a quantity: a string
    if args.cpus:
        resources.setdefault("requests", {})["cpu"] = args.cpus
    if args.memory:
        resources.setdefault("requests", {})["memory"] = args.memory
        resources.setdefault("limits", {})["memory"] = args.memory
    container: dict[str, Any] = {
        "name": "worker", "image": args.image, "command": job.argv(),
        "env": [{"name": STORAGE_ENV, "valueFrom": {"secretKeyRef": {
                    "name": args.secret, "key": SECRET_KEY}}},
                {"name": "PYTHONUNBUFFERED", "value": "1"}]}  # logs line by line
    if args.env_secret:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in args.env_secret]
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {"restartPolicy": "OnFailure", "containers": [container]}
    claims = [(args.artifacts_claim, job.artifacts, False), (args.data_claim, job.data_root, True)]
    volumes: dict[str, str] = {}  # claim -> volume name
    for claim, path, read_only in claims:
        if not claim or not path or "://" in path:
            continue
        volume = volumes.setdefault(claim, f"claim-{len(volumes)}")
        mount = {"name": volume, "mountPath": path}
        container.setdefault("volumeMounts", []).append(
            {**mount, "readOnly": True} if read_only else mount)
    if volumes:
        pod["volumes"] = [{"name": v, "persistentVolumeClaim": {"claimName": c}}
                          for c, v in volumes.items()]
        pod["securityContext"] = {"fsGroup": IMAGE_GID}
    metadata: dict[str, Any] = {"name": job_name(job.study, args.name), "labels": labels}
    if args.namespace:
        metadata["namespace"] = args.namespace
    backoff = args.backoff_limit if args.backoff_limit is not None else 3 * workers
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
            "spec": {"parallelism": workers, "completions": workers, "backoffLimit": backoff,
                     "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}}


def launch(job: WorkerJob, workers: int, args: argparse.Namespace) -> int:
    """Write (``--dry-run``, or ``--output``) and apply (``kubectl apply -f -``) the Job of
    ``workers`` pods; print how to create the Secret and how to watch.

    Raises:
        ConfigError: kubectl refused the manifest (its message; the study is stored and
            running the command again resumes it).
    """
    import yaml

    text = yaml.safe_dump(manifest(job, workers, args), sort_keys=False)
    name = job_name(job.study, args.name)
    hints = _hints(job, workers, args, name)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote the Job manifest to {args.output}")
    if args.dry_run:
        if not args.output:  # the hints as comments: what follows the first line is YAML
            print("---\n" + text + "\n".join(f"# {line}" for line in hints))
            return 0
        print("\n".join([*hints[:1], f"submit: kubectl apply -f {shlex.quote(args.output)}",
                         *hints[1:]]))
        return 0
    done = _kubectl(["apply", "-f", "-"], args, text)
    if done.returncode:
        raise ConfigError(f"kubectl apply failed: {_last_line(done.stderr)} (study "
                          f"{job.study!r} is stored: fix that and run this command again)")
    print(one_line(done.stdout) or f"job {name} applied")
    print(f"{workers} pod(s) of {args.image}, {int(args.gpus_per_worker)} GPU(s) each")
    print("\n".join(hints[1:]))
    return 0


def _hints(job: WorkerJob, workers: int, args: argparse.Namespace, name: str) -> list[str]:
    """How to create the Secret (the password as ***), watch the Job and resume."""
    ns = f" -n {shlex.quote(args.namespace)}" if args.namespace else ""
    hidden = redact(job.storage) != job.storage
    url = shlex.quote(redact(job.storage))
    many = f" --max-log-requests {workers}" if workers > 5 else ""
    return [f"the storage Secret, once{_PASSWORD if hidden else ''}: kubectl "
            f"create secret generic {args.secret}{ns} --from-literal={SECRET_KEY}={url}",
            f"watch: kubectl get job {name}{ns}; kubectl logs -f --prefix -l job-name={name}"
            f"{ns}{many}; autometa leaderboard {shlex.quote(job.study)} --storage {url}",
            f"resume after the Job fails or is deleted: kubectl delete job {name}{ns} "
            "--ignore-not-found, then this command again (the study goes on)"]


def _check_cluster(args: argparse.Namespace, storage: str) -> None:
    """kubectl is there, reaches the cluster, and the Secret exists (a pod without it
    waits forever in CreateContainerConfigError)."""
    if shutil.which("kubectl") is None:
        raise ConfigError("kubectl is not on PATH: write the manifest with --dry-run "
                          "--output job.yaml, then kubectl apply -f job.yaml where kubectl is")
    found = _kubectl(["get", "secret", args.secret, "-o", "name"], args)
    if found.returncode == 0 or "forbidden" in found.stderr.lower():
        return  # there, or not ours to read: the pods will tell
    if "notfound" in found.stderr.replace(" ", "").lower():
        ns = f" -n {shlex.quote(args.namespace)}" if args.namespace else ""
        url = redact(storage)
        raise ConfigError(f"no Secret {args.secret!r} in the cluster: create it"
                          f"{_PASSWORD if url != storage else ''}: kubectl create secret "
                          f"generic {args.secret}{ns} --from-literal={SECRET_KEY}="
                          f"{shlex.quote(url)}")
    raise ConfigError(f"kubectl cannot reach the cluster: {_last_line(found.stderr)} (check "
                      "kubectl config current-context, or write the manifest with --dry-run "
                      "--output job.yaml)")


def _kubectl(argv: list[str], args: argparse.Namespace,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    ns = ["--namespace", args.namespace] if args.namespace else []
    try:
        return subprocess.run(["kubectl", *ns, *argv], input=stdin, capture_output=True,
                              text=True, timeout=KUBECTL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"kubectl {argv[0]} got no answer in {KUBECTL_TIMEOUT} s: is the "
                          "cluster up? (kubectl cluster-info)") from None


def _mounts(artifacts: str, args: argparse.Namespace) -> list[Path]:
    """The paths pods mount a claim at (as :func:`autometa.cli.launch` resolves them)."""
    paths = []
    if args.artifacts_claim and "://" not in artifacts:
        paths.append(Path(artifacts).resolve())
    if args.data_claim:
        paths.append(Path(args.data_root or ".").resolve())
    return paths


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _label(text: str) -> str:
    """``text`` as a label value (63 characters of letters, digits, '-', '_', '.')."""
    return _LABEL_CUT.sub("-", text)[:63].strip("-_.") or "study"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return redact(one_line(lines[-1])) if lines else "no message"
