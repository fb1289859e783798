"""Pretrained source model: supervised pre-training on digits' meta-train classes, cached,
once per cache file however many processes need it."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from limits import POOL_SEARCH, QUICK_SUBPROCESS, STOPPED_PROCESS
from sklearn.linear_model import LogisticRegression

from autometa import ConfigError, PluginError, Task, create_host
from autometa.study.trials import TrialPlan
from autometa.trial import build
from autometa_plugins import maml
from autometa_plugins import pretrained as pretrained_plugin
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.csvfile.task import CSVTask
from autometa_plugins.digits.task import Digits
from autometa_plugins.pretrained import model as pretrained
from autometa_plugins.pretrained.model import Pretrained
from autometa_plugins.sinusoid.task import Sinusoid

FAST = {"backbone": "conv4", "backbone_params": {"channels": 8}, "steps": 60}


@pytest.fixture(scope="module")
def task():
    t = Digits(ways=5, shots=1, queries=5, val_episodes=4, test_episodes=4)
    t.identity = {"task": "digits", "params": {"val_episodes": 4}, "seed": 0}
    return t


@pytest.fixture
def calls(monkeypatch):
    """Counts pre-training runs."""
    counter = []
    original = pretrained.pretrain

    def counting(*args, **kwargs):
        counter.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrained, "pretrain", counting)
    return counter


def probe_accuracy(features, task) -> float:
    """Linear probe on the meta-train classes: fit on 300 examples, score on 300 others."""
    x, y = task.sample_labelled(600, torch.Generator().manual_seed(123))
    with torch.no_grad():
        f = features(x)
    clf = LogisticRegression(max_iter=500).fit(f[:300], y[:300])
    return clf.score(f[300:], y[300:])


def test_prepare_pretrains_caches_and_builds(task, tmp_path, calls):
    source = Pretrained(**FAST, cache_dir=str(tmp_path))
    source.prepare(task)
    model = source.build(task.spec)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 5)  # fresh head for 5-way episodes
    path = source.cache_path(task)
    assert path.parent == tmp_path and path.name.startswith("pretrained-conv4-")
    saved = torch.load(path, map_location="cpu", weights_only=True)  # a plain state_dict
    assert saved.keys() == model.features.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.features.state_dict().items())
    key = json.loads(path.with_suffix(".json").read_text())
    assert key["task"]["task"] == "digits" and key["steps"] == 60
    assert len(calls) == 1


def test_second_prepare_reuses_the_cache(task, tmp_path, calls):
    Pretrained(**FAST, cache_dir=str(tmp_path)).prepare(task)
    path = Pretrained(**FAST, cache_dir=str(tmp_path)).cache_path(task)
    written = path.stat().st_mtime_ns
    again = Pretrained(**FAST, cache_dir=str(tmp_path))  # a later trial, or a later search
    again.prepare(task)
    assert len(calls) == 1
    assert path.stat().st_mtime_ns == written
    assert again.build(task.spec)(torch.rand(2, 1, 8, 8)).shape == (2, 5)


def test_cache_key_covers_task_backbone_and_settings(task, tmp_path):
    base = Pretrained(**FAST, cache_dir=str(tmp_path))
    other_task = Digits(ways=5, shots=1, queries=5, val_episodes=4, test_episodes=4, seed=1)
    other_task.identity = {**task.identity, "seed": 1}
    variants = [
        Pretrained(**{**FAST, "steps": 61}, cache_dir=str(tmp_path)),
        Pretrained(**{**FAST, "backbone_params": {"channels": 4}}, cache_dir=str(tmp_path)),
        Pretrained(**{**FAST, "lr": 0.01}, cache_dir=str(tmp_path)),
        Pretrained(**{**FAST, "seed": 1}, cache_dir=str(tmp_path)),
    ]
    paths = {base.cache_path(task), base.cache_path(other_task),
             *(v.cache_path(task) for v in variants)}
    assert len(paths) == 6
    assert Pretrained(**FAST, cache_dir=str(tmp_path)).cache_path(task) == base.cache_path(task)


def test_cache_directory_from_the_environment(task, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOMETA_CACHE", str(tmp_path / "env-cache"))
    assert Pretrained(**FAST).cache_path(task).parent == tmp_path / "env-cache"
    monkeypatch.delenv("AUTOMETA_CACHE")
    assert str(Pretrained(**FAST).cache_path(task).parent) == "autometa-cache"


def test_seeded_deterministic_and_a_cache_hit_builds_the_same_network(task, tmp_path):
    def build(cache: str) -> torch.nn.Module:
        torch.manual_seed(7)  # what the engine does before prepare() and build()
        source = Pretrained(**FAST, cache_dir=str(tmp_path / cache))
        source.prepare(task)
        return source.build(task.spec)

    first, second, hit = build("a"), build("b"), build("a")
    for other in (second, hit):
        for (name, p), q in zip(first.state_dict().items(), other.state_dict().values(),
                                strict=True):
            assert torch.equal(p, q), name


def test_pretraining_improves_the_features(task, tmp_path):
    source = Pretrained(**FAST, cache_dir=str(tmp_path))
    source.prepare(task)
    trained = probe_accuracy(source.build(task.spec).features, task)
    torch.manual_seed(0)
    random = probe_accuracy(Conv4(channels=8).build(task.spec).features, task)
    assert trained > 0.85  # 5 classes: chance is 0.2
    assert trained > random + 0.1


def test_a_task_without_labelled_meta_train_data_is_refused(tmp_path):
    task = Sinusoid(val_episodes=2, test_episodes=2)
    task.identity["task"] = "sinusoid"
    with pytest.raises(ConfigError, match=r"pretrained: task 'sinusoid' has no labelled "
                                          r"meta-train classes \(train_classes = 0\)"):
        Pretrained(backbone="mlp", cache_dir=str(tmp_path)).prepare(task)


def test_a_backbone_that_cannot_serve_the_task_is_refused_naming_both(task, tmp_path):
    class FlatDigits(Digits):
        input_shape = (64,)

    flat = FlatDigits(val_episodes=2, test_episodes=2)
    flat.identity["task"] = "flat-digits"
    with pytest.raises(ConfigError, match=r"pretrained: backbone 'conv4' cannot serve task "
                                          r"'flat-digits': it accepts inputs of rank \[3\]"):
        Pretrained(**FAST, cache_dir=str(tmp_path)).prepare(flat)


def test_configuration_errors(task, tmp_path):
    with pytest.raises(PluginError, match=r"unknown source model 'conv5'"):
        Pretrained(backbone="conv5")
    with pytest.raises(ConfigError, match=r"backbone_params \{'width': 3\} do not fit"):
        Pretrained(backbone="conv4", backbone_params={"width": 3})
    with pytest.raises(ConfigError, match="pretrained.optimizer: 'rmsprop'"):
        Pretrained(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="pretrained.steps: expected a positive integer"):
        Pretrained(steps=0)
    with pytest.raises(RuntimeError, match=r"needs prepare\(task\) first"):
        Pretrained(**FAST, cache_dir=str(tmp_path)).build(task.spec)


def test_the_engine_prepares_and_builds_it_in_a_trial(task, tmp_path, calls):
    host = create_host(entry_points=False,
                       plugins={"maml": maml, "pretrained": pretrained_plugin})
    plan = TrialPlan("maml", "pretrained", source_params={**FAST, "cache_dir": str(tmp_path)})
    first = build(host, task, plan, seed=1)
    second = build(host, task, plan, seed=2)
    assert len(calls) == 1
    assert torch.equal(first.model.features[0].weight, second.model.features[0].weight)
    assert not torch.equal(first.model.head.weight, second.model.head.weight)  # trial-seeded


# -- caches keyed on content: the data pre-training saw and the class split ---------------
TINY = {"backbone": "mlp", "backbone_params": {"hidden": 8, "layers": 1}, "steps": 3,
        "batch_size": 8}


def write_rows(path, classes, rows_per_class: int = 6, mode: str = "w") -> None:
    """Rows of classes ``c0, c1, ...`` (numbers ``classes``) with two seeded features."""
    rng = np.random.default_rng(len(classes))
    with open(path, mode) as file:
        if mode == "w":
            file.write("a,b,label\n")
        for c in classes:
            for _ in range(rows_per_class):
                file.write(f"{rng.normal(c):.4f},{rng.normal(-c):.4f},c{c}\n")


def csv_task(path) -> CSVTask:
    task = CSVTask(path=str(path), target="label", episodes="few-shot", ways=2, shots=1,
                   queries=2, val_classes=2, test_classes=2, val_episodes=2, test_episodes=2)
    task.identity = {"task": "csv", "params": {"path": str(path)}, "seed": 0}  # as the engine
    return task


def test_appending_classes_to_the_csv_file_gives_another_cache_file(tmp_path, calls):
    data = tmp_path / "data.csv"
    write_rows(data, range(6))
    before = csv_task(data)
    source = Pretrained(**TINY, cache_dir=str(tmp_path / "cache"))
    source.prepare(before)
    first = source.cache_path(before)
    assert first.is_file() and len(calls) == 1

    unchanged = csv_task(data)  # the same file, read again (a later search)
    assert Pretrained(**TINY, cache_dir=str(tmp_path / "cache")).cache_path(unchanged) == first
    Pretrained(**TINY, cache_dir=str(tmp_path / "cache")).prepare(unchanged)
    assert len(calls) == 1  # reused

    write_rows(data, range(6, 10), mode="a")  # new classes: the class split moves
    after = csv_task(data)
    assert after.identity == before.identity  # what the old key was made of
    assert set(after.classes["train"]) != set(before.classes["train"])
    again = Pretrained(**TINY, cache_dir=str(tmp_path / "cache"))
    again.prepare(after)
    assert again.cache_path(after) != first
    assert len(calls) == 2 and len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_changed_meta_train_values_give_another_cache_file(tmp_path):
    data = tmp_path / "data.csv"
    write_rows(data, range(6))
    source = Pretrained(**TINY, cache_dir=str(tmp_path))
    first = source.cache_path(csv_task(data))
    task = csv_task(data)
    row = int(task.rows["train"][0]) + 2  # +1 for the header, +1: lines count from 1
    lines = data.read_text().splitlines()
    cells = lines[row - 1].split(",")
    lines[row - 1] = ",".join([str(float(cells[0]) + 1.0), *cells[1:]])
    data.write_text("\n".join(lines) + "\n")
    assert source.cache_path(csv_task(data)) != first


def test_a_damaged_cache_file_is_pre_trained_again(task, tmp_path, calls, caplog):
    source = Pretrained(**FAST, cache_dir=str(tmp_path))
    path = source.cache_path(task)
    path.write_bytes(b"not a tensor file")
    with caplog.at_level("WARNING", logger="autometa_plugins.pretrained.model"):
        source.prepare(task)
    assert len(calls) == 1
    assert any("ignoring the cache file" in r.getMessage() for r in caplog.records)
    assert torch.load(path, weights_only=True).keys() == source.build(
        task.spec).features.state_dict().keys()


def test_a_task_without_a_digest_is_keyed_on_a_sample_of_its_labelled_pool(task, tmp_path):
    class Plain(Task):
        """A third-party task: sample_labelled only."""

        kind, input_shape, output_size, train_classes = "classification", (2,), 2, 2

        def __init__(self, shift: float) -> None:
            super().__init__()
            self.shift = shift

        def sample_labelled(self, n, generator):
            y = torch.randint(2, (n,), generator=generator)
            return torch.rand(n, 2, generator=generator) + self.shift * y[:, None], y

        sample = meta_val = meta_test = None

    source = Pretrained(**TINY, cache_dir=str(tmp_path))
    assert source.cache_path(Plain(1.0)) == source.cache_path(Plain(1.0))
    assert source.cache_path(Plain(1.0)) != source.cache_path(Plain(2.0))


def test_a_backbone_that_cannot_serve_the_task_is_refused_before_anything_is_stored(
        tmp_path) -> None:
    """conv4 on iris' rows: left out of a search that names no sources (it used to run,
    and fail every trial on it, baselines included), one clear error when named."""
    from autometa.config import SearchConfig
    from autometa.engine.prepare import prepare

    host = create_host()
    unnamed = prepare(SearchConfig(task="iris", cache_dir=str(tmp_path)), host)
    assert "pretrained" not in unnamed.sources and "mlp" in unnamed.sources
    with pytest.raises(ConfigError, match=r"source model 'pretrained' cannot be used here: it "
                                          r"has a backbone \('conv4'\) that accepts inputs of "
                                          r"rank \[3\]"):
        prepare(SearchConfig(task="iris", sources=["pretrained"], cache_dir=str(tmp_path)),
                host)
    assert not list(tmp_path.iterdir())  # nothing stored


# -- one pre-training per cache file, however many processes need it ---------------------
PROCESS = """
import hashlib, logging, os, sys, time
from autometa import work
from autometa_plugins.digits.task import Digits
from autometa_plugins.pretrained.model import Pretrained

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # to stderr
cache, backbone, steps, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
params = {"channels": 8} if backbone == "conv4" else {}


def holding(what, done, total):
    # A display's reporter: says each report; at the first one, while this process holds
    # the lock in the middle of pre-training, waits for the test's file "hold".
    print(f"report {what} {done}/{total}", file=sys.stderr, flush=True)
    while done == 0 and not os.path.exists(hold):
        time.sleep(0.05)


task = Digits(ways=5, shots=1, queries=5, val_episodes=4, test_episodes=4)
source = Pretrained(backbone=backbone, backbone_params=params, steps=steps, cache_dir=cache)
with work.reporting(holding if hold != "-" else None):
    source.prepare(task)
state = source.build(task.spec).features.state_dict()
weights = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
stat = source.cache_path(task).stat()
print(weights, stat.st_ino, stat.st_mtime_ns, flush=True)
"""


class Running:
    """A process whose stdout and stderr are read as they come (threads), so that a test
    can wait for a line in its stderr."""

    def __init__(self, args: list[str], **kwargs) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, **kwargs)
        self.out: list[str] = []
        self.err: list[str] = []
        self.ended = 0
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=pair, daemon=True)
                        for pair in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self.changed:
                lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.ended += 1
            self.changed.notify_all()

    def count(self, text: str) -> int:
        """Lines of stderr so far that hold ``text``."""
        return sum(text in line for line in self.err)

    def wait_for(self, text: str, times: int = 1) -> None:
        """Until ``times`` lines of stderr hold ``text`` (fails if the process ends first)."""
        with self.changed:
            self.changed.wait_for(lambda: self.count(text) >= times or self.ended == 2,
                                  timeout=POOL_SEARCH)
            assert self.count(text) >= times, (text, self.err)

    def finish(self, timeout: float = QUICK_SUBPROCESS) -> tuple[str, str]:
        """Its stdout and stderr once it has ended (0: asserted)."""
        self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=STOPPED_PROCESS)
        out, err = "\n".join(self.out), "\n".join(self.err)
        assert self.proc.returncode == 0, err
        return out, err


def preparing(tmp_path, *, hold: str = "-", backbone: str = "conv4") -> Running:
    """A process calling ``Pretrained.prepare`` on digits (20 steps); with ``hold``, its
    pre-training (if it pre-trains) stops at step 0, the lock held, until the file ``hold``
    exists."""
    script = tmp_path / "prepare.py"
    script.write_text(PROCESS)
    return Running([sys.executable, str(script), str(tmp_path / "cache"), backbone, "20",
                    hold])


WAITING = "pretrained conv4: another process is pre-training it (cache file "
WAITING_FILE = re.compile(r"\(cache file (\S+)\); waiting$", re.M)
STARTED = "pre-training conv4: 0/20"  # work.report's line at the start, without a reporter


def test_two_processes_pre_train_once_and_the_second_waits_with_one_line(tmp_path):
    first = preparing(tmp_path, hold=str(tmp_path / "go"))
    first.wait_for("report pre-training conv4 0/20")  # it holds the lock, pre-training
    second = preparing(tmp_path)
    second.wait_for(WAITING)
    (tmp_path / "go").touch()
    (out, trained), (again, log) = first.finish(), second.finish()
    assert out == again  # the same weights, and the cache file written once
    assert log.count(WAITING) == 1 and "autometa.cache: " + WAITING in log
    assert STARTED not in log and "reusing" in log  # it waited; it never trained
    reports = [line for line in trained.splitlines() if line.startswith("report ")]
    assert reports[0] == "report pre-training conv4 0/20"
    assert reports[-1] == "report pre-training conv4 20/20"  # steps as they go, to the end
    path = Path(WAITING_FILE.search(log).group(1))
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, path.with_suffix(".json").name, f"{path.name}.lock"])  # no second .tmp


def test_a_killed_pre_trainer_leaves_no_stale_lock_and_the_waiter_pre_trains(tmp_path):
    first = preparing(tmp_path, hold=str(tmp_path / "never"))
    first.wait_for("report pre-training conv4 0/20")
    second = preparing(tmp_path)
    second.wait_for(WAITING)
    first.proc.kill()
    first.proc.wait(timeout=STOPPED_PROCESS)
    out, log = second.finish()
    assert log.count(WAITING) == 1 and STARTED in log  # it took over
    path = Path(WAITING_FILE.search(log).group(1))
    with open(f"{path}.lock", "a") as lock:  # free: nobody holds it any more
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    later, quiet = preparing(tmp_path).finish()  # a later trial: reads the cache, no wait
    assert later == out and "reusing" in quiet
    assert WAITING not in quiet and STARTED not in quiet
    assert not list(path.parent.glob("*.tmp"))


def test_an_unusable_cache_directory_is_one_line_naming_it(task, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    source = Pretrained(**FAST, cache_dir=str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"pretrained: the cache directory '.*file' cannot "
                                          r"hold the pre-trained features \(.*\); set "
                                          r"cache_dir \(or \$AUTOMETA_CACHE\)"):
        source.prepare(task)


@pytest.mark.slow  # a CLI search with two worker processes
def test_a_two_worker_search_waits_once_per_worker_not_per_trial(tmp_path):
    """Both workers of a search reach the same pre-training while another process (another
    search; here the helper) pre-trains it: each says so once, their later trials read the
    cache without a word, and nobody trains it again (the file is the other process's)."""
    other = preparing(tmp_path, hold=str(tmp_path / "go"), backbone="mlp")
    other.wait_for("report pre-training mlp 0/20")
    search = Running(
        [sys.executable, "-m", "autometa", "run", "--task", "digits", "--algorithms",
         "protonet", "--sources", "pretrained", "--param", "pretrained.backbone=mlp",
         "--param", "pretrained.steps=20", "--workers", "2", "--trials", "4",
         "--meta-steps", "4", "--eval-every", "2", "--pruner", "none", "--top-k", "1",
         "--no-progress", "--task-param", "val_episodes=4", "--task-param",
         "test_episodes=4"],
        cwd=tmp_path, env={**os.environ, "AUTOMETA_CACHE": str(tmp_path / "cache"),
                           "COLUMNS": "200"})
    waiting = "pretrained mlp: another process is pre-training it"
    search.wait_for(waiting, times=2)  # both workers, in their first trials
    (tmp_path / "go").touch()
    written = other.finish()[0].split()
    out, log = search.finish(POOL_SEARCH)
    lines = [line for line in log.splitlines() if waiting in line]
    assert sorted(line.split(":")[0] for line in lines) == [
        "WARNING worker 0", "WARNING worker 1"], lines
    cached = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 1
    stat = cached[0].stat()
    assert [str(stat.st_ino), str(stat.st_mtime_ns)] == written[1:]  # never written again
    assert re.search(r"│ pretrained +│.*│ 4 complete, 0 pruned, 0 failed │", out), out
