"""Reading a local image directory: find its layout and classes, then decode the images.

Two layouts (``layout="auto"`` tells them apart from the folder itself):

* **classes**: ``root/<class>/<image>``, one folder per class;
* **omniglot**: ``root/<alphabet>/<character>/<image>``, a class is a character (named
  ``"<alphabet>/<character>"``) and the alphabet is its group (for a split by alphabet).

Auto-detection rule: if no class-level folder holds sub-folders, the layout is
*classes*; if none holds images directly, it is *omniglot*; a folder where some hold
images and others (or the same one) hold sub-folders is rejected, naming one of each.
An explicit ``layout`` reads only what that layout expects and ignores the rest (with a
log message). Hidden entries (``.name``, ``__MACOSX``) and non-image files are skipped.

Only regular files (after following a symlink) are images, and only folders are folders:
a FIFO, socket or device (even one named ``pipe.png``), a dangling symlink, a symlink loop
and a symlink to a folder above it are skipped, never opened or followed, and named in
one warning at the end of the scan (skipping, rather than refusing the folder, because
such entries are debris that the data do not need; the class checks below still refuse a
folder left without images). So a scan never hangs on a FIFO or recurses through a loop.

Every problem is one :class:`~autometa.DataError` naming the folder or file, what was
expected and the fix. Scanning reads directory listings only; the task's store
(:mod:`autometa.image_store`) and :func:`autometa.images.decode_files` open files.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from autometa import ConfigError, DataError
from autometa.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

NAME = "image-folder"
LAYOUTS = ("auto", "classes", "omniglot")
CLASSES_HINT = "root/<class>/<image>"
OMNIGLOT_HINT = "root/<alphabet>/<character>/<image>"


@dataclass(frozen=True)
class ClassFolder:
    """One class: its name (the folder, relative to the root), its group, its image files."""

    name: str  # "cat", or "<alphabet>/<character>" in the Omniglot layout
    group: str  # the alphabet (Omniglot layout) or the class name itself
    files: tuple[Path, ...]  # sorted


@dataclass(frozen=True)
class Folder:
    """A scanned image directory: its layout and its classes, sorted by name."""

    root: Path  # as given (relative paths are kept relative, for messages)
    layout: str  # "classes" or "omniglot"
    classes: list[ClassFolder]

    @property
    def groups(self) -> list[str]:
        """The distinct groups (alphabets), sorted."""
        return sorted({c.group for c in self.classes})

    def __len__(self) -> int:
        return len(self.classes)


@dataclass
class _Listing:
    """The visible content of one directory."""

    images: list[Path]
    dirs: list[Path]


#: Entries listed by name in the warning about skipped entries; the rest are counted.
LISTED = 5


def _list(directory: Path, skipped: list[tuple[Path, str]]) -> _Listing:
    """Images and folders of ``directory``; other entries that are neither regular files nor
    folders go to ``skipped`` as ``(path, why)`` (see the module docstring)."""
    images: list[Path] = []
    dirs: list[Path] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name == "__MACOSX":
                continue
            path = Path(entry.path)
            try:
                mode = entry.stat().st_mode  # follows a symlink; never opens the entry
            except OSError as exc:  # a dangling symlink, a symlink loop, no permission
                why = ("a symlink loop" if exc.errno == errno.ELOOP else
                       "a dangling symlink" if entry.is_symlink() else
                       exc.strerror or type(exc).__name__)
                skipped.append((path, why))
                continue
            if stat.S_ISDIR(mode):
                if entry.is_symlink() and _points_above(path, directory):
                    skipped.append((path, "a symlink to a folder above it, a loop"))
                else:
                    dirs.append(path)
            elif not stat.S_ISREG(mode):  # never opened: reading a FIFO blocks forever
                skipped.append((path, _special(mode)))
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(path)
    return _Listing(sorted(images), sorted(dirs))


def _points_above(link: Path, directory: Path) -> bool:
    """Whether the folder ``link`` (in ``directory``) resolves to ``directory`` or above."""
    target, here = link.resolve(), directory.resolve()
    return target == here or target in here.parents


def _special(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _warn_skipped(root: Path, skipped: list[tuple[Path, str]]) -> None:
    """One warning naming the entries that are neither regular files nor folders."""
    if not skipped:
        return
    skipped = sorted(skipped, key=lambda entry: entry[0].as_posix())
    named = "; ".join(f"{path.relative_to(root).as_posix()!r} ({why})"
                      for path, why in skipped[:LISTED])
    more = f"; and {len(skipped) - LISTED} more" if len(skipped) > LISTED else ""
    log.warning("%s: skipped %d entr%s of %r that %s neither a regular file nor a folder: "
                "%s%s", NAME, len(skipped), "y" if len(skipped) == 1 else "ies", str(root),
                "is" if len(skipped) == 1 else "are", named, more)


def _check_root(root: Path) -> None:
    if not root.exists():
        where = "" if root.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise DataError(f"{NAME}: path {str(root)!r} does not exist{where}; give an existing "
                        f"folder of class folders ({CLASSES_HINT} or {OMNIGLOT_HINT})")
    if not root.is_dir():
        archive = root.suffix.lower() in {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z"}
        raise DataError(f"{NAME}: path {str(root)!r} is a file, not a folder; give a folder "
                        f"with one sub-folder of images per class ({CLASSES_HINT})"
                        + ("; unpack the archive first" if archive else ""))


def scan(root: Path, layout: str = "auto") -> Folder:
    """Find the classes of ``root`` in ``layout`` ("auto", "classes" or "omniglot").

    Raises:
        DataError: a missing folder, a file, no class folders, an empty class, a mixture
            of layouts (auto), an alphabet without characters.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"{NAME}: layout {layout!r} is not one of {list(LAYOUTS)}")
    _check_root(root)
    skipped: list[tuple[Path, str]] = []
    try:
        return _scan(root, layout, skipped)
    finally:  # also before an error such as "holds no images": it may be why
        _warn_skipped(root, skipped)


def _scan(root: Path, layout: str, skipped: list[tuple[Path, str]]) -> Folder:
    top = _list(root, skipped)
    if top.images:
        raise DataError(
            f"{NAME}: {str(root)!r} holds {len(top.images)} image(s) directly (first: "
            f"{top.images[0].name!r}); images must sit in class folders ({CLASSES_HINT}); "
            "move them into a folder per class, or point path at the folder above")
    if not top.dirs:
        raise DataError(f"{NAME}: {str(root)!r} has no class folders; expected one sub-folder "
                        f"of images per class ({CLASSES_HINT}) or the Omniglot layout "
                        f"({OMNIGLOT_HINT})")
    listings = {d: _list(d, skipped) for d in top.dirs}
    if layout == "auto":
        layout = _detect(root, listings)
    if layout == "classes":
        classes = [_class(root, d, listing, None, "sub-folder") for d, listing in
                   listings.items()]
    else:
        classes = []
        for alphabet, listing in listings.items():
            if listing.images:
                log.warning("%s: ignoring %d image(s) directly in alphabet folder %r "
                            "(layout 'omniglot')", NAME, len(listing.images), alphabet.name)
            if not listing.dirs:
                raise DataError(
                    f"{NAME}: alphabet folder {alphabet.name!r} in {str(root)!r} has no "
                    f"character folders; the Omniglot layout is {OMNIGLOT_HINT}; add "
                    "character folders, remove it, or use layout='classes'")
            classes += [_class(root, d, _list(d, skipped), alphabet.name, "deeper folder")
                        for d in listing.dirs]
    return Folder(root, layout, classes)


def _detect(root: Path, listings: dict[Path, _Listing]) -> str:
    with_images = [d.name for d, listing in listings.items() if listing.images]
    with_dirs = [d.name for d, listing in listings.items() if listing.dirs]
    if with_images and with_dirs:
        both = sorted(set(with_images) & set(with_dirs))
        what = (f"{both[0]!r} holds both images and sub-folders" if both else
                f"{with_images[0]!r} holds images (one folder per class) but "
                f"{with_dirs[0]!r} holds sub-folders (Omniglot layout)")
        raise DataError(
            f"{NAME}: {str(root)!r} mixes layouts: {what}; arrange every folder as "
            f"{CLASSES_HINT} or as {OMNIGLOT_HINT}, or set layout='classes' (sub-folders "
            "ignored) or layout='omniglot' (images beside character folders ignored)")
    return "omniglot" if with_dirs else "classes"


def _class(root: Path, folder: Path, listing: _Listing, group: str | None, ignored: str
           ) -> ClassFolder:
    name = folder.relative_to(root).as_posix()
    if not listing.images:  # the error alone: a warning about its folders would come first
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        only = (f", only {len(listing.dirs)} {ignored}(s), which are not read"
                if listing.dirs else "")
        raise DataError(f"{NAME}: class folder {name!r} in {str(root)!r} holds no images "
                        f"({suffixes}){only}; add images to it or remove it")
    if listing.dirs:
        log.warning("%s: ignoring %d %s(s) in class folder %r", NAME, len(listing.dirs),
                    ignored, name)
    return ClassFolder(name, group or name, tuple(listing.images))
