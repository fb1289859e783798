"""meta-album task: several datasets in Meta-Album's format, episodes each from one domain,
meta-test scored per domain (leaderboard, CSV, terminal, Markdown, HTML report).

Every test writes its own tiny datasets with Pillow in tmp_path (labels.csv + images/):
solid 8x8 RGB images whose red channel names the domain, green the class and blue the
image, so a gathered image says exactly where it came from. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from browser import open_page
from limits import CLI_SEARCH
from PIL import Image

import autometa
from autometa import ConfigError, DataError
from autometa.cli import main
from autometa.report import write_report
from autometa.testing import check_task
from autometa_plugins.meta_album.task import MetaAlbum

DOMAINS = {"BCT": 30, "FLW": 130, "PLK": 230}  # dataset folder -> red value of its images
#: 6 classes a domain split 2 / 2 / 2; 2-way 1-shot episodes with 2 queries per class.
SMALL = {"size": 8, "ways": 2, "shots": 1, "queries": 2, "val_fraction": 0.34,
         "test_fraction": 0.34, "val_episodes": 6, "test_episodes": 9}


def write_domain(root: Path, name: str, red: int, *, classes: int = 6, per_class: int = 4,
                 columns: tuple[str, str] = ("FILE_NAME", "CATEGORY"), sep: str = ",",
                 images: str = "images") -> Path:
    """One dataset in Meta-Album's format; image (c, i) is solid (red, 20 c, 10 i)."""
    folder = root / name
    (folder / images).mkdir(parents=True, exist_ok=True)
    rows = [sep.join([*columns, "SUPER_CATEGORY"])]
    for c in range(classes):
        for i in range(per_class):
            file = f"{name.lower()}_{c}_{i}.png"
            Image.fromarray(np.full((8, 8, 3), (red, 20 * c, 10 * i), np.uint8)).save(
                folder / images / file)
            rows.append(sep.join([file, f"class {c}", "NAN"]))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def make_album(root: Path, **kwargs: int) -> Path:
    for name, red in DOMAINS.items():
        write_domain(root, name, red, **kwargs)
    return root


def where(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The domain index and class of each image (..., 3, 8, 8): from its red and green."""
    pixel = (x[..., :, 0, 0] * 255).round().long()  # (..., 3)
    domain = torch.bucketize(pixel[..., 0].contiguous(), torch.tensor([80, 180]))  # 30 / 130 / 230
    return domain, pixel[..., 1] // 20


def check_episodes(task: MetaAlbum, support: torch.Tensor, query: torch.Tensor,
                   support_y: torch.Tensor, query_y: torch.Tensor, split: int
                   ) -> torch.Tensor:
    """Assert that each episode is from one domain, its classes from that domain's ``split``
    and its labels one per class; return each episode's domain index."""
    x, y = torch.cat([support, query], 1), torch.cat([support_y, query_y], 1)  # (tasks, n, ..)
    domain, cls = where(x)  # (tasks, n)
    assert (domain == domain[:, :1]).all(), "an episode mixes domains"
    for e in range(len(x)):
        d = int(domain[e, 0])
        allowed = {c - sum(len(dom.classes) for dom in task.domains[:d])
                   for c in task.class_split[d][split]}
        assert set(cls[e].tolist()) <= allowed
        for label in range(task.ways):  # one class per label, one label per class
            assert len(set(cls[e][y[e] == label].tolist())) == 1
        assert len(set(cls[e].tolist())) == task.ways
    return domain[:, 0]


# -- the task -------------------------------------------------------------------------------
def test_check_task_passes(tmp_path: Path) -> None:
    task = check_task(MetaAlbum, path=str(make_album(tmp_path / "album")), **SMALL)
    assert task.input_shape == (3, 8, 8) and task.output_size == 2
    assert [d.name for d in task.domains] == sorted(DOMAINS)
    assert task.train_classes == 6 and len(task.class_names) == 18
    facts = task.describe()
    assert facts["domains"] == sorted(DOMAINS) and facts["images"]["FLW"] == 24
    assert facts["class_split"]["PLK"] == {"meta-train": 2, "meta-val": 2, "meta-test": 2}
    x, y = task.sample_labelled(32, torch.Generator().manual_seed(0))
    assert x.shape == (32, 3, 8, 8) and int(y.max()) < task.train_classes


def test_meta_train_episodes_come_from_one_domain_drawn_uniformly(tmp_path: Path) -> None:
    task = MetaAlbum(path=make_album(tmp_path / "album"), **SMALL)
    g = torch.Generator().manual_seed(0)
    drawn = []
    for _ in range(20):  # 20 batches of 30 episodes
        batch = task.sample(30, g)
        assert batch.support_x.shape == (30, 2, 3, 8, 8) and batch.query_x.shape[1] == 4
        drawn.append(check_episodes(task, batch.support_x, batch.query_x, batch.support_y,
                                    batch.query_y, split=0))
    counts = torch.bincount(torch.cat(drawn), minlength=3)
    # 600 draws at 1/3: 200 each, standard deviation 11.5; 5 of them either way
    assert ((counts - 200).abs() < 58).all(), counts


def test_fixed_episodes_record_their_domains(tmp_path: Path) -> None:
    task = MetaAlbum(path=make_album(tmp_path / "album"), **SMALL)
    names = [d.name for d in task.domains]
    for split, episodes, index in (("meta-val", task.meta_val(), 1),
                                   ("meta-test", task.meta_test(), 2)):
        recorded = task.episode_domains(split)
        assert recorded is not None and len(recorded) == len(episodes)
        got = check_episodes(task, episodes.support_x, episodes.query_x, episodes.support_y,
                             episodes.query_y, split=index)
        assert recorded == [names[d] for d in got.tolist()]
        # shared evenly: 6 and 9 episodes over 3 domains
        assert {recorded.count(n) for n in names} == {len(episodes) // 3}
    again = MetaAlbum(path=tmp_path / "album", **SMALL)
    assert again.episode_domains("meta-test") == task.episode_domains("meta-test")


def test_a_domain_splits_the_same_whichever_others_are_chosen(tmp_path: Path) -> None:
    root = make_album(tmp_path / "album")
    every = MetaAlbum(path=root, **SMALL)
    two = MetaAlbum(path=root, domains="PLK, BCT", **SMALL)
    assert [d.name for d in two.domains] == ["BCT", "PLK"]  # sorted, spaces ignored
    six = 6  # classes per domain: PLK's ids start after BCT's in `two`, after FLW's in `every`
    assert two.class_split[0] == every.class_split[0]
    assert [[c - six for c in s] for s in two.class_split[1]] == \
        [[c - 2 * six for c in s] for s in every.class_split[2]]
    assert set(two.episode_domains("meta-test") or []) == {"BCT", "PLK"}
    one = MetaAlbum(path=root, domains="FLW", **{**SMALL, "val_episodes": 2})
    assert one.episode_domains("meta-test") is None  # a single domain: nothing to split


def test_meta_train_augmentation_is_per_trial_and_leaves_evaluation_alone(
        tmp_path: Path) -> None:
    task = MetaAlbum(path=make_album(tmp_path / "album"), **SMALL)
    plain = task.sample(4, torch.Generator().manual_seed(5))
    test = task.meta_test()[:]
    task.configure_trial(jitter=0.4)
    augmented = task.sample(4, torch.Generator().manual_seed(5))
    assert torch.equal(augmented.query_y, plain.query_y)
    assert not torch.equal(augmented.support_x, plain.support_x)
    assert torch.equal(task.meta_test()[:].query_x, test.query_x)


def test_info_json_names_the_columns_tab_separated_images_beside_the_csv(
        tmp_path: Path) -> None:
    root = tmp_path / "album"
    folder = write_domain(root, "OWN", 30, columns=("image", "label"), sep="\t", images=".")
    # Meta-Album's own sample info.json ends with a trailing comma: tolerated
    (folder / "info.json").write_text('{"image_column_name": "image", "category_column_name": '
                                      '"label", "csv_with_tab": true, '
                                      '"images_in_sub_folder": false,}')
    write_domain(root, "STD", 230)
    task = MetaAlbum(path=root, **SMALL)
    assert task.describe()["classes"] == {"OWN": 6, "STD": 6}
    assert task.domains[0].classes[0] == "class 0"


# -- bad input: one clear error -------------------------------------------------------------
def _without_labels(root: Path) -> dict[str, object]:
    make_album(root)
    (root / "FLW" / "labels.csv").unlink()
    return {}


def _wrong_columns(root: Path) -> dict[str, object]:
    make_album(root)
    write_domain(root, "PLK", 230, columns=("file", "category"))
    return {}


def _missing_images(root: Path) -> dict[str, object]:
    make_album(root)
    for i in (1, 3):
        (root / "BCT" / "images" / f"bct_2_{i}.png").unlink()
    return {}


BadCase = tuple[Callable[[Path], dict[str, object]], type[Exception], list[str]]
CASES: dict[str, BadCase] = {
    "no labels.csv": (_without_labels, DataError,
                      ["dataset folder", "FLW' has no labels.csv", "FILE_NAME, CATEGORY",
                       "domains="]),
    "columns missing": (_wrong_columns, DataError,
                        ["PLK/labels.csv' has no column 'FILE_NAME', 'CATEGORY'",
                         "columns are ['file', 'category', 'SUPER_CATEGORY']", "info.json"]),
    "images missing": (_missing_images, DataError,
                       ["2 of the 24 image(s) named in", "BCT/labels.csv",
                        "(first: 'bct_2_1.png', row 11)", "delete their rows"]),
    "fewer classes than ways": (lambda root: (make_album(root), {"ways": 3})[-1], DataError,
                                ["domain 'BCT' has 2 meta-train class(es), fewer than ways = 3",
                                 "meta-train 2, meta-val 2, meta-test 2", "lower 'ways'"]),
    "unknown domain": (lambda root: (make_album(root), {"domains": "BCT,FLX"})[-1],
                       ConfigError, ["unknown domain 'FLX' (did you mean 'FLW'?)",
                                     "available: BCT, FLW, PLK"]),
    "domain twice": (lambda root: (make_album(root), {"domains": "BCT,BCT"})[-1],
                     ConfigError, ["names 'BCT' twice"]),
    "a dataset, not the folder above": (
        lambda root: (make_album(root), {"path": str(root / "BCT")})[-1], DataError,
        ["is one dataset", "domains='BCT'"]),
    "missing folder": (lambda root: {"path": "no/such/dir"}, DataError,
                       ["'no/such/dir' does not exist"]),
    "empty labels.csv": (lambda root: (make_album(root),
                                       (root / "FLW" / "labels.csv").write_text(""), {})[-1],
                         DataError, ["FLW/labels.csv' is empty"]),
    "too few images": (lambda root: (make_album(root), {"shots": 2, "queries": 3})[-1],
                       DataError, ["of domain 'BCT' has 4 image(s), fewer than shots + "
                                   "queries = 5"]),
    "fewer episodes than domains": (lambda root: (make_album(root), {"test_episodes": 2})[-1],
                                    ConfigError, ["test_episodes=2 is fewer than the 3 domains"]),
    "no path": (lambda root: {"path": None}, ConfigError, ["give the folder"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(tmp_path: Path, case: str) -> None:
    setup, error, expected = CASES[case]
    root = tmp_path / "album"
    params = {**SMALL, "path": str(root), **setup(root)}
    with pytest.raises(error) as raised:
        MetaAlbum(**params)  # type: ignore[arg-type]
    message = str(raised.value)
    assert message.startswith("meta-album: ") and "\n" not in message
    for part in expected:
        assert part in message, message


def argv(root: Path, *extra: str, **params: object) -> list[str]:
    settings = {**SMALL, "path": str(root), **params}
    return ["run", "--task", "meta-album",
            *(a for k, v in settings.items() for a in ("--task-param", f"{k}={v}")),
            "--algorithms", "protonet", "--sources", "mlp", "--param", "mlp.hidden=40",
            "--trials", "2", "--meta-steps", "2", "--eval-every", "2", "--threads", "1",
            "--no-progress", *extra]


@pytest.mark.parametrize("case", ["no labels.csv", "columns missing", "images missing",
                                  "fewer classes than ways", "unknown domain"])
def test_cli_bad_input_exits_2_in_one_line_and_stores_nothing(
        tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    setup, _, expected = CASES[case]
    params = setup(tmp_path / "album")
    assert main(argv(tmp_path / "album", **params)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autometa: error: meta-album: "), err
    assert expected[0] in err[0]
    assert not (tmp_path / "autometa.db").exists() and not (tmp_path / "autometa-reports").exists()


# -- the search, end to end, and the per-domain leaderboard ----------------------------------
@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`autometa run` on three tiny domains (study "album"): its folder and the result."""
    base = tmp_path_factory.mktemp("search")
    make_album(base / "album")
    result = subprocess.run([sys.executable, "-m", "autometa",
                             *argv(Path("album"), "--study", "album")],
                            cwd=base, env={**os.environ, "COLUMNS": "200",
                                           "AUTOMETA_CACHE_DIR": str(base / "cache")},
                            capture_output=True, text=True, timeout=CLI_SEARCH)
    assert result.returncode == 0, result.stderr
    return base, result


def test_cli_search_scores_every_domain(
        searched: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """`autometa run` prints and writes one per-domain row per domain per scored trial, and
    the stored study read back (its task rebuilt from the settings) gives the same table."""
    base, result = searched
    reports = base / "autometa-reports"
    frame = pd.read_csv(reports / "album.csv")
    domains = pd.read_csv(reports / "album-domains.csv")
    assert list(domains.columns) == ["rank", "trial", "algorithm", "source", "domain",
                                     "test_accuracy", "test_ci95", "test_n"]
    scored = frame[frame["test_n"] > 0]
    # the 2 searched trials and the 3 baselines on raw inputs, each scored per domain
    assert len(scored) == 2 + 3 and len(domains) == len(scored) * 3
    assert scored["baseline"].sum() == 3
    for row in scored.itertuples():
        mine = domains[domains["trial"] == row.trial]
        assert list(mine["domain"]) == sorted(DOMAINS) and (mine["test_n"] == 3).all()
        assert (mine["rank"] == row.rank).all()
        # the domains' episodes are the test episodes: their means average to the whole's
        assert float((mine["test_accuracy"] * mine["test_n"]).sum() / 9) == \
            pytest.approx(row.test_accuracy)
    assert "album: meta-test accuracy per domain" in result.stdout
    for name in DOMAINS:
        assert f"│ {name} " in result.stdout
    assert "album-domains.csv" in result.stdout
    assert "## Per domain" in (reports / "album.md").read_text()

    board = autometa.load_leaderboard("album", f"sqlite:///{base / 'autometa.db'}",
                                      data_root=str(base))
    assert board.by_domain is not None
    pd.testing.assert_frame_equal(board.by_domain.reset_index(drop=True), domains,
                                  check_dtype=False)


def test_the_report_shows_each_domain_in_a_browser(
        searched: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path,
        chromium: str) -> None:
    """The HTML report's per-domain table (one row per domain, the scored trials as
    columns), in a real browser: no error, no request, a domain (a folder name) holding
    markup shown as text."""
    base, _ = searched
    board = autometa.load_leaderboard("album", f"sqlite:///{base / 'autometa.db'}",
                                      data_root=str(base))
    html = board.report(tmp_path / "html").read_text()
    assert 'id="study-1-domains">per domain</h2>' in html
    table = html[html.index('class="domains"'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + 3 and table.count("protonet + mlp") == 2
    for name in DOMAINS:
        assert f"<td>{name}</td>" in table
    assert board.by_domain is not None
    nasty = board.by_domain.replace({"domain": {"FLW": "<script>alert(5)</script>"}})
    path = write_report([dataclasses.replace(board, by_domain=nasty)], tmp_path / "nasty")
    assert "<script>alert(5)" not in path.read_text()
    check = open_page(path, tmp_path / "shot.png", executable=chromium)
    assert check.console_errors == [] and check.page_errors == []
    assert check.dialogs == [] and check.requests == []
    assert "per domain" in check.text and "<script>alert(5)</script>" in check.text
    assert "#1 trial" in check.text and "BCT" in check.text


def test_the_best_model_adapts_to_a_new_dataset_and_predicts_its_images(
        searched: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    """`read_inputs`: a support set in Meta-Album's format, inputs as a folder of images."""
    base, _ = searched
    model = autometa.load_model("album", 1, storage=f"sqlite:///{base / 'autometa.db'}",
                                artifacts=str(base / "autometa-artifacts"),
                                data_root=str(base))
    new = write_domain(tmp_path, "NEW", 130, classes=2, per_class=3)
    predicted = model.adapt(new).predict(new / "images")
    assert len(predicted.labels) == 6 and set(predicted.labels) <= {"class 0", "class 1"}
    assert predicted.classes == ["class 0", "class 1"]
    with pytest.raises(DataError, match="is not a Meta-Album dataset"):
        model.adapt(new / "images")


def test_a_single_domain_task_changes_nothing(tmp_path: Path) -> None:
    """No per-domain table, file, Markdown section or report section for a task of one
    domain (here sinusoid; meta-album with one domain is checked above)."""
    board = autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=1,
                            meta_steps=2, eval_every=2, source_params={"mlp": {"hidden": 40}},
                            task_params={"val_episodes": 3, "test_episodes": 4,
                                         "eval_queries": 5},
                            storage=f"sqlite:///{tmp_path / 'a.db'}",
                            artifacts=str(tmp_path / "art"))
    assert board.by_domain is None and board.domain_rows() == ([], [])
    paths = board.write(tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not list((tmp_path / "out").glob("*domains*"))
    assert "Per domain" not in (tmp_path / "out" / f"{board.study_name}.md").read_text()
    assert "per domain" not in board.report(tmp_path / "html").read_text()
