"""The decoded-image store: built once, reused, shared by processes, checked on open."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from limits import QUICK_SUBPROCESS
from PIL import Image

from autometa import ConfigError, DataError
from autometa.cache import cache_dir, clear, stores
from autometa.image_store import ArrayImages, FileImages, open_store
from autometa.images import decode_file


def write_images(root: Path, n: int = 12, size: tuple[int, int] = (20, 20)) -> list[Path]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        file = root / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(file)
        files.append(file)
    return files


def build(files: list[Path], cache: Path, **settings: object):
    source = FileImages(files, slot=str(files[0].parent))
    return open_store(source, name="test", size=int(settings.pop("size", 8)),  # type: ignore
                      channels=settings.pop("channels", 3), cache_dir=cache,  # type: ignore
                      **settings)  # type: ignore[arg-type]


def test_the_store_holds_each_image_as_decoded_and_is_reused(tmp_path: Path) -> None:
    files = write_images(tmp_path / "images")
    store = build(files, tmp_path / "cache")
    assert store.shape == (12, 3, 8, 8) and store.pixels.dtype == np.uint8
    for i in (0, 5, 11):
        expected = decode_file(files[i], size=8, channels=3)[0]  # (8, 8, 3)
        assert np.array_equal(store.pixels[i].transpose(1, 2, 0), expected)
    got = store.gather(torch.tensor([[3, 0], [11, 3]]), torch.device("cpu"))
    assert got.shape == (2, 2, 3, 8, 8) and got.dtype == torch.float32
    assert torch.equal(got[0, 0], torch.from_numpy(np.array(store.pixels[3])).float() / 255)
    built = store.path.stat().st_mtime_ns
    again = build(files, tmp_path / "cache")  # reused: not written again
    assert again.path == store.path and again.path.stat().st_mtime_ns == built
    other = build(files, tmp_path / "cache", size=6)  # another size: another store
    assert other.path != store.path and other.shape == (12, 3, 6, 6)
    assert len(stores(tmp_path / "cache")) == 2


def test_a_changed_folder_gets_a_new_store_and_the_old_one_goes(tmp_path: Path) -> None:
    files = write_images(tmp_path / "images")
    first = build(files, tmp_path / "cache")
    before = np.array(first.pixels[2])
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(files[2])
    os.utime(files[2], ns=(1, 1))  # a different mtime, whatever the clock's resolution
    second = build(files, tmp_path / "cache")
    assert second.path != first.path and not first.path.exists()
    assert not np.array_equal(np.array(second.pixels[2]), before)
    assert int(np.array(second.pixels[2]).max()) == 0
    assert [s.name for s in stores(tmp_path / "cache")] == [second.path.stem]


class _Changing(FileImages):
    """A folder whose content changes while its store is built (the key read again at
    the end differs)."""

    calls = 0

    def key(self) -> dict[str, object]:
        _Changing.calls += 1
        return {**super().key(), "call": _Changing.calls}


def test_images_that_change_during_the_build_are_never_kept(tmp_path: Path) -> None:
    files = write_images(tmp_path / "images")
    with pytest.raises(DataError, match="images changed while the store was built"):
        open_store(_Changing(files, slot="x"), name="test", size=8, channels=3,
                   cache_dir=tmp_path / "cache")
    assert stores(tmp_path / "cache") == [] or all(
        s.name.endswith("") and not s.complete for s in stores(tmp_path / "cache"))
    assert not list((tmp_path / "cache" / "stores").glob("*.u8*"))


@pytest.mark.parametrize("damage", ["truncate", "flip-bytes", "no-manifest", "bad-json"])
def test_a_partial_or_corrupt_store_is_rebuilt(tmp_path: Path, damage: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    files = write_images(tmp_path / "images")
    store = build(files, tmp_path / "cache")
    good = np.array(store.pixels)
    del store.pixels  # unmap before damaging the file
    meta = store.path.with_suffix(".json")
    if damage == "truncate":
        os.truncate(store.path, store.path.stat().st_size // 2)
    elif damage == "flip-bytes":
        with open(store.path, "r+b") as handle:
            handle.write(bytes(255 - b for b in handle.read(64)))
    elif damage == "no-manifest":
        meta.unlink()
    else:
        meta.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        again = build(files, tmp_path / "cache")
    assert np.array_equal(np.array(again.pixels), good)
    if damage != "no-manifest":
        assert "partial or corrupt; rebuilding it" in caplog.text


def test_channels_resize_policies_and_one_stretch_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wide = write_images(tmp_path / "wide", n=3, size=(40, 20))
    with caplog.at_level(logging.WARNING):
        stretched = build(wide, tmp_path / "cache", size=10)
    assert caplog.text.count("3 of 3 images are not square and were stretched") == 1
    gray = build(wide, tmp_path / "cache", size=10, channels=1)  # colour → grayscale
    assert gray.shape == (3, 1, 10, 10)
    # A white image 40x20: padding keeps it whole (black bars above and below).
    white = tmp_path / "white"
    white.mkdir()
    Image.new("RGB", (40, 20), (255, 255, 255)).save(white / "w.png")
    Image.new("L", (10, 10), 128).save(white / "g.png")  # grayscale → RGB
    padded = build([white / "w.png", white / "g.png"], tmp_path / "cache", size=10,
                   resize="pad")
    rows = np.array(padded.pixels[0, 0]).mean(1)  # (10,)
    assert rows[0] == 0 and rows[-1] == 0 and rows[5] == 255
    assert np.array_equal(np.array(padded.pixels[1]), np.full((3, 10, 10), 128))
    cropped = build([white / "w.png"], tmp_path / "cache", size=10, resize="center-crop")
    assert int(np.array(cropped.pixels).min()) == 255
    auto = build([white / "g.png"], tmp_path / "cache", size=10, channels="auto")
    assert auto.shape == (1, 1, 10, 10)  # every image gray: one channel
    assert stretched.shape == (3, 3, 10, 10)


def test_arrays_are_stored_like_files(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    store = open_store(ArrayImages(pixels, facts={"sha": "abc"}, slot="cifar"), name="cifar",
                       size=32, channels=3, cache_dir=tmp_path / "cache")
    assert np.array_equal(np.array(store.pixels).transpose(0, 2, 3, 1), pixels)


def test_a_cache_directory_that_cannot_be_written_is_one_clear_error(tmp_path: Path) -> None:
    files = write_images(tmp_path / "images", n=2)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"cache directory .* is not writable .*--cache-dir"):
        build(files, tmp_path / "a-file" / "cache")


def test_a_full_disk_removes_the_partial_store(tmp_path: Path) -> None:
    """The build runs with a file-size limit (RLIMIT_FSIZE, enforced by the kernel) below
    the store's size: writing fails as on a full disk."""
    write_images(tmp_path / "images", n=12)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        from autometa import DataError
        from autometa.image_store import FileImages, open_store
        files = sorted(Path({str(tmp_path / 'images')!r}).glob('*.png'))
        try:
            open_store(FileImages(files, slot='x'), name='test', size=16, channels=3,
                       cache_dir={str(tmp_path / 'cache')!r})
        except DataError as exc:
            print(exc)
            sys.exit(2)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=QUICK_SUBPROCESS)
    assert done.returncode == 2, done.stderr
    assert "filled while the store was built" in done.stdout
    assert "partial store was removed" in done.stdout
    assert not list((tmp_path / "cache" / "stores").glob("*.u8*"))


CONCURRENT = """
import os, sys, time
from pathlib import Path
from autometa.image_store import FileImages, open_store

# A barrier: all three processes start building at once (after their imports).
ready = Path(sys.argv[3] + "-ready")
ready.mkdir(parents=True, exist_ok=True)
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 3:
    time.sleep(0.01)

class Counting(FileImages):
    def decode(self, i, size, channels, resize):
        with open(sys.argv[2], "a") as log:
            log.write("x")
        time.sleep(0.05)
        return super().decode(i, size, channels, resize)

files = sorted(Path(sys.argv[1]).glob("*.png"))
store = open_store(Counting(files, slot="x"), name="test", size=8, channels=3,
                   cache_dir=sys.argv[3])
print(store.path, int(store.pixels.sum()))
"""


def test_concurrent_builders_build_once_and_read_the_same_store(tmp_path: Path) -> None:
    write_images(tmp_path / "images", n=20)
    script = tmp_path / "build.py"
    script.write_text(CONCURRENT)
    log = tmp_path / "decoded.log"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "images"),
                               str(log), str(tmp_path / "cache")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=QUICK_SUBPROCESS) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len({o[0] for o in outs}) == 1  # the same store, the same pixels
    assert log.read_text() == "x" * 20  # decoded once, by one of them


def test_cache_dir_setting_list_and_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          ) -> None:
    monkeypatch.setenv("AUTOMETA_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and cache_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("AUTOMETA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "autometa"
    store = build(write_images(tmp_path / "images", n=3), tmp_path / "c")
    listed = stores(tmp_path / "c")
    assert [(s.dataset, s.shape, s.resize, s.complete) for s in listed] == [
        ("test", (3, 3, 8, 8), "stretch", True)]
    manifest = json.loads(store.path.with_suffix(".json").read_text())
    assert manifest["shape"] == [3, 3, 8, 8]
    assert clear(tmp_path / "c") == (1, listed[0].bytes) and stores(tmp_path / "c") == []
