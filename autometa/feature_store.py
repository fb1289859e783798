"""Frozen features computed once per (source, weights, data) and shared by every trial.

The baseline algorithms (:class:`~autometa.frozen.FrozenFeatureAlgorithm`: nearest
centroid, linear probe, linear SVM) never train the network: three of them on one source
would otherwise run the same frozen network over every image of every meta-val and
meta-test episode again, each time (700 episodes of 80 images where the dataset may hold a
few thousand). Here the network embeds each example the evaluation episodes use once, and
the episodes gather feature rows instead (the memmap way of :mod:`autometa.image_store`).

A store holds, for one frozen network and one dataset, the float32 features (m, d) of the
m distinct examples that the task's meta-val and meta-test episodes use, in ascending
index order, in ``<cache>/stores/features-<source>-<slot>-<key>.f32`` with a JSON manifest.
Its key is everything that shapes the numbers:

* the source model's identity as the trial plan holds it (registered name and settings,
  noted by :func:`autometa.trial.build` through :func:`note_source`), the features
  module's class and ``repr``;
* a SHA-256 of the features module's ``state_dict`` (exact: a checkpoint file or
  pre-trained weights that changed give another store);
* the data's content key: the image store's own key (files, sizes, times, decoding
  settings); and which examples;
* the device type, the dtype and this format's version.

It is built by one process under a lock (others wait, then read the finished file),
written under a temporary name and renamed, its manifest last, and checked (size and
checksum) when opened, like an image store. It lives beside the dataset's image store (the
cache directory that store's task was given); ``autometa cache`` lists and clears both.
A newer store of the same source and data (other weights) replaces the older.

Used only where one example's features do not depend on the others in its batch: never
for a network with a BatchNorm that normalises with the batch's statistics (no running
statistics), nor one whose features of a probe batch differ from those of its halves,
nor features wider than float32. Those, a network with no parameters or buffers (``raw``:
nothing to compute), and episodes not held as indices into an image store (data held in
memory, small) are evaluated as before (a reason is logged once). Cached features equal the
uncached ones to float32 round-off (the network saw other batches; the predictions are
the same but for exact ties).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from autometa import cache, work
from autometa.algorithm import MetaAlgorithm
from autometa.frozen import EmbeddedEpisodes, FrozenFeatureAlgorithm
from autometa.image_store import StoredImages
from autometa.task import Episodes, EpisodeSet, IndexedEpisodes, MixedEpisodes, Task

__all__ = ["FeatureStore", "disabled", "embed", "embedded", "note_source", "per_example",
           "weights_digest"]

log = logging.getLogger(__name__)

#: Bumped whenever the stored features would differ for the same inputs.
FORMAT = 1
#: Bytes of inputs embedded at once, at most (as :data:`autometa.trial.EVAL_BYTES`).
BATCH_BYTES = 64 << 20
#: Examples embedded at once, at most.
BATCH = 256
#: Examples of the probe batch compared with its two halves (:func:`per_example`).
PROBE = 8

# The plan's source (name and settings) of each network built for a trial.
_sources: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()
# features module -> (state fingerprint, weights digest, per-example reason or None)
_weights: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str, str | None]] = \
    weakref.WeakKeyDictionary()
_open: dict[str, FeatureStore] = {}  # opened stores of this process, by key
_told: set[str] = set()  # fallback reasons already logged
_enabled: ContextVar[bool] = ContextVar("autometa_feature_store", default=True)


@contextmanager
def disabled() -> Iterator[None]:
    """Evaluate without stored features inside the block (every frozen network runs on
    every episode, as before this module): for comparisons and measurements."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)


def note_source(model: nn.Module, source: str, params: Mapping[str, Any]) -> None:
    """Record that ``model`` was built by source model ``source`` (its registered name)
    with ``params`` (its settings as the trial plan holds them): part of the store's key.

    A model never noted (not built for a trial) is evaluated without the store.
    """
    _sources[model] = {"source": source, "params": json.loads(json.dumps(
        dict(params), sort_keys=True, default=str))}


@dataclass
class FeatureStore:
    """One built store, mapped read-only.

    Attributes:
        rows: (m,) int64 ascending, the example indices held (CPU).
        features: (m, d) float32 memmap, row ``i`` the features of example ``rows[i]``.
        path: the data file.
    """

    rows: Tensor
    features: np.ndarray
    path: Path

    def covers(self, index: Tensor) -> bool:
        """True if every example of ``index`` (any shape) has a row here."""
        flat = index.reshape(-1).cpu().contiguous()
        if not len(flat):
            return True
        if not len(self.rows):
            return False
        at = torch.searchsorted(self.rows, flat).clamp_(max=len(self.rows) - 1)
        return bool((self.rows[at] == flat).all())

    def gather(self, index: Tensor, device: torch.device) -> Tensor:
        """Features of examples ``index`` (any shape, int64): (*index.shape, d) float32 on
        ``device``; every index must be covered (:meth:`covers`)."""
        at = torch.searchsorted(self.rows, index.reshape(-1).cpu().contiguous()).numpy()
        out = torch.from_numpy(self.features[at])  # a copy of just those rows
        return out.to(device).reshape(*index.shape, self.features.shape[1])


def per_example(features: nn.Module, probe: Tensor) -> str | None:
    """Why ``features`` (in eval mode) cannot be embedded one example at a time, or None.

    A BatchNorm without running statistics normalises with each batch's statistics; other
    batch-dependent layers are caught by embedding ``probe`` (a few examples, (k, ...)) as
    one batch and as two halves. Features wider than float32 would lose precision.
    """
    for name, module in features.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                not module.track_running_stats or module.running_mean is None):
            return (f"its BatchNorm {name or type(module).__name__!r} normalises with each "
                    "batch's statistics (no running statistics), so an example's features "
                    "depend on its episode")
    with torch.no_grad():
        whole = features(probe).flatten(1)
        if whole.dtype == torch.float64:
            return "its features are float64, wider than the store's float32"
        if len(probe) < 2:
            return None
        half = len(probe) // 2
        parts = torch.cat([features(probe[:half]), features(probe[half:])]).flatten(1)
    finite = whole[whole.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    # Non-finite features are refused later exactly as without the store.
    if not torch.allclose(whole.float(), parts.float(), rtol=1e-4, atol=1e-5 * max(1, scale),
                          equal_nan=True):
        return "an example's features depend on the other examples of its batch (probe)"
    return None


def embedded(algorithm: MetaAlgorithm, episodes: EpisodeSet, task: Task
             ) -> Callable[[Episodes, slice | Tensor], Episodes] | None:
    """How :func:`autometa.trial.evaluate` attaches stored features to each chunk of
    ``episodes``, or None where the store does not apply (see the module docstring).

    The stores it needs are opened, or built now (progress through
    :func:`autometa.work.report`). The returned ``attach(chunk, ids)`` turns
    ``episodes[ids]`` (given as ``chunk``) into :class:`~autometa.frozen.EmbeddedEpisodes`.
    """
    if (not _enabled.get() or not isinstance(algorithm, FrozenFeatureAlgorithm)
            or isinstance(episodes, Episodes)):
        return None
    identity = _sources.get(algorithm.model)
    if identity is None:
        return None
    features = algorithm.model.features
    if not any(True for _ in features.parameters()) and not any(True for _ in
                                                                 features.buffers()):
        return None  # nothing computed worth keeping (raw inputs): gathering is as cheap
    twin = _twin(episodes, task, features, identity)
    if twin is None:
        return None

    def attach(chunk: Episodes, ids: slice | Tensor) -> Episodes:
        rows = twin[ids]
        assert isinstance(rows, Episodes)
        return EmbeddedEpisodes(chunk.support_x, chunk.support_y, chunk.query_x,
                                chunk.query_y, rows.support_x, rows.query_x,
                                embedded_by=features)
    return attach


def _groups(episodes: EpisodeSet) -> list[IndexedEpisodes]:
    if isinstance(episodes, IndexedEpisodes):
        return [episodes]
    if isinstance(episodes, MixedEpisodes):
        return list(episodes.groups)
    return []


def _examples(group: IndexedEpisodes) -> StoredImages | None:
    """The image store ``group`` gathers from, if it gathers from one."""
    owner = getattr(group.gather, "__self__", None)
    return owner if isinstance(owner, StoredImages) else None


def _twin(episodes: EpisodeSet, task: Task, features: nn.Module, identity: dict[str, Any]
          ) -> EpisodeSet | None:
    """``episodes`` with each group gathering stored feature rows instead of examples."""
    groups = _groups(episodes)
    owners = [_examples(g) for g in groups]
    if not groups or any(o is None for o in owners):
        _tell(identity, "its episodes are not indices into an image store (data held in "
              "memory is small: embedding it per episode is cheap)")
        return None
    stores: dict[int, FeatureStore] = {}
    for owner in {id(o): o for o in owners}.values():
        assert owner is not None
        rows = _rows(task, episodes, owner)
        store = embed(features, owner, rows, identity=identity, device=task.device)
        if store is None:
            return None
        stores[id(owner)] = store
    twins = []
    for group, owner in zip(groups, owners, strict=True):
        assert owner is not None
        store = stores[id(owner)]
        if not (store.covers(group.support) and store.covers(group.query)):
            _tell(identity, "its episodes use examples outside the task's evaluation splits")
            return None
        twins.append(IndexedEpisodes(group.support, group.support_y, group.query,
                                     group.query_y, _gatherer(store, owner.device)))
    if isinstance(episodes, IndexedEpisodes):
        return twins[0]
    assert isinstance(episodes, MixedEpisodes)
    return MixedEpisodes(twins, episodes.group, episodes.position)


def _gatherer(store: FeatureStore, device: torch.device) -> Callable[[Tensor], Tensor]:
    return lambda index: store.gather(index, device)


def _rows(task: Task, episodes: EpisodeSet, owner: object) -> Tensor:
    """The distinct examples of ``owner`` that the task's meta-val and meta-test episodes
    (and ``episodes``) use: (m,) int64 ascending, on the CPU. The same for every trial, so
    one store serves meta-val, meta-test and any part of them."""
    used = [torch.cat([g.support.reshape(-1), g.query.reshape(-1)]).cpu()
            for split in (task.meta_val(), task.meta_test(), episodes)
            for g in _groups(split) if _examples(g) is owner]
    return torch.unique(torch.cat(used))  # sorted


def _tell(identity: dict[str, Any], reason: str) -> None:
    """Log once per source and reason why its features are computed per episode."""
    line = f"{identity['source']}: frozen features computed per episode, not stored: {reason}"
    if line not in _told:
        _told.add(line)
        log.info("%s", line)


def _digest(facts: Any) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def weights_digest(features: nn.Module) -> str:
    """SHA-256 (hex) of ``features``' state (every parameter and buffer: name, dtype,
    shape and bytes)."""
    hasher = hashlib.sha256()
    for name, tensor in features.state_dict().items():
        flat = tensor.detach().reshape(-1).cpu().contiguous()
        hasher.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\n".encode())
        hasher.update(flat.view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def _fingerprint(features: nn.Module) -> tuple[Any, ...]:
    """Changes whenever a tensor of the state is replaced or modified in place (its
    version counter), so the digest is recomputed only then."""
    return tuple((name, t.data_ptr(), t._version) for name, t in
                 features.state_dict(keep_vars=True).items())


def _network(features: nn.Module, probe: Callable[[], Tensor]) -> tuple[str, str | None]:
    """The weights digest of ``features`` and why it is not per-example (None: it is),
    remembered while its state is unchanged."""
    mark = _fingerprint(features)
    known = _weights.get(features)
    if known is not None and known[0] == mark:
        return known[1], known[2]
    training = features.training
    features.eval()
    try:
        reason = per_example(features, probe())
    finally:
        features.train(training)
    digest = weights_digest(features)
    _weights[features] = (mark, digest, reason)
    return digest, reason


def _data_key(owner: StoredImages) -> tuple[str, Path]:
    """The content key of the images and the folder their feature stores go in (the image
    store's own: the cache directory the task was given)."""
    return f"store:{owner.store.manifest['key']}", owner.store.path.parent


def embed(features: nn.Module, examples: StoredImages, rows: Tensor, *,
          identity: dict[str, Any], device: torch.device) -> FeatureStore | None:
    """The store of ``features`` (on ``device``) over examples ``rows`` of ``examples``:
    opened if built (by any process, any earlier run), else built now under its lock.

    Args:
        identity: the source model's name and settings (:func:`note_source`).

    Returns:
        None (and a reason logged once) if ``features`` is not per-example.

    Raises:
        ConfigError: the cache directory is not writable.
    """
    if not len(rows):
        return None
    digest, reason = _network(features, lambda: examples.gather(
        rows[:PROBE].to(examples.device)).to(device))
    if reason is not None:
        _tell(identity, reason)
        return None
    data, folder = _data_key(examples)
    what = {"source": identity, "module": f"{type(features).__module__}."
            f"{type(features).__qualname__}", "repr": _digest(repr(features))}
    content = _digest({"format": FORMAT, **what, "weights": digest, "data": data,
                       "rows": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
                       "device": device.type, "dtype": "float32"})
    if content in _open:
        return _open[content]
    slot = _digest({"slot": what, "data": data})[:10]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(identity["source"]))
    stem = f"features-{name}-{slot}-{content[:16]}"
    waiting = (f"{identity['source']}: another process is embedding these examples with "
               f"the same network; waiting for it ({folder / stem}.f32)")
    with cache.locked(folder / f"{stem}.lock", waiting):
        manifest = _valid(folder, stem, content)
        if manifest is None:
            manifest = _build(features, examples, rows, device, folder, stem, content,
                              _label(identity))
            _drop_older(folder, stem)
    path = folder / f"{stem}.f32"
    shape = tuple(manifest["shape"])
    store = FeatureStore(rows, np.memmap(path, dtype=np.float32, mode="r", shape=shape)
                         if shape[0] * shape[1] else np.zeros(shape, np.float32), path)
    _open[content] = store
    return store


def _valid(folder: Path, stem: str, content: str) -> dict[str, Any] | None:
    """The manifest of a complete, unaltered store; None (its files removed) if it is
    missing, partial, truncated or altered."""
    data, meta = folder / f"{stem}.f32", folder / f"{stem}.json"
    try:
        manifest = json.loads(meta.read_text())
        total = 4 * int(np.prod(manifest["shape"]))
        if (manifest["format"] == FORMAT and manifest["key"] == content
                and data.stat().st_size == total
                and cache.checksum(data, total) == manifest["check"]):
            return dict(manifest)
    except FileNotFoundError:
        if not data.exists():
            return None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.warning("feature store %s is partial or corrupt; rebuilding it", data)
    for path in (meta, data):
        path.unlink(missing_ok=True)
    return None


def _batches(rows: Tensor, per_example: int) -> Iterator[Tensor]:
    size = max(1, min(BATCH, BATCH_BYTES // max(1, per_example)))
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _label(identity: dict[str, Any]) -> str:
    """The source and its settings, for people: "transformers (path=dinov2-small)"."""
    params = identity.get("params") or {}
    settings = ", ".join(f"{k}={v}" for k, v in params.items())
    label = f"{identity['source']} ({settings})" if settings else str(identity["source"])
    return label if len(label) <= 100 else label[:99] + "…"


def _build(features: nn.Module, examples: StoredImages, rows: Tensor,
           device: torch.device, folder: Path, stem: str, content: str, source: str
           ) -> dict[str, Any]:
    """Embed ``rows`` batch by batch in eval mode into ``<stem>.f32``; its manifest last."""
    partial = folder / f"{stem}.f32.partial"
    what = f"{source}: embedding {len(rows)} examples with the frozen network"
    per_example = 4 * int(np.prod(examples.shape[1:]))
    training = features.training
    features.eval()
    dim = 0
    try:
        with open(partial, "wb") as out, torch.no_grad():
            work.report(what, 0, len(rows))
            done = 0
            for batch in _batches(rows, per_example):
                x = examples.gather(batch.to(examples.device)).to(device)
                got = features(x).flatten(1).to("cpu", torch.float32).contiguous()
                dim = got.shape[1]
                out.write(got.numpy().data)
                done += len(batch)
                work.report(what, done, len(rows))
            out.flush()
            os.fsync(out.fileno())
        data = folder / f"{stem}.f32"
        os.replace(partial, data)
        shape = [len(rows), dim]
        manifest = {"format": FORMAT, "kind": "features", "key": content,
                    "dataset": f"features of {source}", "resize": "-", "shape": shape,
                    "data": data.name, "itemsize": 4,
                    "check": cache.checksum(data, 4 * len(rows) * dim)}
        tmp = folder / f"{stem}.json.partial"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, folder / f"{stem}.json")  # written last: the store is complete
        return manifest
    finally:
        features.train(training)
        partial.unlink(missing_ok=True)


def _drop_older(folder: Path, stem: str) -> None:
    """Delete the other stores of the same slot (the same source and data, other weights);
    a process still reading one keeps its pages."""
    prefix = stem.rsplit("-", 1)[0] + "-"
    for path in folder.iterdir():
        if path.name.startswith(prefix) and not path.name.startswith(stem):
            path.unlink(missing_ok=True)
