"""``autometa launch k8s`` (issue 27): the Job manifest a user applies, and the worker image.

No Kubernetes cluster runs here. The manifest is read as the cluster's API reads it: the
official Kubernetes Python client's models (``V1Job``) take it back field by field, so a
misspelt field, a wrong type or a missing required one fails. Without ``--dry-run`` the
real kubectl is run against a cluster address nothing answers on. The worker image is
built where a docker daemon answers, and skipped, with the reason, where none does.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from limits import DOCKER_BUILD, DOCKER_RUN, POOL_SEARCH, QUICK_SUBPROCESS

from autometa.cli import main
from autometa.cli.app import build_parser
from autometa.cli.search import checked_config
from autometa.engine.claim import counts
from autometa.engine.run import create_search

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-K8s-pw"
IMAGE = "registry.example/autometa-worker:0.1"
#: A tiny sinusoid study (tests/conftest.py SMALL_SINUSOID's episodes).
SINUSOID = ["--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
            "--meta-steps", "10", "--eval-every", "5", "--no-baselines", "--trials", "4",
            "--task-param", "val_episodes=20", "--task-param", "test_episodes=40",
            "--task-param", "eval_queries=20"]


def launch(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``autometa launch k8s ARGV`` in-process: exit code, stdout, stderr."""
    capsys.readouterr()
    try:
        code = main(["launch", "k8s", *argv])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def studies(url: str) -> list[str]:
    return optuna.study.get_all_study_names(storage=url)


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


def check_with_kubernetes_models(job: dict[str, Any]) -> None:
    """The Kubernetes client's ``V1Job`` reads ``job`` and writes it back unchanged: every
    field name is the API's, every value of the API's type (its pydantic models check
    types and required fields; a field they do not know is dropped, so the round trip
    catches it)."""
    kubernetes = pytest.importorskip("kubernetes", reason="pip install kubernetes "
                                                          "(requirements-dev.txt)")
    model = kubernetes.client.V1Job.from_dict(job)
    assert kubernetes.client.ApiClient().sanitize_for_serialization(model) == job


@pytest.mark.slow
def test_dry_run_writes_the_job_without_the_password_and_stores_nothing(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = pg_url.replace("postgresql+psycopg://postgres@",
                         f"postgresql://postgres:{PASSWORD}@")
    arts, data = tmp_path / "shared" / "arts", tmp_path / "data"
    data.mkdir()  # checked here too: the same files are on the data claim
    code, out, err = launch(
        capsys, "--dry-run", *SINUSOID, "--study", "K8s_Sinus", "--storage", url,
        "--workers", "3", "--gpus-per-worker", "2", "--image", IMAGE,
        "--artifacts", str(arts), "--artifacts-claim", "autometa-artifacts",
        "--data-root", str(data), "--data-claim", "autometa-data",
        "--namespace", "ml", "--output", "job.yaml")
    assert code == 0, err
    text = Path("job.yaml").read_text()
    for where in (out, err, text):
        assert PASSWORD not in where
        assert "postgres:" + PASSWORD not in where
    assert "postgresql" not in text  # not even the URL without its password
    job = yaml.safe_load(text)
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["name"] == "autometa-k8s-sinus"
    assert job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["parallelism"] == spec["completions"] == 3
    assert spec["backoffLimit"] == 9
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    worker = container(job)
    assert worker["image"] == IMAGE
    # The image's python, the study's worker, one process per pod; no storage URL.
    assert worker["command"] == ["python", "-m", "autometa", "worker", "K8s_Sinus",
                                 "--devices", "cuda", "--workers", "2", "--no-progress",
                                 "--artifacts", str(arts), "--data-root", str(data)]
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    storage = [e for e in worker["env"] if e["name"] == "AUTOMETA_STORAGE"]
    assert storage == [{"name": "AUTOMETA_STORAGE", "valueFrom": {"secretKeyRef": {
        "name": "autometa-storage", "key": "url"}}}]
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    mounts = {volumes[m["name"]]: (m["mountPath"], m.get("readOnly", False))
              for m in worker["volumeMounts"]}
    assert mounts == {"autometa-artifacts": (str(arts), False),
                      "autometa-data": (str(data), True)}
    check_with_kubernetes_models(job)
    # What to do next, the password as ***.
    assert "kubectl create secret generic autometa-storage -n ml --from-literal=url=" \
           "'postgresql://postgres:***@" in out
    assert "kubectl apply -f job.yaml" in out
    assert "kubectl logs -f --prefix -l job-name=autometa-k8s-sinus -n ml" in out
    assert "autometa leaderboard K8s_Sinus --storage 'postgresql://postgres:***@" in out
    assert studies(pg_url) == []
    assert not arts.exists()


def test_cpu_pods_and_the_manifest_on_stdout(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # A SQLite file is reachable from pods only on a claimed volume: here the artifacts'.
    shared = tmp_path / "shared"
    url = f"sqlite:///{shared / 'search.db'}"
    code, out, err = launch(
        capsys, "--dry-run", *SINUSOID, "--storage", url, "--workers", "2",
        "--gpus-per-worker", "0", "--image", IMAGE, "--artifacts", str(shared),
        "--artifacts-claim", "shared", "--cpus", "2", "--memory", "4Gi",
        "--env-secret", "s3-credentials", "--secret", "my-storage")
    assert code == 0, err
    first, rest = out.split("\n", 1)
    assert first.startswith("# study 'sinusoid-seed0' in sqlite:///")
    # The whole output is a YAML stream (`| kubectl apply -f -`): the Job; the first line
    # and the hints are comments.
    (job,) = list(yaml.safe_load_all(out))
    assert "# the storage Secret, once" in rest and "# watch: kubectl get job" in rest
    assert job["spec"]["parallelism"] == 2
    worker = container(job)
    assert worker["command"][4:7] == ["sinusoid-seed0", "--devices", "cpu"]
    assert "--data-root" not in worker["command"]  # no data claim: the image's workdir
    assert worker["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                                   "limits": {"memory": "4Gi"}}
    assert worker["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert worker["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "my-storage",
                                                             "key": "url"}
    assert job["spec"]["template"]["spec"]["volumes"] == [
        {"name": "claim-0", "persistentVolumeClaim": {"claimName": "shared"}}]
    check_with_kubernetes_models(job)
    assert not shared.exists() or studies(url) == []


def test_s3_artifacts_need_no_volume(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("boto3", reason="s3:// artifacts need boto3")
    code, out, err = launch(capsys, "--dry-run", *SINUSOID, "--storage", "sqlite:///s.db",
                            "--image", IMAGE, "--artifacts", "s3://bucket",
                            "--data-claim", "data", "--output", "job.yaml")
    assert code == 0, err
    job = yaml.safe_load(Path("job.yaml").read_text())
    worker = container(job)
    assert worker["command"][-4:] == ["--artifacts", "s3://bucket", "--data-root", os.getcwd()]
    assert worker["volumeMounts"] == [{"name": "claim-0", "mountPath": os.getcwd(),
                                       "readOnly": True}]
    check_with_kubernetes_models(job)


BAD = {
    "fractional GPUs": (["--gpus-per-worker", "0.5", "--artifacts", "s3://b"],
                        "--gpus-per-worker 0.5: Kubernetes gives pods whole GPUs"),
    "no image": (["--no-image"], "give --image"),
    "a directory no pod shares": ([], "--artifacts autometa-artifacts: pods share no disk"),
    "a claim for an object store": (["--artifacts", "s3://b", "--artifacts-claim", "c"],
                                    "an object store needs no volume"),
    "a storage file no pod reaches": (["--artifacts-claim", "c", "--storage",
                                       "sqlite:////elsewhere/s.db"], "a file no pod reaches"),
    "an output in no folder": (["--artifacts-claim", "c", "--output", "no/such/job.yaml",
                               "--storage", "sqlite:///autometa-artifacts/s.db"],
                              "--output no/such/job.yaml: its folder does not exist"),
    "a bad Job name": (["--artifacts-claim", "c", "--name", "Autometa_Job", "--storage",
                        "sqlite:///autometa-artifacts/s.db"],
                       "--name 'Autometa_Job': a Kubernetes name"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_stores_nothing(case: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    extra, message = BAD[case]
    image = [] if "--no-image" in extra else ["--image", IMAGE]
    extra = [a for a in extra if a != "--no-image"]
    storage = [] if "--storage" in extra else ["--storage", "sqlite:///s.db"]
    code, out, err = launch(capsys, "--dry-run", *SINUSOID, *image, *storage, *extra)
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("autometa: error: ") and message in line, line
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # no storage file, no artifacts


def test_without_dry_run_kubectl_must_reach_the_cluster_before_anything_is_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*SINUSOID, "--storage", "sqlite:///shared/s.db", "--image", IMAGE,
            "--artifacts", "shared", "--artifacts-claim", "shared"]
    kubectl = shutil.which("kubectl")
    empty = tmp_path.parent / f"{tmp_path.name}-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, out, err = launch(capsys, *argv)
    assert code == 2
    assert err == ("autometa: error: kubectl is not on PATH: write the manifest with "
                   "--dry-run --output job.yaml, then kubectl apply -f job.yaml where "
                   "kubectl is\n")
    assert list(tmp_path.iterdir()) == []
    if kubectl is None:
        pytest.skip("no kubectl here: its cluster check is not run")
    # The real kubectl, pointed at an address where nothing listens.
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(kubectl).parent), os.defpath]))
    config = tmp_path.parent / f"{tmp_path.name}-kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(config))
    code, out, err = launch(capsys, *argv)
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("autometa: error: kubectl cannot reach the cluster: "), line
    assert list(tmp_path.iterdir()) == []


def image_context(context: Path) -> Path:
    """``context`` made what the docker build of docker/Dockerfile receives: the files
    docker/Dockerfile.dockerignore lets in from the repository root (BuildKit reads that
    file; it is also written as the context's .dockerignore, for the classic builder)."""
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text()
    context.mkdir()
    for name in [line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")]:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():  # requirements.txt: only where a user wrote it
            shutil.copy2(source, context / name)
    (context / "docker").mkdir()
    shutil.copy2(ROOT / "docker" / "Dockerfile", context / "docker" / "Dockerfile")
    (context / ".dockerignore").write_text(ignore)
    return context


def test_the_image_context_holds_what_the_image_installs(tmp_path: Path) -> None:
    """What docker/Dockerfile.dockerignore lets into the build context builds the wheel the
    image installs, first-party plugins and launchers included."""
    context = image_context(tmp_path / "context")
    # Every file the Dockerfile copies, but the optional requirements.txt, is there.
    for line in (context / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for name in line.split()[1:-1]:
                assert "[" in name or (context / name).exists(), name
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel"), str(context)],
        capture_output=True, text=True, timeout=QUICK_SUBPROCESS)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("autometa_ml-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"autometa/launch/kubernetes.py", "autometa/cli/launch.py",
            "autometa_plugins/sinusoid/__init__.py"} <= names


#: Extra ``docker build`` flags where the defaults (the base image from Docker Hub, the
#: CPU torch from PyTorch's index) cannot be reached: a mirror, a wheelhouse, another base,
#: e.g. ``--network host --build-arg PIP_FIND_LINKS=http://127.0.0.1:8765/``.
BUILD_FLAGS_ENV = "AUTOMETA_DOCKER_BUILD_FLAGS"


def docker_reason() -> str | None:
    """Why the image cannot be built here, or None."""
    if shutil.which("docker") is None:
        return "no docker on PATH"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                          capture_output=True, text=True, timeout=QUICK_SUBPROCESS)
    if info.returncode:
        lines = (info.stderr or info.stdout).strip().splitlines() or ["no message"]
        return f"no docker daemon answers: {lines[-1]}"
    return None


@pytest.mark.slow
def test_the_worker_image_runs_a_search_from_the_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = docker_reason()
    if reason:
        pytest.skip(reason)
    pins = (ROOT / "requirements-dev.txt").read_text().splitlines()
    (torch,) = [line.split("==")[1] for line in pins if line.startswith("torch==")]
    tag = f"autometa-worker-test:{os.getpid()}"
    flags = shlex.split(os.environ.get(
        BUILD_FLAGS_ENV, "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu"))
    build = subprocess.run(
        ["docker", "build", "-f", "docker/Dockerfile", "-t", tag,
         "--build-arg", f"TORCH_VERSION={torch}", *flags, "."],
        cwd=image_context(tmp_path / "context"), capture_output=True, text=True,
        timeout=DOCKER_BUILD)
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    try:
        def run(*argv: str) -> str:
            done = subprocess.run(["docker", "run", "--rm", *argv], capture_output=True,
                                  text=True, timeout=DOCKER_RUN)
            assert done.returncode == 0, done.stderr[-3000:]
            return done.stdout

        assert run(tag, "worker", "--help").startswith("usage: autometa worker")
        # The pinned torch, the postgres driver; no dev tools; the image's user and workdir.
        probe = ("import importlib.util as u, os, torch, psycopg, autometa; "
                 "print(torch.__version__.split('+')[0], u.find_spec('pytest') is None, "
                 "os.getcwd(), os.getuid())")
        assert run("--entrypoint", "python", tag, "-c", probe).split() == [
            torch, "True", "/work", "1000"]
        # A search: the study created here (as `autometa launch` does), then two containers
        # run the manifest's command on a shared folder (a claim), the storage URL in
        # their environment only.
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)  # the image's user writes there (a claim's fsGroup)
        url = f"sqlite:///{shared / 's.db'}"
        search = [*SINUSOID, "--study", "img", "--storage", url, "--artifacts", str(shared)]
        args = build_parser(["run", *search]).parse_args(["run", *search])
        host, config = checked_config(args)
        create_search(config, host=host)
        (shared / "s.db").chmod(0o666)
        code, _, err = launch(capsys, "--dry-run", *search, "--image", tag,
                              "--gpus-per-worker", "0", "--artifacts-claim", "shared",
                              "--output", str(tmp_path / "job.yaml"))
        assert code == 0, err
        command = container(yaml.safe_load((tmp_path / "job.yaml").read_text()))["command"]
        workers = [subprocess.Popen(
            ["docker", "run", "--rm", "--network", "none", "-v", f"{shared}:{shared}",
             "-e", f"AUTOMETA_STORAGE={url}", "--entrypoint", "", tag, *command],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        for worker in workers:
            out, _ = worker.communicate(timeout=POOL_SEARCH)
            assert worker.returncode == 0, out[-3000:]
        trials = optuna.load_study(study_name="img", storage=url).trials
        assert sum(1 for t in trials if counts(t)) == 4
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True,
                       timeout=DOCKER_RUN)
