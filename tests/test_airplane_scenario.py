"""The seed's scenario, end to end as a user runs it: a folder of `airplane` and
`not-airplane` images, a search from the command line, the HTML report opened in a real
browser, and the winning model predicting new images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import open_page, screenshot_stats

from autometa.cli import main


def _draw(folder: Path, airplane: bool, n: int, seed: int) -> list[str]:
    """``n`` 16x16 grayscale images: an airplane is a bright cross (fuselage and wings) at
    a random place on a noisy sky; anything else is a few dim random blobs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        pixels = rng.integers(0, 50, size=(16, 16)).astype(np.uint8)
        if airplane:
            r, c = rng.integers(4, 12, size=2)
            pixels[r - 4:r + 4, c] = 240  # fuselage
            pixels[r - 1, c - 4:c + 5] = 240  # wings
        else:
            for _ in range(3):
                r, c = rng.integers(0, 14, size=2)
                pixels[r:r + 2, c:c + 2] = rng.integers(60, 120)
        name = f"{'plane' if airplane else 'other'}-{seed}-{i:02d}.png"
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


@pytest.mark.usefixtures("chromium")
def test_airplane_images_search_report_and_predict(tmp_path: Path, chromium: str,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    _draw(tmp_path / "photos" / "airplane", True, 20, 0)
    _draw(tmp_path / "photos" / "not-airplane", False, 20, 1)

    # 1. The search: transfer to the user's own two classes (a train/val/test split).
    code = main(["run", "--task", "image-folder", "--task-param", "path=photos",
                 "--task-param", "episodes=split", "--task-param", "size=16",
                 "--algorithms", "finetune,linear-probe,protonet", "--sources", "mlp",
                 "--trials", "5", "--meta-steps", "20", "--eval-every", "10", "--top-k", "3",
                 "--study", "airplanes", "--threads", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "airplanes: image-folder, accuracy (higher is better)" in out
    board = pd.read_csv(tmp_path / "autometa-reports" / "airplanes.csv")
    assert len(board) >= 3 and (board["test_ci_over"].iloc[:3] == "examples").all()
    assert board["tie_group"].iloc[0] == 1
    # The train score beside the test score: each scored model adapted on the train split
    # and scored on it (what a transfer user reads for over- or under-fitting).
    scored = board[board["test_accuracy"].notna()]
    assert scored["train_accuracy"].between(0, 1).all() and len(scored) >= 3

    # 2. The report: offline HTML that a real browser renders with its figures.
    assert main(["report", "airplanes", "--out", "reports"]) == 0
    assert capsys.readouterr().out.strip() == "wrote reports/airplanes.html"
    check = open_page(tmp_path / "reports" / "airplanes.html", tmp_path / "shot.png",
                      executable=chromium)
    assert check.console_errors == [] and check.page_errors == [] and check.requests == []
    assert len(check.images) >= 4 and all(int(i["naturalWidth"]) > 0 for i in check.images)
    colours, ink = screenshot_stats(tmp_path / "shot.png")
    assert colours > 50 and ink > 0.05
    assert "airplanes" in check.text and "finetune" in check.text
    assert "train accuracy" in check.text and "test accuracy" in check.text

    # 3. The winning model on new photos: a CSV of labels and probabilities.
    new = _draw(tmp_path / "new", True, 5, 7) + _draw(tmp_path / "new", False, 5, 8)
    assert main(["predict", "airplanes", "--rank", "1", "--input", "new",
                 "--out", "predictions.csv"]) == 0
    assert capsys.readouterr().out.strip() == "wrote predictions.csv (10 predictions)"
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns) == ["file", "label", "p_airplane", "p_not-airplane"]
    assert sorted(predictions["file"]) == sorted(new)
    truth = ["airplane" if f.startswith("plane") else "not-airplane"
             for f in predictions["file"]]
    # Bright crosses against dim blobs: the best of five trials tells them apart.
    assert (predictions["label"] == truth).mean() >= 0.8, predictions
    np.testing.assert_allclose(predictions[["p_airplane", "p_not-airplane"]].sum(axis=1), 1,
                               rtol=1e-5)
