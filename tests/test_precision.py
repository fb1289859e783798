"""The ``precision`` setting: trials in float32 or under bf16 autocast, fixed or searched.

On a CPU, ``torch.autocast("cpu", dtype=torch.bfloat16)`` runs convolutions and matrix
products in bfloat16, so every path is exercised here; the same code runs on CUDA
(``benchmarks/gpu_check.py``'s ``precision`` step compares the two there).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

import autometa
from autometa import Episodes
from autometa.cli import main
from autometa.config import SearchConfig
from autometa.errors import ConfigError
from autometa.inner_loop import meta_backward
from autometa.plugins import create_host
from autometa.precision import autocast, check_supported
from autometa.study.stored import open_stored
from autometa.study.trials import TrialPlan
from autometa.trial import build, restore, score_meta_test

#: A glyphs task small enough for a few seconds of conv4 MAML on one thread.
GLYPHS = {"train_classes": 20, "val_classes": 10, "test_classes": 10, "val_episodes": 4,
          "test_episodes": 8, "queries": 2, "examples": 4}
CONV4: dict[str, Any] = dict(
    algorithms=["maml"], sources=["conv4"], meta_steps=4, eval_every=2, pruner="none",
    baselines=False, threads=1, task_params=GLYPHS,
    algorithm_params={"maml": {"meta_batch_size": 4, "inner_steps": 1}},
    source_params={"conv4": {"channels": 32}})
SINUSOID: dict[str, Any] = dict(
    algorithms=["maml"], sources=["mlp"], meta_steps=4, eval_every=2, pruner="none",
    threads=1, task_params={"val_episodes": 6, "test_episodes": 10, "eval_queries": 10},
    algorithm_params={"maml": {"meta_batch_size": 4, "inner_steps": 1}},
    source_params={"mlp": {"hidden": 40}})
#: Largest relative L2 error of a bf16 meta-gradient against float32's (second-order
#: conv4 MAML, 4 glyphs episodes, 1-shot): bfloat16 keeps 8 bits of mantissa, and the
#: BatchNorm over 5 support images amplifies the rounding of the convolutions' outputs.
#: Measured over 6 seeds on this CPU: 0.20-0.43 (cosine 0.90-0.98), while float32 itself
#: is within 0.013 of a float64 reference, and two float32 meta-gradients of the same model
#: on two other batches of 4 episodes differ by 1.2-1.4 (cosine 0.03-0.15): the rounding is
#: a few times smaller than the episode sampling's own noise. Against float64 on random
#: inputs (tests/test_cuda.py): 0.21-0.24 with 1 inner step of 0.01, more with more or
#: larger inner steps (2 steps of 0.1: 0.6-0.72): second-order terms suffer most.
BF16_GRAD_RTOL = 0.5
#: Smallest cosine between the bf16 and the float32 meta-gradients.
BF16_GRAD_COSINE = 0.9


def _storage(tmp_path: Path, name: str) -> dict[str, str]:
    return {"storage": f"sqlite:///{tmp_path / name}.db",
            "artifacts": str(tmp_path / f"{name}-artifacts")}


def test_a_bf16_search_on_an_image_task_trains_and_scores(tmp_path: Path) -> None:
    board = autometa.search("glyphs", n_trials=1, precision="bf16", **CONV4,
                            **_storage(tmp_path, "bf16"))
    row = board.frame.iloc[0]
    assert 0 <= row["test_accuracy"] <= 1 and math.isfinite(row["val_accuracy"])
    assert row["params"].endswith("| bf16")  # what the leaderboard shows of the plan
    study = optuna.load_study(study_name=board.study_name, storage=f"sqlite:///{tmp_path}/bf16.db")
    (trial,) = study.trials
    assert trial.user_attrs["precision"] == "bf16" and "precision" not in trial.params
    assert TrialPlan.of(trial).precision == "bf16"


def test_a_searched_precision_is_drawn_and_recorded_per_trial(tmp_path: Path) -> None:
    board = autometa.search("sinusoid", n_trials=6, sampler="random", seed=3,
                            precision=["float32", "bf16"], **SINUSOID,
                            **_storage(tmp_path, "both"))
    study = optuna.load_study(study_name=board.study_name, storage=f"sqlite:///{tmp_path}/both.db")
    drawn = {t.number: t.params["precision"] for t in study.trials}
    assert set(drawn.values()) == {"float32", "bf16"}  # seed 3 draws both
    for t in study.trials:  # the plan the trial ran is the parameter it drew
        assert t.user_attrs["precision"] == t.params["precision"]
    assert drawn[0] == "float32"  # the portfolio's trial: the plugins' defaults, float32
    # A leaderboard column, as every searched hyperparameter is.
    listed = dict(zip(board.frame["trial"], board.frame["precision"], strict=True))
    assert listed == {n: drawn[n] for n in listed}


def test_a_restored_trial_is_scored_and_predicts_in_its_precision(tmp_path: Path) -> None:
    """Leaderboard scoring of a trial its worker did not score, and a loaded model's
    predictions, run under the trial's precision: sinusoid's MSE shows any difference."""
    storage = _storage(tmp_path, "restore")
    # top_k=1 while searching: later trials that are not the best are left unscored.
    autometa.search("sinusoid", n_trials=3, top_k=1, precision="bf16", study_name="r",
                    **SINUSOID, **storage)
    study = optuna.load_study(study_name="r", storage=storage["storage"])
    unscored = [t for t in study.trials if "test_mean" not in t.user_attrs]
    assert unscored
    board = autometa.load_leaderboard("r", storage["storage"], top_k=3)
    stored = open_stored("r", storage["storage"])
    task = stored.build_task()
    for t in unscored:
        algorithm = restore(study, t, task, stored.host, artifacts=storage["artifacts"])
        in_bf16 = score_meta_test(algorithm, task, precision="bf16").mean
        in_float32 = score_meta_test(algorithm, task).mean
        listed = board.frame.set_index("trial").loc[t.number, "test_mse"]
        assert listed == in_bf16 != in_float32
    model = autometa.load_model("r", rank=1, storage=storage["storage"])
    x = torch.linspace(-5, 5, 10)[:, None]
    adapted = model.adapt(x, torch.sin(x))
    as_trained = adapted.predict(x).values
    model.plan = replace(model.plan, precision="float32")
    assert not torch.equal(adapted.predict(x).values, as_trained)
    model.plan = replace(model.plan, precision="bf16")
    assert torch.equal(adapted.predict(x).values, as_trained)


def test_a_bf16_meta_gradient_is_close_to_float32s_and_parameters_stay_float32() -> None:
    """Second-order conv4 MAML on glyphs episodes: the meta-gradient under bf16 autocast
    is within BF16_GRAD_RTOL (relative L2) and BF16_GRAD_COSINE of float32's, and not
    equal to it (autocast really ran); parameters, gradients and a meta-step's updated
    weights stay float32."""
    host = create_host()
    task = host.get("task", "glyphs").load()(**GLYPHS, seed=0, device=torch.device("cpu"))
    plan = TrialPlan("maml", "conv4", {"meta_batch_size": 4, "inner_steps": 1,
                                       "first_order": False}, {"channels": 32})
    algorithm = build(host, task, plan, seed=0)
    episodes = task.sample(4, torch.Generator().manual_seed(0))

    def meta_gradient(precision: str, episodes: Episodes = episodes) -> torch.Tensor:
        model = copy.deepcopy(algorithm.model)
        with autocast(precision, task.device):
            meta_backward(model, episodes, task.loss, **algorithm.inner_loop_options())
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and g.dtype == torch.float32 for g in grads)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        return torch.cat([g.flatten() for g in grads if g is not None])

    exact, bf16 = meta_gradient("float32"), meta_gradient("bf16")
    error = float((bf16 - exact).norm() / exact.norm())
    cosine = float(torch.nn.functional.cosine_similarity(bf16, exact, dim=0))
    assert 0 < error < BF16_GRAD_RTOL and cosine > BF16_GRAD_COSINE, (error, cosine)
    # Smaller than the difference the episodes make: another batch, in float32.
    other = meta_gradient("float32", task.sample(4, torch.Generator().manual_seed(1)))
    assert error < 0.5 * float((other - exact).norm() / exact.norm())
    with autocast("bf16", task.device):
        loss = algorithm.meta_step(episodes)
    assert math.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in algorithm.model.parameters())
    assert all(v.dtype in (torch.float32, torch.int64)
               for v in algorithm.model.state_dict().values())


@pytest.mark.parametrize("argv, expected", [
    (["--precision", "fp8"], "precision: 'fp8' is not one of 'float32', 'bf16'"),
    (["--precision", "float32,half"], "precision: 'half' is not one of 'float32', 'bf16'"),
])
def test_an_unknown_precision_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
        expected: str) -> None:
    code = main(["run", "--task", "sinusoid", "--trials", "1", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "autometa.db").exists()  # nothing stored


def test_precision_settings_at_the_edge(tmp_path: Path) -> None:
    assert SearchConfig(task="sinusoid").precision == "float32"
    assert SearchConfig(task="sinusoid", precision=["bf16"]).precision == "bf16"
    assert SearchConfig(task="sinusoid", precision="float32,bf16,bf16").precision == [
        "float32", "bf16"]
    for bad in ([], 16, ["bf16", None]):
        with pytest.raises(ConfigError, match="^precision: "):
            SearchConfig(task="sinusoid", precision=bad)
    file = tmp_path / "s.toml"
    file.write_text('task = "sinusoid"\nprecision = ["float32", "bf16"]\n')
    assert SearchConfig.from_file(file).precision == ["float32", "bf16"]
    check_supported(["float32", "bf16"], torch.device("cpu"))  # CPU autocast has bf16


def test_a_study_resumes_only_in_its_own_precision(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
            "--trials", "1", "--meta-steps", "2", "--eval-every", "2", "--threads", "1",
            "--task-param", "val_episodes=4", "--task-param", "test_episodes=4",
            "--no-progress", "--study", "s"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--trials", "2", "--precision", "bf16"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "precision: 'float32' -> 'bf16'" in line and "use the original settings" in line
