"""image-folder task: a local directory of images (one folder per class, or Omniglot's layout).

Every test draws its own small PNG files with Pillow in tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from limits import CLI_SEARCH, IN_PROCESS_CALL
from PIL import Image, ImageDraw

import autometa
from autometa import ConfigError, DataError
from autometa.images import decode_files
from autometa.testing import check_task
from autometa_plugins.image_folder.task import ImageFolder

EPISODES = {"ways": 2, "shots": 1, "queries": 2, "val_episodes": 4, "test_episodes": 4}


# -- drawing folders -----------------------------------------------------------------------
def glyph(label: int, index: int, size: int = 12, colour: bool = False) -> Image.Image:
    """A class-specific bright shape on seeded noise (unique per image)."""
    rng = np.random.default_rng(1000 * label + index)
    noise = rng.integers(0, 60, (size, size, 3) if colour else (size, size), dtype=np.uint8)
    image = Image.fromarray(noise)
    corner = (label * 3) % (size - 4)
    fill = (40 * label % 256, 255, 90) if colour else 255
    ImageDraw.Draw(image).rectangle([corner, 1, corner + 3, 1 + label % 5 + 3], fill=fill)
    return image


def make_classes(root: Path, classes: int = 8, per_class: int = 6, colour: bool = False,
                 suffix: str = ".png") -> Path:
    for label in range(classes):
        folder = root / f"class-{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            glyph(label, index, colour=colour).save(folder / f"{index}{suffix}")
    return root


def make_omniglot(root: Path, alphabets: int = 3, characters: int = 3, per: int = 5) -> Path:
    for a in range(alphabets):
        for c in range(characters):
            folder = root / f"alphabet-{a}" / f"character{c:02d}"
            folder.mkdir(parents=True)
            for index in range(per):
                glyph(a * characters + c, index).save(folder / f"{index}.png")
    return root


# -- the contract, in both modes and both layouts --------------------------------------------
@pytest.mark.parametrize("layout", ["classes", "omniglot"])
@pytest.mark.parametrize("episodes", ["few-shot", "split"])
def test_check_task_passes(tmp_path: Path, layout: str, episodes: str) -> None:
    make = make_classes if layout == "classes" else make_omniglot
    root = make(tmp_path / "data")
    params = EPISODES if episodes == "few-shot" else {"shots": 1, "queries": 1}
    task = check_task(ImageFolder, path=str(root), episodes=episodes, size=12, **params)
    n_classes = 8 if layout == "classes" else 9
    assert task.folder.layout == layout and len(task.class_names) == n_classes
    assert task.input_shape == (1, 12, 12) and task.images.shape == (len(task.labels), 1, 12, 12)
    if episodes == "few-shot":
        assert task.output_size == 2
        assert sorted(c for s in task.class_split for c in s) == list(range(n_classes))
        assert task.train_classes == len(task.class_split[0])
    else:
        assert task.output_size == task.train_classes == n_classes
    x, y = task.sample_labelled(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 1, 12, 12) and int(y.max()) < task.train_classes
    facts = task.describe()
    assert facts["classes"] == n_classes and facts["layout"] == layout


def test_split_by_alphabet_keeps_alphabets_disjoint(tmp_path: Path) -> None:
    """Each split gets whole alphabets, and its episodes only show its own alphabets' images."""
    task = ImageFolder(path=make_omniglot(tmp_path / "omniglot"), split_by="alphabet", size=12,
                       **EPISODES)
    groups = [{task.folder.classes[c].group for c in split} for split in task.class_split]
    assert [len(g) for g in groups] == [1, 1, 1]
    assert set.union(*groups) == {"alphabet-0", "alphabet-1", "alphabet-2"}
    flat = every_image(task).flatten(1)  # (n, C*H*W)
    for split, episodes in zip(task.class_split, (task.sample(4, torch.Generator().manual_seed(0)),
                                                  task.meta_val(), task.meta_test()), strict=True):
        shown = torch.cat([episodes.support_x, episodes.query_x], 1).flatten(2).flatten(0, 1)
        same = (shown[:, None] == flat[None]).all(-1)  # (shown, n): which stored image
        assert bool(same.any(1).all())
        assert set(task.labels[same.float().argmax(1)].tolist()) <= set(split)
    assert task.describe()["class_split"] == {"meta-train": 3, "meta-val": 3, "meta-test": 3}


# -- decoding ---------------------------------------------------------------------------------
def every_image(task: ImageFolder) -> torch.Tensor:
    """All of a task's images, gathered from its store: (n, C, size, size) float."""
    return task.images.gather(torch.arange(len(task.images)))



QUADRANTS = np.block([[np.full((6, 6), 0), np.full((6, 6), 255)],
                      [np.full((6, 6), 64), np.full((6, 6), 192)]]).astype(np.uint8)


def test_images_are_resized_and_scaled(tmp_path: Path) -> None:
    """A known pattern survives exactly at its own size, and at the corners when resized."""
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(QUADRANTS if name == "a" else 255 - QUADRANTS).save(
                tmp_path / "data" / name / f"{index}.png")
    task = ImageFolder(path=tmp_path / "data", episodes="split", size=12, shots=1, queries=1)
    images = every_image(task)
    assert images.dtype == torch.float32
    assert torch.equal(images[0, 0], torch.tensor(QUADRANTS, dtype=torch.float32) / 255)
    assert torch.equal(images[4, 0], torch.tensor(255 - QUADRANTS, dtype=torch.float32) / 255)
    for size in (6, 24):
        x = every_image(ImageFolder(path=tmp_path / "data", episodes="split", size=size, shots=1,
                                    queries=1))
        assert x.shape == (8, 1, size, size) and 0 <= float(x.min()) <= float(x.max()) <= 1
        corners = x[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]] * 255
        assert torch.allclose(corners, torch.tensor([0.0, 255, 64, 192]), atol=1e-4)


def test_channels_rgb_and_grayscale(tmp_path: Path) -> None:
    colour = [tmp_path / f"c{i}.png" for i in range(2)]
    for i, file in enumerate(colour):
        glyph(i, 0, colour=True).save(file)
    gray_rgb = tmp_path / "gray-rgb.png"  # saved as RGB, but R = G = B
    Image.fromarray(QUADRANTS).convert("RGB").save(gray_rgb)
    gray = tmp_path / "gray.png"
    Image.fromarray(QUADRANTS).save(gray)
    deep = tmp_path / "deep.png"  # 16-bit grayscale: the top 8 bits are kept
    Image.fromarray((QUADRANTS.astype(np.uint16) << 8) | 0x7F).save(deep)

    assert decode_files(colour, size=12, channels="auto").shape == (2, 3, 12, 12)
    assert decode_files([gray_rgb, gray], size=12, channels="auto").shape == (2, 1, 12, 12)
    mixed = decode_files([gray, colour[0]], size=12, channels="auto")  # one colour image: RGB
    assert mixed.shape == (2, 3, 12, 12) and (mixed[0] == QUADRANTS).all()
    assert (decode_files([deep], size=12, channels="auto")[0, 0] == QUADRANTS).all()
    as_gray = decode_files(colour, size=12, channels=1)
    expected = np.asarray(Image.open(colour[0]).convert("L"))  # Pillow's luminance
    assert as_gray.shape == (2, 1, 12, 12) and (as_gray[0, 0] == expected).all()
    assert decode_files([gray], size=12, channels=3).shape == (1, 3, 12, 12)

    task = ImageFolder(path=make_classes(tmp_path / "colour", colour=True, suffix=".jpg"),
                       size=12, **EPISODES)
    assert task.input_shape == (3, 12, 12) and task.meta_val().support_x.shape[2] == 3


# -- bad input: one clear error ------------------------------------------------------------------
def _corrupt(root: Path) -> dict[str, object]:
    make_classes(root)
    (root / "class-3" / "broken.png").write_bytes(b"not an image at all")
    return {}


def _truncated(root: Path) -> dict[str, object]:
    make_classes(root)
    data = (root / "class-1" / "0.png").read_bytes()
    (root / "class-1" / "0.png").write_bytes(data[: len(data) // 2])
    return {}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


CASES: dict[str, tuple[Callable[[Path], dict[str, object]], type[Exception], list[str]]] = {
    "missing folder": (lambda root: {"path": "no/such/dir"}, DataError,
                       ["'no/such/dir' does not exist", "relative to the working directory"]),
    "path is a file": (lambda root: {"path": make_classes(root) / "class-0" / "0.png"},
                       DataError, ["0.png' is a file, not a folder", "one sub-folder"]),
    "no class folders": (lambda root: {"path": _mkdir(root)}, DataError,
                         ["has no class folders", "root/<class>/<image>"]),
    "images at the root": (lambda root: {"path": make_classes(root) / "class-0"}, DataError,
                           ["holds 6 image(s) directly", "point path at the folder above"]),
    "empty class": (lambda root: (make_classes(root), _mkdir(root / "zebra"), {})[-1],
                    DataError, ["class folder 'zebra'", "holds no images", "add images"]),
    "no images anywhere": (lambda root: (_mkdir(root / "a"), _mkdir(root / "b"), {})[-1],
                           DataError, ["class folder 'a'", "holds no images"]),
    "corrupt image": (_corrupt, DataError,
                      ["class-3/broken.png", "UnidentifiedImageError", "replace or delete"]),
    "truncated image": (_truncated, DataError, ["class-1/0.png", "replace or delete"]),
    "too few images": (lambda root: (make_classes(root), (root / "class-5" / "0.png").unlink(),
                                     {"shots": 3, "queries": 3})[-1], DataError,
                       ["class 'class-5' has 5 image(s)", "shots + queries = 6",
                        "lower 'shots' or 'queries'"]),
    "more ways than classes": (lambda root: (make_classes(root), {"ways": 3})[-1], DataError,
                               ["3-way episodes need 3 classes",
                                "meta-train 4, meta-val 2, meta-test 2", "lower 'ways'"]),
    "too few alphabets": (lambda root: (make_omniglot(root, alphabets=2),
                                        {"split_by": "alphabet"})[-1], DataError,
                          ["needs at least 3 alphabets", "has 2 ('alphabet-0', 'alphabet-1')",
                           "split_by='class'"]),
    "mixed layouts": (lambda root: (make_classes(root), make_omniglot(root / "class-2" / "x"),
                                    {})[-1], DataError,
                      ["mixes layouts", "'class-2' holds both images and sub-folders",
                       "layout='classes'"]),
    "alphabet split without alphabets": (lambda root: (make_classes(root),
                                                       {"split_by": "alphabet"})[-1],
                                         ConfigError, ["needs few-shot episodes on the Omniglot",
                                                       "use split_by='class'"]),
    "alphabet without characters": (lambda root: (make_omniglot(root), _mkdir(root / "empty"),
                                                  {"layout": "omniglot"})[-1], DataError,
                                    ["alphabet folder 'empty'", "no character folders"]),
    "no path": (lambda root: {"path": None}, ConfigError, ["give the image folder"]),
    "unknown layout": (lambda root: {"layout": "flat"}, ConfigError,
                       ["layout='flat' is not one of"]),
    "split with one class": (lambda root: (make_classes(root, classes=1),
                                           {"episodes": "split"})[-1], DataError,
                             ["needs at least 2 class folders", "'class-0'"]),
    "split train too small": (lambda root: (make_classes(root, per_class=4),
                                            {"episodes": "split", "shots": 2})[-1], DataError,
                              ["in the train split, fewer than shots + queries = 4"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(tmp_path: Path, case: str) -> None:
    setup, error, expected = CASES[case]
    root = tmp_path / "data"
    params = {**EPISODES, "path": str(root), "size": 12, **setup(root)}
    with pytest.raises(error) as raised:
        ImageFolder(**params)  # type: ignore[arg-type]
    message = str(raised.value)
    assert message.startswith("image-folder: ") and "\n" not in message
    for part in expected:
        assert part in message, message


def test_explicit_layout_reads_only_its_own_entries(tmp_path: Path) -> None:
    """A mixture auto-detection rejects loads with an explicit layout, the rest ignored."""
    root = make_classes(tmp_path / "data")
    make_omniglot(root / "class-2" / "extra", alphabets=1, characters=1)
    task = ImageFolder(path=root, layout="classes", size=12, **EPISODES)
    assert len(task.class_names) == 8 and len(task.labels) == 48


# -- the engine and the CLI -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, autometa.Leaderboard]:
    """A tiny search on a generated folder: the storage and its leaderboard."""
    base = tmp_path_factory.mktemp("search")
    make_classes(base / "pets")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        board = autometa.search(
            "image-folder", algorithms=["maml"], sources=["mlp"], n_trials=2, meta_steps=10,
            eval_every=5, seed=0, study_name="pets", baselines=False,
            task_params={"path": str(base / "pets"), "size": 12, **EPISODES},
            storage=f"sqlite:///{base / 'autometa.db'}", artifacts=str(base / "artifacts"))
    finally:
        torch.set_num_threads(threads)
    return base, board


def test_search_on_a_folder_gives_a_leaderboard(searched: tuple[Path, autometa.Leaderboard]
                                               ) -> None:
    _, board = searched
    frame = board.frame
    assert len(frame) == 2 and set(frame["algorithm"]) == {"maml"}
    assert set(frame["source"]) == {"mlp"} and frame["val_accuracy"].between(0, 1).all()
    assert (frame["test_n"] == 4).all()


def test_cli_bad_folder_exits_2_and_keeps_the_storage(
    tmp_path: Path, searched: tuple[Path, autometa.Leaderboard]
) -> None:
    """`autometa run` on a folder with a corrupt image: exit 2, one line naming the file, and
    the storage holding an existing study of that name is byte for byte unchanged."""
    base, _ = searched
    _corrupt(tmp_path / "bad")
    before = (base / "autometa.db").read_bytes()
    params = [a for k, v in {**EPISODES, "path": "bad", "size": 12}.items()
              for a in ("--task-param", f"{k}={v}")]
    result = subprocess.run(
        [sys.executable, "-m", "autometa", "run", "--task", "image-folder", *params,
         "--study", "pets", "--storage", f"sqlite:///{base / 'autometa.db'}",
         "--algorithms", "maml", "--sources", "mlp", "--trials", "2", "--no-progress"],
        cwd=tmp_path, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True,
        timeout=CLI_SEARCH)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autometa: error: image-folder: "), \
        result.stderr
    assert "cannot read image 'bad/class-3/broken.png'" in lines[0]
    assert (base / "autometa.db").read_bytes() == before


# -- hostile entries: FIFOs, symlink loops, dangling links ----------------------------------
def finishes(call: Callable[[], object], seconds: float = IN_PROCESS_CALL) -> object:
    """``call()``'s result or exception; fails (rather than hangs) past ``seconds``."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


def test_fifo_and_symlink_loops_are_skipped_with_one_warning(tmp_path: Path, caplog) -> None:
    root = make_classes(tmp_path / "images", classes=6, per_class=3)
    os.mkfifo(root / "class-0" / "pipe.png")  # opening it would block forever
    (root / "class-1" / "self.png").symlink_to("self.png")  # a symlink to itself
    (root / "class-2" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "class-3" / "up").symlink_to("..")  # a folder loop (ignored sub-folder anyway)
    (root / "loop").symlink_to(".")  # a class folder that is the root itself
    (root / "class-4" / "linked.png").symlink_to(root / "class-5" / "0.png")  # a real image
    with caplog.at_level("WARNING", logger="autometa_plugins.image_folder.loader"):
        task = finishes(lambda: ImageFolder(path=root, size=8, val_fraction=0.34,
                                            test_fraction=0.34, **EPISODES))
    assert task.class_names == [f"class-{i}" for i in range(6)]
    assert torch.bincount(task.labels).tolist() == [3, 3, 3, 3, 4, 3]  # images per class
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [
        f"image-folder: skipped 5 entries of {str(root)!r} that are neither a regular file "
        "nor a folder: 'class-0/pipe.png' (a FIFO (named pipe)); 'class-1/self.png' (a "
        "symlink loop); 'class-2/gone.png' (a dangling symlink); 'class-3/up' (a symlink to "
        "a folder above it, a loop); 'loop' (a symlink to a folder above it, a loop)"
    ]


def test_a_class_of_only_a_fifo_is_refused_in_one_line(tmp_path: Path, caplog) -> None:
    root = make_classes(tmp_path / "images", classes=3, per_class=3)
    (root / "class-9").mkdir()
    os.mkfifo(root / "class-9" / "pipe.png")
    with caplog.at_level("WARNING", logger="autometa_plugins.image_folder.loader"), \
            pytest.raises(DataError) as info:
        finishes(lambda: ImageFolder(path=root, **EPISODES))
    assert str(info.value).startswith("image-folder: class folder 'class-9' in ")
    assert "holds no images" in str(info.value)
    assert any("'class-9/pipe.png' (a FIFO (named pipe))" in r.getMessage()
               for r in caplog.records)


def test_a_fifo_named_like_an_image_is_never_opened(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "images", classes=6, per_class=3)
    os.mkfifo(root / "class-0" / "pipe.png")  # reading it blocks until a writer comes
    task = finishes(lambda: ImageFolder(path=root, size=8, val_fraction=0.34,
                                        test_fraction=0.34, **EPISODES))
    assert torch.bincount(task.labels).tolist() == [3] * 6  # images per class


# -- your own split ---------------------------------------------------------------------------
def test_a_split_file_replaces_the_class_fractions(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data")
    names = sorted(p.name for p in root.iterdir())
    (tmp_path / "split.csv").write_text("name,split\n" + "".join(
        f"{n},{'train' if i < 4 else 'val' if i < 6 else 'test'}\n" for i, n in enumerate(names)))
    task = ImageFolder(path=root, split_file=tmp_path / "split.csv", size=12, ways=2, shots=1,
                       queries=1, val_episodes=3, test_episodes=3)
    assert task.describe()["classes_by_split"] == {
        "meta-train": names[:4], "meta-val": names[4:6], "meta-test": names[6:]}
    assert task.describe()["split"] == "split file"


def test_a_split_file_of_images_and_a_test_folder_replace_the_image_fractions(
        tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data")
    files = sorted(f.relative_to(root).as_posix() for f in root.rglob("*.png"))
    by_class = {}
    for f in files:
        by_class.setdefault(f.split("/")[0], []).append(f)
    rows = [(f, "train") for fs in by_class.values() for f in fs[:-2]]
    rows += [(fs[-2], "val") for fs in by_class.values()] + [(fs[-1], "test")
                                                             for fs in by_class.values()]
    (tmp_path / "images.csv").write_text("name,split\n" + "".join(f"{a},{b}\n" for a, b in rows))
    task = ImageFolder(path=root, episodes="split", split_file=tmp_path / "images.csv", size=12,
                       shots=1, queries=1)
    assert task.describe()["examples"] == {"train": len(files) - 16, "val": 8, "test": 8}
    # A test folder: two classes' test images, the rest of path split into train and val.
    test = tmp_path / "test"
    for name in list(by_class)[:2]:
        (test / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(test / name / f"t{i}.png")
    task = ImageFolder(path=root, episodes="split", test_path=test, size=12, shots=1, queries=1)
    assert task.describe()["examples"]["test"] == 6 and task.describe()["split"] == "test folder"
    assert task.meta_test()[:].query_y.tolist() == [[0, 0, 0, 1, 1, 1]]


def test_bad_user_splits_are_one_line(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data")
    name = sorted(p.name for p in root.iterdir())[0]
    (tmp_path / "s.csv").write_text(f"name,split\n{name},train\nno-such-class,val\n")
    with pytest.raises(DataError, match="names class 'no-such-class' that the folder"):
        ImageFolder(path=root, split_file=tmp_path / "s.csv", size=12)
    (tmp_path / "s.csv").write_text(f"name,split\n{name}/x.png,train\n")
    with pytest.raises(DataError, match="names image .* that the folder does not hold"):
        ImageFolder(path=root, episodes="split", split_file=tmp_path / "s.csv", size=12)
    (tmp_path / "s.csv").write_text("class,part\n")
    with pytest.raises(DataError, match="needs the columns name,split"):
        ImageFolder(path=root, split_file=tmp_path / "s.csv", size=12)
    (tmp_path / "test" / "unknown").mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "test" / "unknown" / "a.png")
    with pytest.raises(DataError, match="has class folder 'unknown' that path"):
        ImageFolder(path=root, episodes="split", test_path=tmp_path / "test", size=12)
    with pytest.raises(ConfigError, match="test_path holds test images for episodes='split'"):
        ImageFolder(path=root, test_path=tmp_path / "test", size=12)


# -- meta-train augmentation (per trial) ------------------------------------------------------
def test_augmentation_changes_meta_train_images_only_and_is_off_by_default(
        tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data")
    task = ImageFolder(path=root, size=12, **EPISODES)
    plain = task.sample(3, torch.Generator().manual_seed(5))
    val = task.meta_val()[:]
    task.configure_trial(crop_scale=0.5, flip=True, jitter=0.4)
    augmented = task.sample(3, torch.Generator().manual_seed(5))
    # The same episodes (labels, shapes), other pixels; evaluation episodes unchanged.
    assert torch.equal(augmented.support_y, plain.support_y)
    assert augmented.support_x.shape == plain.support_x.shape
    assert not torch.equal(augmented.support_x, plain.support_x)
    assert 0 <= float(augmented.query_x.min()) and float(augmented.query_x.max()) <= 1
    assert torch.equal(task.meta_val()[:].support_x, val.support_x)
    task.configure_trial(crop_scale=1.0, flip=False, jitter=0.0)  # off again: as before
    again = task.sample(3, torch.Generator().manual_seed(5))
    assert torch.equal(again.support_x, plain.support_x)


def test_augmentation_is_searched_per_trial(tmp_path: Path) -> None:
    make_classes(tmp_path / "data")
    board = autometa.search(
        "image-folder", task_params={"path": "data", "size": 12, **EPISODES,
                                     "flip": [False, True], "jitter": {"low": 0.0, "high": 0.5}},
        algorithms=["protonet"], sources=["conv4"], n_trials=3, meta_steps=2, eval_every=2)
    frame = board.frame[~board.frame["baseline"]]  # baselines do not meta-train: no setting
    assert {"task.flip", "task.jitter"} <= set(frame.columns)
    assert frame["task.jitter"].between(0.0, 0.5).all()


def test_plan_json_lists_the_classes_of_each_split(tmp_path: Path) -> None:
    import json

    from autometa.cli import main

    root = make_classes(tmp_path / "data")
    autometa.search("image-folder", task_params={"path": "data", "size": 12, **EPISODES},
                    algorithms=["protonet"], sources=["conv4"], n_trials=1, meta_steps=2,
                    eval_every=2)
    assert main(["export", "image-folder-seed0", "--out", "model"]) == 0
    # A few-shot image model's adapt/predict pair takes uint8 pixels (N, H, W, C).
    import torch

    adapt = torch.export.load(str(tmp_path / "model" / "adapt.pt2")).module()
    predict = torch.export.load(str(tmp_path / "model" / "predict.pt2")).module()
    pixels = torch.randint(0, 256, (6, 12, 12, 3), dtype=torch.uint8)
    spec = json.loads((tmp_path / "model" / "model.json").read_text())
    ways = int(spec["output"]["shape"][1])
    scores = predict(pixels[:4, ..., :spec["input"]["shape"][3]],
                     *adapt(pixels[..., :spec["input"]["shape"][3]],
                            torch.arange(6) % ways))
    assert scores.shape == (4, ways)
    plan = json.loads((tmp_path / "model" / "plan.json").read_text())
    split = plan["task"]["classes_by_split"]
    assert sorted(sum(split.values(), [])) == sorted(p.name for p in root.iterdir())
    assert set(split) == {"meta-train", "meta-val", "meta-test"}
    assert main(["report", "image-folder-seed0", "--out", "reports"]) == 0
    page = next((tmp_path / "reports").glob("*.html")).read_text()
    assert "classes of each split" in page
    assert f"meta-test ({len(split['meta-test'])})" in page
    assert ", ".join(split["meta-train"]) in page
