"""The winning model back: load_model, adapt/predict, `autometa predict` and `autometa export`.

Each test runs a real (tiny) search, then checks the predictor against what meta-test
evaluation computes on the same episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL_SINUSOID

import autometa
from autometa import ConfigError, DataError, PluginError
from autometa.cli import main
from autometa.task import Episodes, InputBatch, Task
from autometa.trial import evaluate

TINY = {"meta_steps": 4, "eval_every": 4, "top_k": 1}


def _one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autometa: error: "), err
    return err[0]


# -- few-shot regression ---------------------------------------------------------------------
def test_sinusoid_predictions_are_the_meta_test_predictions(tmp_path: Path) -> None:
    board = autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=2,
                            seed=0, task_params=SMALL_SINUSOID, **TINY)
    model = autometa.load_model("sinusoid-seed0")
    assert (model.algorithm, model.source, model.trial) == ("maml", "mlp",
                                                             int(board.best["trial"]))
    assert model.task_kind == "regression" and model.class_names is None
    assert set(model.params) >= {"maml.inner_lr", "mlp.hidden"}
    assert model.val_score == pytest.approx(board.best["val_mse"])
    episodes = model.task.meta_test()
    batched = model.meta_algorithm.adapt_and_predict(episodes)  # (tasks, n_query, 1)
    scores = []
    for i in range(len(episodes)):
        adapted = model.adapt(episodes.support_x[i], episodes.support_y[i][:, 0])  # (n,) ok
        values = adapted.predict(episodes.query_x[i]).values
        one = model.meta_algorithm.adapt_and_predict(episodes[i:i + 1])[0]  # the same episode
        torch.testing.assert_close(values, one, rtol=0, atol=0)
        torch.testing.assert_close(values, batched[i])  # vmapped over 40: rounding differs
        scores.append(float(((values - episodes.query_y[i]) ** 2).mean()))
    # The same numbers as trial.evaluate, and the leaderboard's meta-test score.
    evaluated = evaluate(model.meta_algorithm, episodes, model.task)
    np.testing.assert_allclose(scores, evaluated.numpy(), rtol=1e-6)
    assert np.mean(scores) == pytest.approx(board.best["test_mse"], rel=1e-6)
    assert model.test_score == pytest.approx(board.best["test_mse"], rel=1e-6)
    # Repeated calls give the same predictions; frames have one row per input.
    again = adapted.predict(episodes.query_x[-1])
    torch.testing.assert_close(again.values, values)
    assert list(again.to_frame().columns) == ["prediction"] and len(again) == len(values)

    with pytest.raises(DataError, match=r"shape \(3, 2\) does not match .* \(n, 1\)"):
        adapted.predict(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="few-shot episodes"):
        model.predict(episodes.query_x[0])
    n = board.counts["complete"]
    with pytest.raises(ConfigError, match=rf"^the study has {n} completed trials?; the rank must "
                                          rf"be 1\.\.{n} \(got 3\)$"):
        autometa.load_model("sinusoid-seed0", rank=3)
    with pytest.raises(ConfigError, match="no study 'sinusoid-seed9'"):
        autometa.load_model("sinusoid-seed9")


# -- a CSV target task -----------------------------------------------------------------------
CLASSES = ["ant", "bee", "cat"]


def _write_csv(path: Path, n: int = 90, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = np.array(CLASSES)[np.arange(n) % 3]
    centre = (np.arange(n) % 3).astype(float)
    frame = pd.DataFrame({
        "a": centre * 2 + rng.normal(scale=0.5, size=n),
        "b": -centre + rng.normal(scale=0.5, size=n),
        "colour": np.where(rng.random(n) < 0.5, "red", "blue"),
        "kind": label,
    })
    frame.to_csv(path, index=False)
    return frame


@pytest.fixture(scope="module")
def csv_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One CSV target-task study for the CLI tests: (its folder, its argv options)."""
    root = tmp_path_factory.mktemp("csv-study")
    frame = _write_csv(root / "pets.csv")
    storage, artifacts = f"sqlite:///{root / 'a.db'}", str(root / "artifacts")
    board = autometa.search("csv", algorithms=["protonet"], sources=["mlp"], n_trials=2, seed=0,
                            baselines=False,
                    study_name="pets", storage=storage, artifacts=artifacts,
                    task_params={"path": str(root / "pets.csv"), "target": "kind",
                                 "shots": 3, "queries": 3}, **TINY)
    return {"root": root, "frame": frame, "complete": board.counts["complete"],
            "opts": ["--storage", storage, "--artifacts", artifacts]}


def test_cli_predict_on_csv_rows_agrees_with_meta_test(csv_study, tmp_path, capsys) -> None:
    frame, opts = csv_study["frame"], csv_study["opts"]
    model = autometa.load_model("pets", storage=opts[1], artifacts=opts[3])
    assert model.class_names == CLASSES and model.task_kind == "classification"
    test_rows = model.task.rows["test"]
    # New rows: the test rows, columns reordered and the label column left out.
    frame.iloc[test_rows][["colour", "b", "a"]].to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "pets", "--input", "new.csv", "--out", "out.csv", *opts]) == 0
    assert capsys.readouterr().out.strip() == f"wrote out.csv ({len(test_rows)} predictions)"
    out = pd.read_csv(tmp_path / "out.csv")
    assert list(out.columns) == ["row", "label", "p_ant", "p_bee", "p_cat"]
    assert list(out["row"]) == list(range(len(test_rows)))
    probs = out[["p_ant", "p_bee", "p_cat"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert set(out["label"]) <= set(CLASSES)
    # The model's own meta-test predictions for the same rows.
    logits = model.meta_algorithm.adapt_and_predict(model.task.meta_test())[0]
    assert list(out["label"]) == [CLASSES[i] for i in logits.argmax(-1)]
    np.testing.assert_allclose(probs, torch.softmax(logits, -1).double().numpy(), atol=1e-6)
    # In Python, with user support rows named by class (every class given).
    support = frame.iloc[model.task.rows["train"]]
    x = model.task.meta_test().support_x[0]
    adapted = model.adapt(x, support["kind"].tolist())
    assert adapted.predict(model.task.meta_test().query_x[0]).labels == list(out["label"])


@pytest.mark.parametrize(("make", "expected"), [
    (lambda f: f[["a", "colour"]], r"missing \['b'\].*give the feature columns"),
    (lambda f: f.assign(extra=1), r"unexpected \['extra'\]"),
    (lambda f: f.assign(a="x"), r"column 'a' needs a number in every row.*row 1 holds 'x'"),
])
def test_cli_predict_refuses_bad_csv_in_one_line(csv_study, tmp_path, capsys, make, expected
                                                 ) -> None:
    make(csv_study["frame"].head(5)).to_csv(tmp_path / "bad.csv", index=False)
    line = _one_line_exit_2(capsys, ["predict", "pets", "--input", "bad.csv", "--out", "o.csv",
                                     *csv_study["opts"]])
    assert pytest.importorskip("re").search(expected, line), line
    assert not (tmp_path / "o.csv").exists()


def test_cli_unknown_study_and_rank_out_of_range(csv_study, tmp_path, capsys) -> None:
    csv_study["frame"].head(3).to_csv(tmp_path / "new.csv", index=False)
    base = ["--input", "new.csv", "--out", "o.csv", *csv_study["opts"]]
    assert "no study 'pest' in" in _one_line_exit_2(capsys, ["predict", "pest", *base])
    n = csv_study["complete"]
    line = _one_line_exit_2(capsys, ["predict", "pets", "--rank", str(n + 1), *base])
    assert line.endswith(f"the study has {n} completed trial{'s' * (n > 1)}; the rank must be "
                         f"1..{n} (got {n + 1})")
    line = _one_line_exit_2(capsys, ["export", "pets", "--rank", "0", "--out", "m",
                                     *csv_study["opts"]])
    assert f"the rank must be 1..{n}" in line
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "m").exists()


def test_cli_export_writes_weights_only_state_and_plan(csv_study, tmp_path, capsys) -> None:
    opts = csv_study["opts"]
    assert main(["export", "pets", "--out", "model", *opts]) == 0
    assert "wrote model/model.pt, model/plan.json" in capsys.readouterr().out
    state = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    model = autometa.load_model("pets", storage=opts[1], artifacts=opts[3])
    for name, tensor in model.meta_algorithm.state_dict()["model"].items():
        torch.testing.assert_close(state["model"][name], tensor)
    plan = json.loads((tmp_path / "model" / "plan.json").read_text())
    assert plan["study"] == "pets" and plan["rank"] == 1 and plan["trial"] == model.trial
    assert plan["algorithm"]["name"] == "protonet" and plan["source"]["name"] == "mlp"
    assert plan["task"]["name"] == "csv" and plan["task"]["params"]["target"] == "kind"
    assert plan["task"]["spec"] == {"kind": "classification", "input_shape": [4],
                                    "output_size": 3, "metric": "accuracy",
                                    "direction": "maximize"}
    assert plan["class_names"] == CLASSES and plan["autometa_version"] == autometa.__version__
    assert plan["scores"]["val_accuracy"] == pytest.approx(model.val_score)
    # A folder that is not empty: refused unless --force.
    line = _one_line_exit_2(capsys, ["export", "pets", "--out", "model", *opts])
    assert "is not empty" in line and "--force" in line
    assert main(["export", "pets", "--out", "model", "--force", *opts]) == 0


# -- an image-folder target task -------------------------------------------------------------
def _images(folder: Path, bright: bool, n: int, seed: int, mode: str = "L") -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if bright:  # a bright square on a dark ground
            pixels = np.full((12, 12), 20, np.uint8)
            pixels[2 + i % 3:9 + i % 3, 3:10] = 230
        else:  # dark noise
            pixels = rng.integers(0, 60, size=(12, 12)).astype(np.uint8)
        image = Image.fromarray(pixels)
        if mode == "RGB":
            image = Image.fromarray(np.stack([pixels, pixels // 2, 255 - pixels], -1))
        image.save(folder / f"{'b' if bright else 'd'}{i:02d}.png")


def test_cli_predict_on_new_images(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "data" / "airplane", True, 12, 0)
    _images(tmp_path / "data" / "not-airplane", False, 12, 1)
    autometa.search("image-folder", algorithms=["protonet"], sources=["mlp"], n_trials=1,
                    seed=0, study_name="planes",
                    task_params={"path": "data", "episodes": "split", "size": 8, "shots": 2,
                                 "queries": 2}, **TINY)
    _images(tmp_path / "new", True, 3, 5)
    _images(tmp_path / "new", False, 3, 6)
    assert main(["predict", "planes", "--input", "new", "--out", "p.csv"]) == 0
    assert capsys.readouterr().out.strip() == "wrote p.csv (6 predictions)"
    out = pd.read_csv(tmp_path / "p.csv")
    assert list(out.columns) == ["file", "label", "p_airplane", "p_not-airplane"]
    assert list(out["file"]) == ["b00.png", "b01.png", "b02.png", "d00.png", "d01.png",
                                 "d02.png"]
    np.testing.assert_allclose(out[["p_airplane", "p_not-airplane"]].sum(axis=1), 1.0,
                               rtol=1e-6)
    assert set(out["label"]) <= {"airplane", "not-airplane"}
    # Python: the same images give the same probabilities; one file is read alone too.
    model = autometa.load_model("planes")
    assert model.class_names == ["airplane", "not-airplane"]
    from autometa.model_inputs import read_inputs

    x, ids, _ = read_inputs(model.task, tmp_path / "new")
    assert x.shape == (6, 1, 8, 8) and ids == list(out["file"])
    probs = model.predict(x).probabilities
    np.testing.assert_allclose(probs.numpy(), out[["p_airplane", "p_not-airplane"]], atol=1e-6)
    assert main(["predict", "planes", "--input", "new/d01.png", "--out", "one.csv"]) == 0
    assert pd.read_csv(tmp_path / "one.csv")["file"].tolist() == ["d01.png"]
    capsys.readouterr()

    # A colour image for a model of grayscale images is converted to grayscale.
    _images(tmp_path / "colour", True, 1, 7, mode="RGB")
    assert main(["predict", "planes", "--input", "colour", "--out", "c.csv"]) == 0
    x, _, _ = read_inputs(model.task, tmp_path / "colour")
    assert x.shape[1:] == (1, 8, 8)
    assert len(pd.read_csv(tmp_path / "c.csv")) == len(x)


# -- a few-shot CSV task and a CSV regression ------------------------------------------------
def test_few_shot_support_names_the_classes(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(6)]
    rows = [{"a": 3 * i + rng.normal(scale=0.3), "b": rng.normal(), "kind": name}
            for i, name in enumerate(names) for _ in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "many.csv", index=False)
    autometa.search("csv", algorithms=["protonet"], sources=["mlp"], n_trials=1, seed=0,
                    study_name="many", task_params={
                        "path": "many.csv", "target": "kind", "episodes": "few-shot",
                        "ways": 2, "shots": 2, "queries": 2, "val_episodes": 4,
                        "test_episodes": 4}, **TINY)
    model = autometa.load_model("many")
    assert model.class_names is None  # a few-shot model's classes come with its support
    episodes = model.task.meta_test()
    word = {0: "zebra", 1: "aardvark"}  # sorted: aardvark is label 0, zebra label 1
    adapted = model.adapt(episodes.support_x[0], [word[int(y)] for y in episodes.support_y[0]])
    got = adapted.predict(episodes.query_x[0])
    logits = model.meta_algorithm.adapt_and_predict(episodes[:1])[0]
    flipped = logits.flip(-1)  # the names swap the labels' order
    assert got.classes == ["aardvark", "zebra"]
    assert got.labels == [got.classes[int(i)] for i in flipped.argmax(-1)]
    torch.testing.assert_close(got.probabilities, torch.softmax(flipped, -1))
    with pytest.raises(DataError, match="3 distinct classes, but the model was meta-trained "
                                        "on 2-way episodes"):
        model.adapt(episodes.support_x[0][:3], ["x", "y", "z"])

    frame = pd.DataFrame(rows)
    frame[frame["kind"].isin(["c0", "c5"])].to_csv(tmp_path / "support.csv", index=False)
    frame[["b", "a"]].head(4).to_csv(tmp_path / "new.csv", index=False)
    assert "give them with --support PATH (a CSV with the 'label' column" in _one_line_exit_2(
        capsys, ["predict", "many", "--input", "new.csv", "--out", "p.csv"])
    assert main(["predict", "many", "--input", "new.csv", "--support", "support.csv",
                 "--out", "p.csv"]) == 0
    out = pd.read_csv(tmp_path / "p.csv")
    assert list(out.columns) == ["row", "label", "p_c0", "p_c5"]
    assert list(out["label"]) == ["c0"] * 4  # rows of class c0 (a near 0)


def test_csv_regression_predicts_in_the_targets_units(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=60)
    pd.DataFrame({"a": a, "y": 100 + 30 * a}).to_csv(tmp_path / "r.csv", index=False)
    autometa.search("csv", algorithms=["finetune"], sources=["mlp"], n_trials=1, seed=0,
                    study_name="r", task_params={"path": "r.csv", "target": "y"}, **TINY)
    model = autometa.load_model("r")
    task = model.task
    standardised = model.meta_algorithm.adapt_and_predict(task.meta_test())[0]
    values = model.predict(task.meta_test().query_x[0]).values
    torch.testing.assert_close(values, standardised * task.target_std + task.target_mean)
    assert model.predict(task.meta_test().query_x[0]).to_frame().columns.tolist() == \
        ["prediction"]


# -- a third-party task's own reader ---------------------------------------------------------
class _Numbers(Task):
    """A task of one value per input; reads new inputs with the default reader."""

    kind, input_shape, output_size = "regression", (1,), 1

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        raise NotImplementedError

    meta_val = meta_test = sample  # type: ignore[assignment]


class _Lines(_Numbers):
    """... and one that reads them its own way: a number per text line, in percent."""

    def read_inputs(self, path: Path, *, labelled: bool) -> InputBatch:
        values = [float(v) / 100 for v in path.read_text().split()]  # ValueError on text
        return InputBatch(torch.tensor(values)[:, None], None, list(range(len(values))), "line")


def test_read_inputs_is_the_tasks_own(tmp_path: Path) -> None:
    from autometa.model_inputs import read_inputs, read_support

    (tmp_path / "x.txt").write_text("150\n25\n")
    x, ids, id_name = read_inputs(_Lines(), tmp_path / "x.txt")
    assert x.tolist() == [[1.5], [0.25]] and ids == [0, 1] and id_name == "line"
    (tmp_path / "bad.txt").write_text("1\nten\n")
    with pytest.raises(PluginError, match=r"^task '_Lines' raised in read_inputs\(\) on "
                                          r"--input '.*bad.txt': ValueError: could not"):
        read_inputs(_Lines(), tmp_path / "bad.txt")
    # Without an override: a CSV of numbers, as it is; a support file needs its targets.
    pd.DataFrame({"v": [1.5, 2.0], "target": [3.0, 4.0]}).to_csv(tmp_path / "s.csv",
                                                                 index=False)
    x, labels = read_support(_Numbers(), tmp_path / "s.csv")
    assert x.tolist() == [[1.5], [2.0]] and labels == [[3.0], [4.0]]
    with pytest.raises(PluginError, match=r"returned inputs of shape \(2, 1\) with 2 id\(s\) "
                                          r"and no label\(s\)"):
        read_support(_Lines(), tmp_path / "x.txt")
    with pytest.raises(DataError, match=r"^--input '.*' is a folder; this study's task reads"):
        read_inputs(_Numbers(), tmp_path)


def test_iris_raw_rows_are_standardised_like_the_tasks_own(tmp_path: Path, capsys) -> None:
    """A bundled tabular task reads raw feature rows and scales them with its train split's
    scaler: `autometa predict` (no --support needed) and `model.predict(path)` give the
    model's own meta-test predictions for the test rows."""
    from sklearn.datasets import load_iris

    autometa.search("iris", algorithms=["protonet"], sources=["mlp"], n_trials=1, seed=0,
                    study_name="flowers", **TINY)
    model = autometa.load_model("flowers")
    episode = model.task.meta_test()
    raw = load_iris()
    test_rows = model.task.scaler.inverse_transform(episode.query_x[0].double().numpy())
    pd.DataFrame(test_rows, columns=raw.feature_names).to_csv(tmp_path / "new.csv",
                                                               index=False)
    # --out into a folder that does not exist yet: made, not an internal error.
    assert main(["predict", "flowers", "--input", "new.csv", "--out", "out/p.csv"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote out/p.csv ({len(test_rows)} predictions)"
    written = pd.read_csv(tmp_path / "out" / "p.csv")
    own = model.meta_algorithm.adapt_and_predict(episode)[0].softmax(-1)
    np.testing.assert_allclose(written[[f"p_{c}" for c in raw.target_names]], own.numpy(),
                               atol=1e-5)
    from_path = model.predict(tmp_path / "new.csv")
    assert from_path.labels == list(written["label"])
    # Raw rows as numbers are the caller's to scale; a path is read by the task.
    assert model.predict(episode.query_x[0]).labels == list(written["label"])


def test_cli_predict_warns_of_a_value_the_study_never_saw(csv_study, tmp_path, capsys):
    frame, opts = csv_study["frame"], csv_study["opts"]
    frame.head(3).assign(colour="purple").drop(columns="kind").to_csv(tmp_path / "new.csv",
                                                                      index=False)
    assert main(["predict", "pets", "--input", "new.csv", "--out", "p.csv", *opts]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "column 'colour' holds 'purple', never seen" in err[0], err
    assert "'blue', 'red'" in err[0]


def test_a_csv_of_numbers_without_a_header_is_refused(tmp_path: Path, capsys) -> None:
    autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=1, seed=0,
                    task_params=SMALL_SINUSOID, study_name="waves", **TINY)
    (tmp_path / "q.csv").write_text("0\n1\n")
    (tmp_path / "s.csv").write_text("x,target\n0,0.5\n1,0.2\n")
    line = _one_line_exit_2(capsys, ["predict", "waves", "--input", "q.csv", "--support",
                                     "s.csv", "--out", "p.csv"])
    assert "its first line (0) is numbers, not column names; add a header row" in line
    assert not (tmp_path / "p.csv").exists()
    # A regression task's support file holds its targets in the 'target' column.
    line = _one_line_exit_2(capsys, ["predict", "waves", "--input", "s.csv", "--out", "p.csv"])
    assert "give them with --support PATH (a CSV with the 'target' column" in line
