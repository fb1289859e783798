"""Trial states in Optuna's artifact store: uploaded per trial, read back by any machine that
has the store, and bounded on disk by ``keep``.

Each completed trial's trained state (tensors only, :func:`save_state`) is
uploaded with :func:`optuna.artifacts.upload_artifact` as ``trial-<number>.pt``; the study's
storage records its artifact id (so optuna-dashboard lists it), and the bytes live in the
store:

- a directory (default ``autometa-artifacts``): Optuna's ``FileSystemArtifactStore`` in the
  directory itself, every study's states side by side as ``<directory>/<artifact id>`` (ids
  are UUIDs); for several machines, a path they all mount (NFS, a shared disk);
- ``s3://bucket``: Optuna's ``Boto3ArtifactStore`` (``pip install boto3``; credentials and
  an S3-compatible endpoint such as MinIO from boto3's usual environment variables,
  ``AWS_ENDPOINT_URL`` among them), ``s3://bucket/<artifact id>``.

Either is the layout optuna-dashboard reads: ``optuna-dashboard URL --artifact-dir
<directory>`` (or, for S3, ``--from-config`` with ``[artifact_store.boto3]
bucket_name = "bucket"``) serves the states of every study in the storage. Earlier
versions kept a directory's states in ``<directory>/<study>``, a folder per study that
optuna-dashboard cannot serve: autometa still reads and removes them there.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import optuna
import torch
from optuna.artifacts import download_artifact, get_all_artifact_meta, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from autometa.config import check_writable_dir
from autometa.errors import ConfigError, DataError
from autometa.study.baselines import searched
from autometa.study.completion import group_bests
from autometa.study.settings import stored_settings
from autometa.study.trials import ranked, ranked_trials

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

    from autometa.algorithm import MetaAlgorithm

log = logging.getLogger(__name__)

#: Study user attribute: numbers of trials whose state ``keep`` removed from the store.
REMOVED_ATTR = "autometa.removed"


def check_location(location: str) -> str | None:
    """Check an artifact store's location without creating anything; the S3 bucket, or
    None for a directory.

    Raises:
        ConfigError: a directory that cannot be created or written, ``s3://`` with a prefix
            or without boto3 installed, or another scheme.
    """
    if location.startswith("s3://"):
        bucket = location[len("s3://"):].strip("/")
        if not bucket or "/" in bucket:
            raise ConfigError(f"artifacts: {location!r} is not s3://BUCKET (no prefix: "
                              "Optuna's S3 store keys artifacts by id in the bucket)")
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise ConfigError(f"artifacts: {location!r} needs boto3; pip install boto3") from None
        return bucket
    if "://" in location:
        raise ConfigError(f"artifacts: {location!r} is neither a directory nor s3://BUCKET")
    check_writable_dir(Path(location), "artifacts")
    return None


def open_store(location: str, study: str) -> ArtifactStore:
    """The artifact store at ``location`` for study ``study`` (see the module docstring).

    Raises:
        ConfigError: see :func:`check_location`.
    """
    bucket = check_location(location)
    if bucket is not None:
        return optuna.artifacts.Boto3ArtifactStore(bucket)
    Path(location).mkdir(parents=True, exist_ok=True)
    return _Directory(Path(location), study)


class _Directory(optuna.artifacts.FileSystemArtifactStore):
    """Optuna's file store in ``root`` that also reads and removes the states earlier
    versions wrote into ``root/<study>``."""

    def __init__(self, root: Path, study: str) -> None:
        super().__init__(root)
        self.earlier = optuna.artifacts.FileSystemArtifactStore(root / study)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        try:
            return super().open_reader(artifact_id)
        except ArtifactNotFound:
            return self.earlier.open_reader(artifact_id)

    def remove(self, artifact_id: str) -> None:
        try:
            super().remove(artifact_id)
        except ArtifactNotFound:
            self.earlier.remove(artifact_id)


def state_name(number: int) -> str:
    """The artifact's file name for trial ``number``'s state."""
    return f"trial-{number}.pt"


class StoreWriteError(OSError):
    """A trial's state could not be written (a full disk, a read-only folder): to the
    artifact store (``in_store``), or to the temporary folder it is saved in first. The
    ``OSError`` raised is the cause, its ``errno`` this one's."""

    in_store = True


def upload_state(algorithm: MetaAlgorithm, trial: optuna.Trial, store: ArtifactStore) -> str:
    """Save ``algorithm``'s trained state and upload it as ``trial``'s artifact; its id.

    Raises:
        StoreWriteError: the store could not write it; nothing half-written is left in it.
    """
    with tempfile.TemporaryDirectory(prefix="autometa-state-") as tmp:
        path = Path(tmp) / state_name(trial.number)
        try:
            save_state(algorithm, path)
        except OSError as exc:
            error = StoreWriteError(exc.errno, f"cannot save trial {trial.number}'s state in "
                                    f"{tmp!r}: {exc.strerror or exc}")
            error.in_store = False
            raise error from exc
        try:
            return upload_artifact(artifact_store=_Tidy(store), file_path=str(path),
                                   study_or_trial=trial, mimetype="application/octet-stream")
        except OSError as exc:
            raise StoreWriteError(exc.errno, f"cannot write trial {trial.number}'s state: "
                                  f"{exc.strerror or exc}") from exc


class _Tidy:
    """An artifact store whose failed write leaves nothing behind: Optuna's file store
    writes in place, so a full disk would keep a truncated state under the artifact's id."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        try:
            self.store.write(artifact_id, content_body)
        except BaseException:
            try:
                self.store.remove(artifact_id)
            except Exception:  # never written, or the store is gone: nothing to remove
                pass
            raise

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.store.open_reader(artifact_id)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(artifact_id)


def state_artifact(trial: FrozenTrial, storage: optuna.storages.BaseStorage) -> str | None:
    """The artifact id of ``trial``'s state, or None if it never uploaded one."""
    for meta in get_all_artifact_meta(trial, storage=storage):
        if meta.filename == state_name(trial.number):
            return meta.artifact_id
    return None


def download_state(study: optuna.Study, trial: FrozenTrial, store: ArtifactStore,
                   location: str, into: Path) -> Path:
    """Fetch ``trial``'s state from the store into directory ``into``; the file's path.

    Raises:
        ConfigError: the trial has no state, ``keep`` removed it, or the store lacks it
            (another store than the one the workers wrote to).
    """
    artifact = state_artifact(trial, study._storage)
    legacy = stored_settings(study).get("artifacts_path")
    if artifact is None and legacy and (Path(legacy) / state_name(trial.number)).is_file():
        return Path(legacy) / state_name(trial.number)  # a study of autometa 0.1's first days
    if artifact is None:
        raise ConfigError(f"trial {trial.number} of study {study.study_name!r} has no saved "
                          "state in the storage (it ran before artifacts were uploaded, or "
                          "failed while saving); start a new study")
    if trial.number in study.user_attrs.get(REMOVED_ATTR, []):
        raise ConfigError(f"trial {trial.number}'s state was removed by the study's keep "
                          "setting (only the best on meta-val are kept); ask for fewer trials "
                          "(--top-k at most keep)")
    path = into / state_name(trial.number)
    try:
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=artifact)
    except ArtifactNotFound:
        raise ConfigError(f"trial {trial.number}'s state (artifact {artifact}) is not in the "
                          f"artifact store {location!r}; give the store the workers wrote to "
                          "(--artifacts, a path every machine shares)") from None
    return path


def check_shared(study: optuna.Study, location: str, given: bool) -> None:
    """Refuse to join ``study`` with an artifact store the other workers do not write to:
    a relative directory taken from the study (another machine's folder), or a store
    that lacks the state of the study's latest completed trial.

    Raises:
        ConfigError: one line naming the store and the fix (``--artifacts``).
    """
    fix = ("give --artifacts with the store every machine shares (a directory they all "
           "mount, or s3://BUCKET)")
    if not given and "://" not in location and not Path(location).is_absolute():
        raise ConfigError(f"artifacts: study {study.study_name!r} keeps trial states in "
                          f"{location!r}, a folder relative to the machine that created it; "
                          f"{fix}")
    removed = set(study.user_attrs.get(REMOVED_ATTR, []))
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.number not in removed and ranked(t)]
    for trial in sorted(done, key=lambda t: -t.number)[:1]:
        artifact = state_artifact(trial, study._storage)
        if artifact is None:
            return
        try:
            open_store(location, study.study_name).open_reader(artifact).close()
        except ArtifactNotFound:
            raise ConfigError(f"artifacts: {location!r} on this machine lacks trial "
                              f"{trial.number}'s state, which another worker stored: it is not "
                              f"the study's shared store; {fix}") from None


def keep_best(study: optuna.Study, store: ArtifactStore, keep: int | str) -> list[int]:
    """Remove the states of completed trials ranked below ``keep`` on meta-val; the numbers.

    Baseline trials keep their states and take no place among the ``keep``
    (:mod:`autometa.study.baselines`): they are few and small, and always listed. So does
    the best trial of each algorithm and of each source
    (:func:`autometa.study.completion.group_bests`), scored for the per-algorithm table.

    A trial ranked below ``keep`` never climbs back (later trials only push it down), nor
    does one that stopped being its algorithm's or source's best, so a state removed is
    never needed by a leaderboard of ``top_k <= keep``. Called under the
    storage lock after a trial completes; ``keep="all"`` removes nothing.
    """
    if keep == "all":
        return []
    assert isinstance(keep, int)
    best = searched(ranked_trials(study))
    protected = group_bests(best)
    removed: list[int] = list(study.user_attrs.get(REMOVED_ATTR, []))
    newly = []
    # A trial never ranked (pruned during its evaluation) uploaded no state.
    for trial in best[keep:]:
        if trial.number in removed or trial.number in protected:
            continue
        artifact = state_artifact(trial, study._storage)
        if artifact is not None:
            try:
                store.remove(artifact)
            except ArtifactNotFound:
                pass  # removed before (a crash between removing and recording it)
        newly.append(trial.number)
    if newly:
        study.set_user_attr(REMOVED_ATTR, sorted(removed + newly))
        log.info("removed the states of trials %s (keep=%s)", newly, keep)
    return newly


def save_state(algorithm: MetaAlgorithm, path: Path) -> None:
    """Save the trained state (tensors only, loadable with ``weights_only=True``).

    Raises:
        OSError: the file cannot be written (a full disk); no part of it is left.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        # Through a Python file: a full disk is then an OSError naming it (torch's own
        # writer says only "unexpected pos").
        with open(tmp, "wb") as handle:
            torch.save(algorithm.state_dict(), handle)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written is left
        raise
    tmp.replace(path)  # atomic: a crash never leaves a half-written state


def load_state(algorithm: MetaAlgorithm, path: Path, shown: str | None = None) -> None:
    """Restore a trial's saved state, read with ``weights_only=True`` (tensors only).

    ``shown`` names the state in messages (default: its path).

    Raises:
        DataError: the file is damaged or not one autometa wrote (one line; never torch's
            advice to unpickle it: autometa saves tensors only, so that is never needed).
    """
    try:
        state = torch.load(path, map_location=algorithm.task.device, weights_only=True)
        algorithm.load_state_dict(state)
    except Exception as exc:
        first = next(iter(str(exc).strip().splitlines()), "").split(". ")[0]
        detail = "" if "weights_only" in first or len(first) > 120 else f": {first}"
        raise DataError(
            f"{shown or f'trial state {str(path)!r}'} is corrupt or not the tensors autometa saved "
            f"({type(exc).__name__}{detail}); it was damaged or replaced: restore it from a "
            "copy, or start a new study"
        ) from None
