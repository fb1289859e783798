"""Checkpoint source model: weights from a local file, weights_only loading, clear errors."""

from __future__ import annotations

import os
import pickle
import re
import threading
from pathlib import Path

import pytest
import torch
from limits import IN_PROCESS_CALL
from torch import nn

from autometa import Backbone, ConfigError, DataError, PluginError, TaskSpec
from autometa.weights import read_state_dict
from autometa_plugins.checkpoint.model import Checkpoint
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.sinusoid.task import Sinusoid

SPEC = TaskSpec("classification", (1, 8, 8), 5)
X = torch.rand(6, 1, 8, 8)


class Custom:
    """Not a tensor: torch.save pickles it, and weights_only loading refuses it."""


def conv4(channels: int = 8, outputs: int = 5, seed: int = 1) -> Backbone:
    torch.manual_seed(seed)
    return Conv4(channels=channels).build(TaskSpec("classification", (1, 8, 8), outputs))


def save(obj, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


def make_features(width: int = 6) -> nn.Module:
    """A plain feature extractor, as a ``module:factory`` architecture."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU())


def make_backbone(spec: TaskSpec, hidden: int = 6) -> Backbone:
    """A factory that takes the task's spec and returns a whole Backbone."""
    return Backbone(make_features(hidden), nn.Linear(hidden, spec.output_size))


@pytest.mark.parametrize("layout", ["raw", "model", "state_dict"])
def test_round_trip_gives_identical_outputs(tmp_path, layout):
    saved = conv4()
    state = saved.state_dict()
    wrapped = {"raw": state, "model": {"model": state, "step": 3},
               "state_dict": {"state_dict": state}}[layout]
    path = save(wrapped, tmp_path / "conv4.pt")
    torch.manual_seed(99)  # a different initialisation: everything must come from the file
    loaded = Checkpoint(path=path, arch="conv4", arch_params={"channels": 8}).build(SPEC)
    assert torch.equal(loaded(X), saved(X))


def test_architecture_by_module_path(tmp_path):
    from autometa_plugins.resnet12.model import ResNet12

    torch.manual_seed(0)
    saved = ResNet12(channels="4-4-8-8").build(SPEC)
    path = save(saved.state_dict(), tmp_path / "r12.pt")
    source = Checkpoint(path=path, arch="autometa_plugins.resnet12.model:ResNet12",
                        arch_params={"channels": "4-4-8-8"})
    assert torch.equal(source.build(SPEC)(X), saved(X))


def test_factory_returning_a_plain_module_gets_a_fresh_head(tmp_path):
    features = make_features()
    path = save(features.state_dict(), tmp_path / "features.pt")
    model = Checkpoint(path=path, arch=f"{__name__}:make_features").build(SPEC)
    assert torch.equal(model.features(X), features(X))
    assert model(X).shape == (6, 5)


def test_factory_receives_the_spec_and_arch_params(tmp_path):
    saved = make_backbone(SPEC, hidden=3)
    path = save({"model": saved.state_dict()}, tmp_path / "bb.pt")
    model = Checkpoint(path=path, arch=f"{__name__}:make_backbone",
                       arch_params={"hidden": 3}).build(SPEC)
    assert torch.equal(model(X), saved(X))


def test_a_trial_artifact_loads(tmp_path):
    """autometa saves trials as {"model": Backbone.state_dict(), ...}: a valid checkpoint."""
    saved = conv4()
    path = save({"model": saved.state_dict(), "lrs": {"x": torch.ones(1)}}, tmp_path / "t.pt")
    loaded = Checkpoint(path=path, arch_params={"channels": 8}).build(SPEC)
    assert torch.equal(loaded(X), saved(X))


def test_pickled_code_is_refused_with_the_reason_and_the_remedy(tmp_path):
    path = save({"model": conv4().state_dict(), "extra": Custom()}, tmp_path / "pickled.pt")
    with pytest.raises(DataError) as info:  # at construction: in preparation, not trial 0
        Checkpoint(path=path, arch_params={"channels": 8})
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "pickled.pt") in message
    assert "Custom" in message  # what the file would have run
    assert "can execute arbitrary code" in message
    assert "set checkpoint.trust_pickle=true" in message
    assert "--param checkpoint.trust_pickle=true" in message
    assert "weights_only" not in message  # never torch's advice to load it unsafely


def test_trust_pickle_loads_it(tmp_path):
    saved = conv4()
    path = save({"model": saved.state_dict(), "extra": Custom()}, tmp_path / "pickled.pt")
    loaded = Checkpoint(path=path, arch_params={"channels": 8}, trust_pickle=True).build(SPEC)
    assert torch.equal(loaded(X), saved(X))


def test_trust_pickle_accepts_a_whole_pickled_module(tmp_path):
    saved = conv4()
    path = save(saved, tmp_path / "module.pt")
    with pytest.raises(DataError, match="pickled Python objects"):
        read_state_dict(path)
    state = read_state_dict(path, trust_pickle=True)
    assert state.keys() == saved.state_dict().keys()


def test_mismatched_tensors_are_listed_in_one_error(tmp_path):
    path = save(conv4(channels=8).state_dict(), tmp_path / "c8.pt")
    with pytest.raises(ConfigError) as info:
        Checkpoint(path=path, arch_params={"channels": 16}).build(SPEC)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"weights file '{tmp_path / 'c8.pt'}' does not fit architecture "
                              "'conv4': 17 mismatch(es): features.0.weight is [8, 1, 3, 3] in "
                              "the file, [16, 1, 3, 3] in the model; ")
    assert "(and 12 more)" in message
    assert "set 'arch' and its parameters" in message


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = conv4().state_dict()
    state["features.99.weight"] = torch.zeros(1)
    del state["features.4.bias"]
    path = save(state, tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match=r"2 mismatch\(es\): missing features\.4\.bias; "
                                          r"unexpected features\.99\.weight;"):
        Checkpoint(path=path, arch_params={"channels": 8}).build(SPEC)


def test_only_the_head_differs_keeps_features_and_a_fresh_head(tmp_path):
    saved = conv4(outputs=10)  # e.g. pre-trained on 10 classes
    path = save(saved.state_dict(), tmp_path / "ten.pt")
    model = Checkpoint(path=path, arch_params={"channels": 8}).build(SPEC)
    assert torch.equal(model.features(X), saved.features(X))
    assert model(X).shape == (6, 5)
    with pytest.raises(ConfigError, match=r"head\.weight is \[10, 8\] in the file, \[5, 8\] "
                                          r"in the model.*set replace_head=True"):
        Checkpoint(path=path, arch_params={"channels": 8}, replace_head=False).build(SPEC)


def test_features_only_file_with_replace_head(tmp_path):
    saved = conv4()
    state = {k: v for k, v in saved.state_dict().items() if k.startswith("features.")}
    path = save(state, tmp_path / "features.pt")
    model = Checkpoint(path=path, arch_params={"channels": 8}).build(SPEC)
    assert torch.equal(model.features(X), saved.features(X))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"weights file 'nowhere\.pt' does not exist \(relative "
                                          r"to .*\); set 'path' to a local file"):
        Checkpoint(path="nowhere.pt").build(SPEC)
    with pytest.raises(ConfigError, match="checkpoint.path: no weights file given"):
        Checkpoint()


def test_not_a_torch_file_and_not_a_state_dict(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(DataError, match=r"weights file '.*junk\.pt' is corrupt or not a torch "
                                        r"tensor file \(KeyError: 101\); replace it with a file "
                                        r"saved by torch\.save"):
        read_state_dict(junk)
    listed = save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(DataError, match=r"holds a list; expected a state_dict"):
        read_state_dict(listed)
    mixed = save({"a": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(DataError, match=r"entry 'epoch' is not a tensor"):
        read_state_dict(mixed)


def test_data_parallel_prefix_is_stripped(tmp_path):
    saved = conv4()
    path = save({f"module.{k}": v for k, v in saved.state_dict().items()}, tmp_path / "dp.pt")
    assert torch.equal(Checkpoint(path=path, arch_params={"channels": 8}).build(SPEC)(X),
                       saved(X))


def test_unknown_architecture_and_bad_params(tmp_path):
    path = save(conv4().state_dict(), tmp_path / "c.pt")
    with pytest.raises(PluginError, match=r"unknown source model 'conv5' \(did you mean 'conv4'"):
        Checkpoint(path=path, arch="conv5")
    with pytest.raises(PluginError, match=r"architecture 'no_such_module:f' cannot be imported"):
        Checkpoint(path=path, arch="no_such_module:f")
    with pytest.raises(ConfigError, match=r"arch_params \{'width': 3\} do not fit architecture"):
        Checkpoint(path=path, arch_params={"width": 3})


def test_architecture_that_cannot_serve_the_task_is_refused_naming_both(tmp_path):
    path = save(conv4().state_dict(), tmp_path / "c.pt")
    task = Sinusoid(val_episodes=2, test_episodes=2)
    task.identity["task"] = "sinusoid"
    source = Checkpoint(path=path, arch_params={"channels": 8})
    with pytest.raises(ConfigError, match=r"checkpoint: architecture 'conv4' cannot serve task "
                                          r"'sinusoid': it accepts inputs of rank \[3\]"):
        source.prepare(task)
    with pytest.raises(ConfigError, match="cannot serve the task"):
        source.build(task.spec)


# -- files checked at construction: in the engine's preparation, before anything is stored --
class Malicious:
    """Unpickling it runs a shell command: the file a trusting loader must never open."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def finishes(call, seconds: float = IN_PROCESS_CALL):
    """``call()``'s result or exception, failing (not hanging) if it takes over ``seconds``."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s (a hang)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def bad_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "self-link":
        path.symlink_to(path.name)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello")
    elif kind == "truncated":
        torch.save(conv4().state_dict(), path)
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
    return path


@pytest.mark.parametrize(("kind", "error", "says"), [
    ("missing", ConfigError, "does not exist"),
    ("fifo", ConfigError, "is a FIFO (named pipe); set 'path' to a regular file"),
    ("directory", ConfigError, "is a directory; set 'path' to a regular file"),
    ("self-link", ConfigError, "is a symbolic link to nothing (dangling, or a loop)"),
    ("empty", DataError, "is empty"),
    ("text", DataError, "is corrupt or not a torch tensor file"),
    ("truncated", DataError, "is corrupt or not a torch tensor file (RuntimeError: "),
    ("plain-pickle", DataError, "is not a tensor file: it holds pickled data"),
])
def test_a_bad_file_is_refused_at_construction_in_one_line(tmp_path, kind, error, says):
    path = bad_file(kind, tmp_path)
    with pytest.raises(error) as info:
        finishes(lambda: Checkpoint(path=str(path), arch_params={"channels": 8}))
    message = str(info.value)
    assert says in message
    assert f"'{path}'" in message
    assert "\n" not in message
    assert "weights_only" not in message and "Weights only" not in message  # torch's text
    if error is DataError and kind not in ("empty",):
        assert "--param checkpoint.trust_pickle=true" in message


def test_nan_or_infinite_weights_are_refused_naming_the_tensor_and_the_count(tmp_path):
    state = conv4().state_dict()
    state["features.4.weight"][0, 0, 0, :2] = float("nan")
    state["head.bias"][1] = float("inf")
    path = save(state, tmp_path / "diverged.pt")
    with pytest.raises(DataError) as info:
        Checkpoint(path=path, arch_params={"channels": 8})
    assert str(info.value) == (
        f"weights file '{path}' holds NaN or infinite values: tensor 'features.4.weight' has 2 "
        "of 576 (and 1 more tensor(s)); the file is damaged or was saved from a diverged "
        "training run; use another file")


def test_large_finite_values_whose_sum_overflows_are_accepted(tmp_path):
    state = {"w": torch.full((4,), 3e38), "h": torch.full((3,), 60000.0, dtype=torch.half)}
    loaded = read_state_dict(save(state, tmp_path / "big.pt"))
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["h"], state["h"])


@pytest.mark.parametrize("flag", [False, "False", "false", "no", 0, "0", None])
def test_a_malicious_pickle_never_runs_unless_trust_pickle_is_true(tmp_path, flag):
    marker = tmp_path / "pwned"
    path = save({"model": Malicious(marker)}, tmp_path / "evil.pt")
    error = DataError if flag is False else ConfigError
    with pytest.raises(error) as info:
        Checkpoint(path=path, trust_pickle=flag)
    if flag is not False:
        assert str(info.value) == (f"checkpoint.trust_pickle: expected true or false, got "
                                   f"{flag!r}")
    with pytest.raises(error):
        read_state_dict(path, trust_pickle=flag)
    assert not marker.exists()
    # The file does run code when trusted: the check above could fail.
    with pytest.raises(DataError, match="entry 'model' is not a tensor"):
        Checkpoint(path=path, trust_pickle=True)
    assert marker.exists()


def test_the_file_is_read_once_and_reused_by_every_build(tmp_path):
    saved = conv4()
    path = tmp_path / "c.pt"
    save(saved.state_dict(), path)
    source = Checkpoint(path=str(path), arch_params={"channels": 8})
    path.unlink()  # build() must not need the file again
    first, second = source.build(SPEC), source.build(SPEC)
    assert torch.equal(first(X), saved(X)) and torch.equal(second(X), saved(X))
    assert first.features[0].weight is not second.features[0].weight


def test_incompatibility_checks_the_fit_for_the_task_without_touching_the_seed(tmp_path):
    path = save(conv4(channels=8).state_dict(), tmp_path / "c8.pt")
    wrong = Checkpoint(path=path, arch_params={"channels": 16})
    torch.manual_seed(0)
    reason = wrong.incompatibility(SPEC)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # the trials' seeding is untouched
    assert reason.startswith(f"cannot load its weights: weights file '{path}' does not fit "
                             "architecture 'conv4': 17 mismatch(es): features.0.weight is ")
    assert Checkpoint(path=path, arch_params={"channels": 8}).incompatibility(SPEC) is None
    ten = save(conv4(outputs=10).state_dict(), tmp_path / "ten.pt")  # only the head differs
    assert Checkpoint(path=ten, arch_params={"channels": 8}).incompatibility(SPEC) is None
    assert "head.weight is [10, 8]" in Checkpoint(
        path=ten, arch_params={"channels": 8}, replace_head=False).incompatibility(SPEC)
    assert "uses architecture 'conv4', which accepts inputs of rank [3]" in Checkpoint(
        path=path, arch_params={"channels": 8}).incompatibility(TaskSpec("regression", (1,), 1))


def test_preparation_refuses_a_bad_file_before_anything_is_stored(tmp_path, monkeypatch):
    from autometa import SearchConfig, create_host
    from autometa.engine.prepare import prepare
    from autometa_plugins import checkpoint, glyphs, maml
    from autometa_plugins import conv4 as conv4_plugin

    monkeypatch.chdir(tmp_path)
    host = create_host(entry_points=False, plugins={
        "glyphs": glyphs, "maml": maml, "conv4": conv4_plugin, "checkpoint": checkpoint})
    small = {"ways": 5, "shots": 1, "queries": 1, "train_classes": 5, "val_classes": 5,
             "test_classes": 5, "examples": 2, "val_episodes": 2, "test_episodes": 2}
    state = conv4(channels=8).state_dict()
    state["head.weight"][0, 0] = float("nan")
    for name, params, says in [
        ("nan.pt", {"channels": 8}, "holds NaN or infinite values: tensor 'head.weight'"),
        ("c8.pt", {"channels": 16}, "cannot load its weights: weights file"),
    ]:
        path = save(state if name == "nan.pt" else conv4().state_dict(), tmp_path / name)
        config = SearchConfig(task="glyphs", task_params=small, sources=["checkpoint"],
                              source_params={"checkpoint": {"path": path,
                                                            "arch_params": params}})
        with pytest.raises((ConfigError, DataError), match=re.escape(says)):
            prepare(config, host)
    assert not (tmp_path / "autometa.db").exists()


def test_a_feature_extractor_that_refuses_the_inputs_is_a_reason_not_a_trace(tmp_path):
    path = save(make_features().state_dict(), tmp_path / "features.pt")  # expects 64 inputs
    source = Checkpoint(path=path, arch=f"{__name__}:make_features")
    reason = source.incompatibility(TaskSpec("classification", (1, 28, 28), 5))
    assert reason.startswith(f"cannot build architecture '{__name__}:make_features' for the "
                             "task: feature extractor Sequential cannot take inputs of shape "
                             "[2, 1, 28, 28]: ")
    assert "\n" not in reason
    assert source.incompatibility(SPEC) is None
