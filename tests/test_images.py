"""autometa.images: new images read for a built task (what ``autometa predict`` decodes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autometa import DataError
from autometa.images import image_files, read_new_images


def _write(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _support(path: Path) -> tuple[list[Path], list[str]]:
    files = sorted(path.glob("*/*.png"))
    return files, [f.parent.name for f in files]


def _read(path: Path, *, labelled: bool, channels: int = 3):  # type: ignore[no-untyped-def]
    return read_new_images(path, labelled=labelled, support=_support,
                           support_hint="a folder of class folders",
                           input_shape=(channels, 8, 8), resize="stretch", name="my-task")


def test_inputs_are_a_file_or_a_folder_searched_recursively_hidden_skipped(
        tmp_path: Path) -> None:
    a = _write(tmp_path / "in" / "a.png", (255, 0, 0))
    _write(tmp_path / "in" / "sub" / "b.png", (0, 255, 0))
    _write(tmp_path / "in" / ".hidden" / "c.png", (0, 0, 255))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    batch = _read(tmp_path / "in", labelled=False)
    assert batch.ids == ["a.png", "sub/b.png"] and batch.labels is None
    assert tuple(batch.x.shape) == (2, 3, 8, 8)
    assert np.allclose(batch.x[0, :, 0, 0].numpy(), [1.0, 0.0, 0.0])  # RGB order, [0, 1]
    one = _read(a, labelled=False)
    assert one.ids == ["a.png"] and tuple(one.x.shape) == (1, 3, 8, 8)


def test_colour_becomes_gray_for_a_gray_model(tmp_path: Path) -> None:
    _write(tmp_path / "in" / "a.png", (255, 0, 0), size=(16, 8))  # not square: stretched
    batch = _read(tmp_path / "in", labelled=False, channels=1)
    assert tuple(batch.x.shape) == (1, 1, 8, 8)
    assert abs(float(batch.x[0, 0, 0, 0]) - 76 / 255) < 1e-6  # ITU-R 601-2 luma of red


def test_a_support_set_is_read_by_the_tasks_layout_with_its_labels(tmp_path: Path) -> None:
    _write(tmp_path / "s" / "cat" / "1.png", (1, 2, 3))
    _write(tmp_path / "s" / "dog" / "1.png", (4, 5, 6))
    batch = _read(tmp_path / "s", labelled=True)
    assert batch.labels == ["cat", "dog"] and batch.ids == ["cat/1.png", "dog/1.png"]


def test_bad_paths_are_one_line_naming_the_task_the_option_and_the_fix(tmp_path: Path) -> None:
    file = _write(tmp_path / "a.png", (0, 0, 0))
    with pytest.raises(DataError, match=r"^my-task: --support .*a\.png' is a file; give a "
                                        r"folder of class folders$"):
        _read(file, labelled=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^my-task: --input .*empty' holds no images \("):
        _read(tmp_path / "empty", labelled=False)
    broken = tmp_path / "bad" / "x.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"^my-task: --input: cannot read image .*x\.png'"):
        _read(tmp_path / "bad", labelled=False)
    assert image_files(file) == [file]
