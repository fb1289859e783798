"""The csv task plugin: a user's CSV file as a split or few-shot task, and its bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from limits import CLI_SEARCH

import autometa
import autometa_plugins.csvfile
import autometa_plugins.maml
import autometa_plugins.mlp
from autometa import ConfigError, DataError, create_host
from autometa.testing import check_task
from autometa_plugins.csvfile.task import CSVTask, infer_kind

COLORS = ["red", "green", "blue"]


def _classification(per_class: int = 30, classes: int = 3, seed: int = 0) -> pd.DataFrame:
    """Two numeric features that separate the classes, a text feature, a text target."""
    rng = np.random.default_rng(seed)
    n = per_class * classes
    label = np.repeat(np.arange(classes), per_class)
    return pd.DataFrame({
        "width": rng.normal(label, 0.3).round(3),
        "petals": rng.integers(0, 5, n),
        "color": [COLORS[i % 3] for i in range(n)],
        "species": [f"k{c:02d}" for c in label],
    })


def _regression(n: int = 100, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    color = [COLORS[i % 3] for i in range(n)]
    price = 50 + 10 * a - 5 * b + np.array([COLORS.index(c) for c in color]) \
        + rng.normal(0, 0.1, n)
    return pd.DataFrame({"a": a.round(4), "b": b.round(4), "color": color, "price": price})


def _write(frame: pd.DataFrame, path: Path) -> str:
    frame.to_csv(path, index=False)
    return str(path)


#: Tiny MAML runs: "auto" would first time both inner-loop strategies on full evaluations.
MAML = {"maml": {"strategy": "vmap", "meta_batch_size": 4, "inner_steps": 1}}


def _host() -> autometa.PluginHost:
    return create_host(entry_points=False, plugins={
        "csv": autometa_plugins.csvfile, "maml": autometa_plugins.maml,
        "mlp": autometa_plugins.mlp})


# -- the three modes pass the conformance kit ----------------------------------------------
def test_classification_split(tmp_path: Path) -> None:
    frame = _classification()
    task = check_task(CSVTask, path=_write(frame, tmp_path / "iris.csv"), target="species")
    assert task.kind == "classification" and task.output_size == 3
    assert task.class_names == ["k00", "k01", "k02"]  # sorted values -> labels 0..2
    # width, petals standardised; color one-hot (3 values)
    assert task.feature_names == ["numeric__width", "numeric__petals", "categorical__color_blue",
                                  "categorical__color_green", "categorical__color_red"]
    assert task.input_shape == (5,)
    assert task.describe()["examples"] == {"train": 54, "val": 18, "test": 18}
    labels = task.meta_val().support_y[0]
    expected = frame["species"].map({"k00": 0, "k01": 1, "k02": 2}).to_numpy()
    assert labels.tolist() == expected[task.rows["train"]].tolist()
    onehot = task.meta_test().query_x[0][:, 2:]
    assert set(onehot.unique().tolist()) == {0.0, 1.0} and (onehot.sum(1) == 1).all()
    names = [COLORS.index(c) for c in frame["color"].to_numpy()[task.rows["test"]]]
    assert onehot.argmax(1).tolist() == [[2, 1, 0][i] for i in names]  # blue, green, red


def test_regression_split_standardises_the_target_on_train_rows(tmp_path: Path) -> None:
    frame = _regression()
    task = check_task(CSVTask, path=_write(frame, tmp_path / "houses.csv"), target="price")
    assert task.kind == "regression" and task.output_size == 1 and task.input_shape == (5,)
    train = frame["price"].to_numpy()[task.rows["train"]]
    scaling = task.describe()["target_scaling"]
    assert scaling["mean"] == pytest.approx(train.mean()) and \
        scaling["std"] == pytest.approx(train.std())
    support_y = task.meta_val().support_y[0].double()  # (train rows, 1)
    assert support_y.mean().abs() < 1e-5 and (support_y.std(unbiased=False) - 1).abs() < 1e-5
    query_y = task.meta_test().query_y[0, :, 0].double()
    expected = (frame["price"].to_numpy()[task.rows["test"]] - train.mean()) / train.std()
    torch.testing.assert_close(query_y, torch.as_tensor(expected), atol=1e-5, rtol=0)


def test_few_shot_episodes_over_a_disjoint_class_split(tmp_path: Path) -> None:
    frame = _classification(per_class=8, classes=12)
    path = _write(frame, tmp_path / "many.csv")
    task = check_task(CSVTask, path=path, target="species", episodes="few-shot", ways=3,
                      shots=2, queries=3, val_episodes=5, test_episodes=6)
    assert task.output_size == 3 and task.train_classes == 6  # 12 - max(3, 2.4) - max(3, 2.4)
    parts = {part: set(frame["species"].to_numpy()[rows]) for part, rows in task.rows.items()}
    assert [len(parts[p]) for p in ("train", "val", "test")] == [6, 3, 3]
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"]
                or parts["val"] & parts["test"])
    assert {p: set(c) for p, c in task.describe()["classes"].items()} == parts
    episodes = task.meta_test()
    assert episodes.support_x.shape == (6, 3 * 2, 5) and episodes.query_y.shape == (6, 9)
    x, y = task.sample_labelled(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, 5) and int(y.max()) < 6
    # The encoding is fitted on the meta-train classes' rows only.
    scaler = task.preprocessor.named_transformers_["numeric"]
    train = frame.iloc[task.rows["train"]][["width", "petals"]].to_numpy(float)
    np.testing.assert_allclose(scaler.mean_, train.mean(0))
    fixed = CSVTask(path=path, target="species", episodes="few-shot", ways=2, shots=2,
                    queries=2, val_classes=4, test_classes=2)
    assert [len(fixed.classes[p]) for p in ("train", "val", "test")] == [6, 4, 2]


def test_preprocessing_is_fitted_on_train_rows_only(tmp_path: Path) -> None:
    """Shifting the val/test rows of a feature changes neither the scaler nor the train rows."""
    from sklearn.preprocessing import StandardScaler

    frame = _classification()
    plain = CSVTask(path=_write(frame, tmp_path / "plain.csv"), target="species")
    held = np.concatenate([plain.rows["val"], plain.rows["test"]])
    shifted = frame.copy()
    shifted.loc[held, "width"] += 1000.0
    shifted.loc[held[:4], "color"] = "purple"  # a value never seen in training
    task = CSVTask(path=_write(shifted, tmp_path / "shifted.csv"), target="species")
    assert all(np.array_equal(task.rows[p], plain.rows[p]) for p in ("train", "val", "test"))
    reference = StandardScaler().fit(frame.loc[task.rows["train"], ["width", "petals"]])
    scaler = task.preprocessor.named_transformers_["numeric"]
    np.testing.assert_allclose(scaler.mean_, reference.mean_)
    np.testing.assert_allclose(scaler.scale_, reference.scale_)
    assert torch.equal(task.meta_val().support_x, plain.meta_val().support_x)
    encoded = torch.cat([task.meta_val().query_x[0], task.meta_test().query_x[0]])
    assert (encoded[:, 0] > 100).all()  # the shift shows, in train-scaled units
    assert (encoded[:4, 2:] == 0).all()  # held[:4] is purple; handle_unknown="ignore"


@pytest.mark.parametrize(("values", "kind"), [
    (["a", "b", "a"], "classification"),
    ([True, False, True], "classification"),
    ([1, 2, 3, 1], "classification"),
    ([1.0, 2.0, 2.0], "classification"),
    (list(range(21)), "regression"),  # more than AUTO_MAX_CLASSES = 20 integer values
    ([0.5, 1.0, 2.0], "regression"),
])
def test_auto_kind_rule(values: list, kind: str) -> None:
    assert infer_kind(pd.Series(values)) == kind


def test_kind_can_be_forced(tmp_path: Path) -> None:
    frame = _regression()
    frame["rooms"] = np.arange(len(frame)) % 4 + 1  # auto: classification (4 integer values)
    path = _write(frame.drop(columns="price"), tmp_path / "rooms.csv")
    assert CSVTask(path=path, target="rooms").kind == "classification"
    task = CSVTask(path=path, target="rooms", kind="regression", features="a,b")
    assert task.kind == "regression" and task.input_shape == (2,)


# -- bad input: one line naming the file, the column or value, and the fix ------------------
HEADER = "a,b,color,label"


def _rows(classes: int = 3, per_class: int = 12) -> list[list[str]]:
    rng = np.random.default_rng(0)
    return [[f"{rng.normal(c):.3f}", str(int(rng.integers(0, 5))), COLORS[i % 3], f"k{c}"]
            for c in range(classes) for i in range(per_class)]


def _text(rows: list[list[str]], header: str = HEADER) -> str:
    return "\n".join([header, *(",".join(r) for r in rows)]) + "\n"


def _edit(rows: list[list[str]], *cells: tuple[int, int, str]) -> list[list[str]]:
    for row, column, value in cells:
        rows[row - 1][column] = value  # rows counted from 1 under the header, as in messages
    return rows


BAD = {
    "missing file": (None, {"path": "nope.csv"}, DataError,
                     ["'nope.csv' does not exist", "relative to the working directory"]),
    "directory": (None, {"path": "."}, DataError, ["is a directory"]),
    "empty": ("", {}, DataError, ["is empty", "header row"]),
    "header only": ("a,label\n", {}, DataError, ["no data rows"]),
    "ragged": ("a,label\n1,x\n1,2,3\n", {}, DataError,
               ["not a readable CSV", "Expected 2 fields in line 3, saw 3"]),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01,\xc3\x28", {}, DataError,
               ["not a readable CSV", "not UTF-8"]),
    "duplicate target": (_text([[r[0], r[3], r[3]] for r in _rows()], "a,label,label"), {},
                         DataError, ["column name 'label' appears 2 times in the header "
                                     "(columns 2 and 3)", "as 'label.1', a feature",
                                     "rename or drop one of them"]),
    "duplicate feature": (_text([[r[0], r[1], r[0], r[3]] for r in _rows()], "a,b,a,label"),
                          {"features": ["a", "b"]}, DataError,
                          ["column name 'a' appears 2 times in the header (columns 1 and 3)",
                           "rename or drop one of them"]),
    "target typo": (_text(_rows()), {"target": "lable"}, DataError,
                    ["unknown target column 'lable'", "did you mean 'label'",
                     "available: a, b, color, label"]),
    "feature typo": (_text(_rows()), {"features": ["a", "colour"]}, DataError,
                     ["unknown feature column 'colour'", "did you mean 'color'"]),
    "nan and inf": (_text(_edit(_rows(), (3, 0, ""), (6, 0, "inf"), (8, 1, ""), (5, 2, ""))),
                    {}, DataError,
                    ["'a' in 2 row(s) (first: row 3)", "'b' in 1 row(s) (first: row 8)",
                     "'color' in 1 row(s) (first: row 5)", "not imputed"]),
    "missing target": (_text(_edit(_rows(), (10, 3, ""))), {}, DataError,
                       ["target column 'label'", "1 of 36 rows (first: row 10)"]),
    "one class": (_text([r[:3] + ["k0"] for r in _rows()]), {}, DataError,
                  ["one class ('k0')", "at least 2"]),
    "mixed types": (_text(_edit(_rows(), (7, 1, "x7"))), {}, DataError,
                    ["column 'b' mixes numbers and text", "35 of 36", "row 7 holds 'x7'"]),
    "missing marker": (_text(_edit(_rows(), (2, 0, "?"))), {}, DataError,
                       ["column 'a' mixes", "row 2 holds '?'", "leave a missing value empty"]),
    "class too small for episodes": (_text(_rows()), {}, DataError,
                                     ["class 'k0' has 8 row(s) in the train split",
                                      "shots + queries = 10", "lower 'shots'"]),
    "class too small for a split": (_text(_rows(2) + _rows(3, 2)[-2:]), {"shots": 1,
                                    "queries": 1}, DataError,
                                    ["class 'k2' of target 'label' has 2 row(s)",
                                     "at least 3 per class"]),
    "rows too few for a split": ("a,y\n1,0.5\n2,1.5\n", {"target": "y"}, DataError,
                                 ["2 row(s) are too few", "at least 3"]),
    "regression rows too few for episodes": (
        "a,y\n" + "".join(f"{i},{i / 3}\n" for i in range(12)), {"target": "y"}, DataError,
        ["the train split has 8 of 12 rows", "shots + queries = 10"]),
    "more ways than classes": (_text(_rows()), {"episodes": "few-shot", "ways": 2}, DataError,
                               ["need at least 3 x 2 = 6 classes", "has 3", "lower 'ways'"]),
    "few-shot class too small": (_text(_rows(9, 4)), {"episodes": "few-shot", "ways": 3,
                                 "shots": 2, "queries": 3}, DataError,
                                 ["class 'k0' has 4 row(s)", "shots + queries = 5"]),
    "few-shot regression": (_text(_rows()), {"target": "a", "episodes": "few-shot"},
                            DataError, ["episodes='few-shot' needs classes"]),
    "regression on text": (_text(_rows()), {"kind": "regression"}, DataError,
                           ["target column 'label' holds text", "kind='classification'"]),
    "target among features": (_text(_rows()), {"features": ["a", "label"]}, ConfigError,
                              ["'label' is the target"]),
    "no path": (None, {"path": None}, ConfigError, ["task csv needs path="]),
    "bad kind": (_text(_rows()), {"kind": "regresion"}, ConfigError,
                 ["kind='regresion' is not one of"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error(tmp_path: Path, case: str) -> None:
    content, params, error, expected = BAD[case]
    if content is not None:
        path = tmp_path / "data.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        params = {"path": "data.csv", **params}  # relative: read from the working directory
    params = {"target": "label", **params}
    with pytest.raises(error) as info:
        CSVTask(**params)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message
    if error is DataError:  # names the file (config errors name the parameter)
        assert f"csv file {params['path']!r}" in message
    if case == "missing file":
        assert str(tmp_path) in message


# -- searches ---------------------------------------------------------------------------
@pytest.mark.parametrize(("frame", "target", "metric"), [
    (_classification(), "species", "accuracy"),
    (_regression(), "price", "mse"),
])
def test_search_on_a_csv_file(tmp_path: Path, frame: pd.DataFrame, target: str, metric: str
                              ) -> None:
    path = _write(frame, tmp_path / "data.csv")
    board = autometa.search("csv", host=_host(), task_params={"path": path, "target": target},
                            algorithms=["maml"], sources=["mlp"], n_trials=2, meta_steps=20,
                            eval_every=10, seed=0,
                            algorithm_params=MAML,
                            source_params={"mlp": {"hidden": 40, "layers": 1}},
                            storage=f"sqlite:///{tmp_path / 'a.db'}",
                            artifacts=str(tmp_path / "art"))
    frame = board.frame
    assert board.metric == metric and len(frame) == 2
    assert set(frame["test_ci_over"]) == {"examples"}
    assert set(frame["test_n"]) == {18 if target == "species" else 20}  # the test rows


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m autometa ARGS`` in tmp_path (the installed ``csv`` entry point)."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "autometa", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=CLI_SEARCH)


RUN = ["run", "--task", "csv", "--task-param", "path=data.csv", "--task-param",
       "target=species", "--algorithms", "maml", "--sources", "mlp", "--trials", "1",
       "--meta-steps", "4", "--eval-every", "2", "--no-progress"]


def test_cli_bad_file_exits_2_and_leaves_the_stored_study_unchanged(tmp_path: Path) -> None:
    """A study exists; the user's CSV then gets a typo: exit 2, one line, storage intact."""
    _write(_classification(), tmp_path / "data.csv")
    autometa.search("csv", host=_host(), task_params={"path": "data.csv", "target": "species"},
                    algorithms=["maml"], sources=["mlp"], n_trials=1, meta_steps=2,
                    eval_every=2, algorithm_params=MAML)
    db = tmp_path / "autometa.db"  # the default storage, as the CLI uses it
    before = db.read_bytes()
    text = (tmp_path / "data.csv").read_text().splitlines()
    text[5] = "1.5x," + text[5].split(",", 1)[1]
    (tmp_path / "data.csv").write_text("\n".join(text) + "\n")
    result = _cli(tmp_path, *RUN)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autometa: error:"), result.stderr
    assert "column 'width' mixes numbers and text" in lines[0] and "'1.5x'" in lines[0]
    assert db.read_bytes() == before



def test_a_split_column_replaces_the_fractions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 60
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n),
                          "label": np.tile(["x", "y", "z"], n // 3),
                          "part": ["train"] * 36 + ["val"] * 12 + ["test"] * 12})
    frame.to_csv(tmp_path / "d.csv", index=False)
    task = CSVTask(path=tmp_path / "d.csv", target="label", split_column="part", shots=2,
                   queries=2)
    assert task.describe()["examples"] == {"train": 36, "val": 12, "test": 12}
    assert "part" not in task.features and task.rows["test"].tolist() == list(range(48, 60))
    frame.loc[40, "part"] = "holdout"
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match="row 41 holds 'holdout'; each row must be train"):
        CSVTask(path=tmp_path / "d.csv", target="label", split_column="part")
    with pytest.raises(DataError, match="split column 'prt'"):
        CSVTask(path=tmp_path / "d.csv", target="label", split_column="prt")
