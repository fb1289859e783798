"""autometa on a CUDA GPU, proven by one prepared check (``make gpu-check``), in at most 8 min.

Five steps, each in its own process with its own time limit, so that one hang cannot eat
the others' time; every step runs, prints PASS or FAIL, and the check exits 1 if any
failed:

1. ``device``: the GPU (name, compute capability, memory), torch and its CUDA and cuDNN;
2. ``tests``: ``pytest -m cuda`` (tests/test_cuda.py: second-order meta-gradients of the
   ``mlp`` and ``conv4`` sources against float64 references, BatchNorm, a trial that runs
   out of device memory); it passes only if they ran, none skipped;
3. ``search``: ``autometa run --devices cuda --workers 2`` (two worker processes sharing
   one GPU) of MAML on conv4 on a small ``glyphs`` task; it passes if it exits 0 and every
   trial finished on a CUDA device with its peak memory recorded, from two workers;
4. ``speed``: ``benchmarks/speed.py --device cuda`` (autometa against the peers installed,
   each on the GPU, at fewer repetitions than the CPU table), written as ``speed_cuda``;
5. ``precision``: the same one-trial search (MAML on conv4, ``glyphs``, the same seed) in
   ``--precision float32`` and ``--precision bf16`` (``torch.autocast``); it prints both
   meta-test accuracies, their difference and each trial's meta-training time, and passes
   if both trials completed with a meta-test score, the second recorded as bf16.

Everything printed goes to ``<out>/gpu_check.txt`` too (``--out``, default
benchmarks/results). Where ``torch.cuda.is_available()`` is False the check prints one
line and exits 0. ``--device cpu`` is its dry run: the same steps on the CPU at tiny sizes
(the tests marked ``cuda`` through ``AUTOMETA_CUDA_TESTS_DEVICE=cpu``), written under a
temporary folder unless ``--out`` is given: it proves the script on a machine without a
GPU.

    make gpu-check                              # python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --device cpu # the dry run (~2 min on 2 busy cores)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: conftest.CUDA_TESTS_DEVICE: the device the tests marked ``cuda`` run on instead.
TESTS_DEVICE_ENV = "AUTOMETA_CUDA_TESTS_DEVICE"
SKIPPED = "no CUDA device: gpu-check skipped"


@dataclass(frozen=True)
class Sizes:
    """Each step's time limit (seconds) and settings, on a GPU or in the CPU dry run."""

    tests_s: int
    search_s: int
    speed_s: int
    precision_s: int  # both runs of the precision step together
    search: Sequence[str]  # `autometa run` options beyond the fixed ones
    trials: int
    speed: Sequence[str]  # speed.py options


#: On a GPU: limits summing to 8 minutes (the steps take ~1 + 1.5 + 3 + 0.5 expected).
CUDA = Sizes(
    tests_s=115, search_s=110, speed_s=190, precision_s=65,
    search=["--meta-steps", "60", "--eval-every", "30",
            "--task-param", "train_classes=200", "--task-param", "val_classes=50",
            "--task-param", "test_classes=50", "--task-param", "val_episodes=50",
            "--task-param", "test_episodes=100", "--param", "maml.meta_batch_size=10",
            "--param", "maml.inner_steps=1"],
    trials=4,
    speed=["--models", "sinusoid,conv4", "--inner-steps", "1,5", "--repeats", "3",
           "--min-seconds", "0.5", "--sinusoid-batches", "2"])
#: The CPU dry run: the same steps, tiny.
DRY_RUN = Sizes(
    tests_s=240, search_s=180, speed_s=120, precision_s=180,
    search=["--meta-steps", "4", "--eval-every", "2",
            "--task-param", "train_classes=20", "--task-param", "val_classes=10",
            "--task-param", "test_classes=10", "--task-param", "val_episodes=4",
            "--task-param", "test_episodes=4", "--task-param", "queries=2",
            "--param", "maml.meta_batch_size=4", "--param", "maml.inner_steps=1",
            "--param", "conv4.channels=32", "--threads", "1"],
    trials=2,
    speed=["--models", "sinusoid,conv4", "--inner-steps", "1", "--repeats", "1",
           "--min-seconds", "0", "--sinusoid-batches", "1", "--conv4-channels", "4",
           "--conv4-meta-batch", "2", "--conv4-side", "8", "--pool-classes", "10",
           "--check-tasks", "2"])


@dataclass
class Log:
    """Prints each line and keeps it, for the results file."""

    lines: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, text: str = "") -> None:
        with self.lock:
            for line in text.splitlines() or [""]:
                print(line, flush=True)
                self.lines.append(line)


def run_process(cmd: Sequence[str], log: Log, *, timeout: float, cwd: Path = ROOT,
                env: dict[str, str] | None = None) -> tuple[int | None, float]:
    """Run ``cmd``, its output (stdout and stderr) logged line by line as it comes.

    Returns (exit status or None when it ran past ``timeout`` seconds and its process
    group was killed, seconds taken).
    """
    log(f"$ {' '.join(cmd)}")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    assert proc.stdout is not None
    stream = proc.stdout
    reader = threading.Thread(target=lambda: [log(line.rstrip("\n")) for line in stream],
                              daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Its workers too (a search's pool): the whole group it leads.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
        log(f"!! killed after its limit of {timeout:.0f} s")
    reader.join(timeout=10)
    return rc, time.monotonic() - start


# --------------------------------------------------------------------------- the steps


def step_device(device: str, log: Log) -> bool:
    """The device and the versions."""
    import torch

    log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}, Python {sys.version.split()[0]}")
    if torch.device(device).type != "cuda":
        from harness import cpu_model

        log(f"device: {device} ({cpu_model()}, {os.cpu_count()} cores), dry run")
        return True
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    major, minor = torch.cuda.get_device_capability(index)
    log(f"device: cuda:{index} {torch.cuda.get_device_name(index)}, capability "
        f"{major}.{minor}, {props.total_memory / 2**30:.1f} GiB, "
        f"{torch.cuda.device_count()} visible GPU(s)")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        log(f"nvidia-smi: {smi.stdout.strip()}")
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"nvidia-smi: not run ({type(exc).__name__})")
    return torch.cuda.is_available()


def step_tests(device: str, sizes: Sizes, log: Log, work: Path) -> bool:
    """The tests marked ``cuda``: they pass only if some ran, none failed or skipped."""
    report = work / "cuda-tests.xml"
    env = {TESTS_DEVICE_ENV: device}  # CUDA's default device, cuda:N or the dry run's CPU
    # Only the modules holding such tests are collected: faster, and a module that needs
    # a package this machine lacks (a browser driver, a database client) cannot fail it.
    modules = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
               if "mark.cuda" in p.read_text(encoding="utf-8")]
    rc, _ = run_process([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs",
                         "-p", "no:cacheprovider", f"--junitxml={report}", *modules],
                        log, timeout=sizes.tests_s, env=env)
    if rc is None or not report.exists():
        return False
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    log(f"tests marked cuda: {counts}")
    return rc == 0 and counts["tests"] > 0 and counts["skipped"] == 0 \
        and counts["failures"] == counts["errors"] == 0


def step_search(device: str, sizes: Sizes, log: Log, work: Path) -> bool:
    """A 2-worker search sharing the device; every trial ran there, from two workers."""
    # "cuda": every visible GPU; on a machine with one, both workers share it.
    devices = "cuda" if device == "cuda" else device
    storage = f"sqlite:///{work / 'search.db'}"
    cmd = [sys.executable, "-m", "autometa", "run", "--task", "glyphs", "--algorithms", "maml",
           "--sources", "conv4", "--devices", devices, "--workers", "2",
           "--trials", str(sizes.trials), "--pruner", "none", "--no-baselines",
           "--no-progress", "--study", "gpu-check", "--storage", storage,
           "--artifacts", str(work / "artifacts"), "--out", str(work / "reports"),
           *sizes.search]
    rc, seconds = run_process(cmd, log, timeout=sizes.search_s, cwd=work,
                              env={"AUTOMETA_CACHE_DIR": str(work / "cache")})
    if rc != 0:
        return False
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name="gpu-check", storage=storage).trials
    rows, ok = [], len(trials) == sizes.trials
    for t in trials:
        who = t.user_attrs.get("worker") or {}
        peak = t.user_attrs.get("peak_mem_mb")
        on_device = str(who.get("device", "")).split(":")[0] == device.split(":")[0]
        fine = t.state.name == "COMPLETE" and on_device and (
            peak is not None and peak > 0 if device.startswith("cuda") else True)
        ok &= fine
        rows.append(f"  trial {t.number}: {t.state.name}, worker {who.get('worker')} "
                    f"(pid {who.get('pid')}) on {who.get('device')}, peak memory "
                    f"{peak} MiB, meta-val {t.value}, fit {t.user_attrs.get('fit_time_s')} s"
                    f"{'' if fine else '  <- not as expected'}")
    pids = {(t.user_attrs.get("worker") or {}).get("pid") for t in trials}
    log("\n".join(rows))
    log(f"search: {len(trials)} trial(s) in {seconds:.1f} s, run by {len(pids)} worker "
        "process(es)")
    return ok and len(pids) == 2


def step_precision(device: str, sizes: Sizes, log: Log, work: Path) -> bool:
    """One trial of the search step's settings in float32, then in bf16; both scored."""
    storage = f"sqlite:///{work / 'precision.db'}"
    scores: dict[str, tuple[float, float]] = {}
    ok, deadline = True, time.monotonic() + sizes.precision_s
    for precision in ("float32", "bf16"):
        study = f"precision-{precision}"
        cmd = [sys.executable, "-m", "autometa", "run", "--task", "glyphs", "--algorithms",
               "maml", "--sources", "conv4", "--device", device, "--precision", precision,
               "--trials", "1", "--pruner", "none", "--no-baselines", "--initial",
               "portfolio", "--top-k", "1", "--no-progress", "--study", study,
               "--storage", storage, "--artifacts", str(work / "artifacts"),
               "--out", str(work / "reports"), *sizes.search]
        rc, _ = run_process(cmd, log, timeout=max(1.0, deadline - time.monotonic()), cwd=work,
                            env={"AUTOMETA_CACHE_DIR": str(work / "cache")})
        if rc != 0:
            return False
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        trial = optuna.load_study(study_name=study, storage=storage).trials[0]
        test = trial.user_attrs.get("test_mean")
        ok &= (trial.state.name == "COMPLETE" and test is not None
               and trial.user_attrs.get("precision") == precision)
        scores[precision] = (float("nan") if test is None else float(test),
                             float(trial.user_attrs.get("fit_time_s") or float("nan")))
        log(f"  {precision}: meta-test accuracy {scores[precision][0]:.4f} "
            f"(±{trial.user_attrs.get('test_ci95') or float('nan'):.4f}), meta-training "
            f"{scores[precision][1]:.2f} s, recorded precision "
            f"{trial.user_attrs.get('precision')!r}")
    (acc32, s32), (acc16, s16) = scores["float32"], scores["bf16"]
    log(f"precision: bf16 - float32 meta-test accuracy {acc16 - acc32:+.4f}; meta-training "
        f"{s32:.2f} s in float32, {s16:.2f} s in bf16 ({s32 / s16 if s16 else float('nan'):.2f}x)")
    return ok


def step_speed(device: str, sizes: Sizes, log: Log, out: Path, name: str) -> bool:
    """speed.py on the device; passes if it wrote its results and autometa's
    meta-gradients agree with the float64 reference's."""
    rc, _ = run_process([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device",
                         device, "--out", str(out), "--name", name, *sizes.speed],
                        log, timeout=sizes.speed_s)
    result_file = out / f"{name}.json"
    if rc != 0 or not result_file.exists():
        return False
    result = json.loads(result_file.read_text())
    grads = [g for g in result["gradients"] if g["contender"].startswith("autometa")]
    agree = all(g["agrees"] is not False for g in grads)
    for row in result["summary"]:
        peer = row["autometa_over_fastest_peer"]
        log(f"speed {row['model']}, {row['inner_steps']} inner step(s): autometa "
            f"{row['autometa_tasks_per_s']:.0f} tasks/s; fastest peer "
            f"{row['fastest_peer'] or 'none installed'}"
            + (f", ratio {peer:.2f}x" if peer is not None else ""))
    if result["unavailable"]:
        log(f"peers not installed: {', '.join(result['unavailable'])}")
    log(f"autometa's meta-gradients agree with the float64 reference: {agree}")
    return agree


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda",
                        help="cuda (or cuda:N), or cpu for the dry run at tiny sizes")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; a temporary "
                             "folder in the dry run)")
    args = parser.parse_args(argv)
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(SKIPPED)
        return 0
    sizes = CUDA if cuda else DRY_RUN
    out = args.out or (RESULTS if cuda else Path(tempfile.mkdtemp(prefix="gpu-check-")))
    stem = "gpu_check" if cuda else f"gpu_check_dryrun_{args.device}"
    log = Log()
    log(f"autometa gpu-check on {args.device}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness import git_commit

    log(f"autometa commit {git_commit()}; step limits: tests {sizes.tests_s} s, search "
        f"{sizes.search_s} s, speed {sizes.speed_s} s, precision {sizes.precision_s} s")
    steps: list[tuple[str, Callable[[Path], bool]]] = [
        ("device", lambda work: step_device(args.device, log)),
        ("tests", lambda work: step_tests(args.device, sizes, log, work)),
        ("search", lambda work: step_search(args.device, sizes, log, work)),
        ("speed", lambda work: step_speed(args.device, sizes, log, out,
                                          "speed_cuda" if cuda else f"speed_dryrun_{args.device}")),
        ("precision", lambda work: step_precision(args.device, sizes, log, work)),
    ]
    verdicts: list[tuple[str, bool, float]] = []
    start = time.monotonic()
    for name, run in steps:
        log(f"\n=== {name}")
        began = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as work:
            try:
                passed = run(Path(work))
            except Exception as exc:  # a step's own bug must not stop the others
                log(f"!! {type(exc).__name__}: {exc}")
                passed = False
        verdicts.append((name, passed, time.monotonic() - began))
        log(f"=== {name}: {'PASS' if passed else 'FAIL'} ({verdicts[-1][2]:.1f} s)")
    total = time.monotonic() - start
    log("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {name:<9} {s:6.1f} s"
                         for name, ok, s in verdicts))
    failed = [name for name, ok, _ in verdicts if not ok]
    log(f"gpu-check {'FAILED: ' + ', '.join(failed) if failed else 'PASSED'} in {total:.1f} s")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.txt"
    path.write_text("\n".join(log.lines) + "\n")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
