"""A storage reached through ``autometa storage-proxy``: the URL ``grpc://host:port``.

The proxy (:mod:`autometa.engine.proxy`) serves Optuna's gRPC storage service
(``GrpcStorageProxy`` is its client) and, on the same port, autometa's own small service
:data:`SERVICE`, which carries what Optuna's does not:

- **the storage lock** (:func:`hold_lock`): a streaming call that the proxy answers once it
  holds the lock of the storage behind it (a PostgreSQL advisory lock, a ``flock``) and
  that keeps it until the call ends, so workers through any number of proxies, and workers
  connected to the database directly, claim the budget under one lock;
- **heartbeats**: :class:`ProxyStorage` is Optuna's ``GrpcStorageProxy`` plus Optuna's
  heartbeat interface, each beat and each look for stale trials one call that the proxy
  makes on its own RDB storage.

A plain Optuna proxy (``optuna.storages.run_grpc_proxy_server``) lacks that service:
opening it is refused (:func:`open_proxy`), as the budget could not be kept exact.
"""

from __future__ import annotations

import json
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial

from autometa.errors import ConfigError

#: The gRPC service of autometa's proxy, beside Optuna's ``StorageService``.
SERVICE = "autometa.StorageProxy"
#: Its methods: the lock (unary request, stream of answers), a heartbeat, the stale trials
#: of a study, and what the proxy serves (its heartbeat interval, autometa's version).
LOCK, BEAT, STALE, INFO = "Lock", "Heartbeat", "StaleTrials", "Info"
#: Seconds a client waits for the proxy to answer when it opens the storage.
CONNECT_TIMEOUT = 20
#: Longest pause, in seconds, before asking again for a lock the proxy could not queue.
MAX_BACKOFF = 1.0
#: The extra that installs grpcio.
INSTALL = "pip install 'autometa-ml[grpc]'"


def encode(value: Any) -> bytes:
    """A message of :data:`SERVICE`: JSON."""
    return json.dumps(value).encode()


def decode(data: bytes) -> Any:
    """The inverse of :func:`encode`."""
    return json.loads(data or b"null")


def address(url: str) -> tuple[str, int]:
    """``(host, port)`` of a ``grpc://host:port`` URL.

    Raises:
        ConfigError: not of that form (the fix: the form, and the command serving it).
    """
    rest = url.split("://", 1)[1] if "://" in url else ""
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or "/" in rest.rstrip("/") or not 0 < int(port) < 65536:
        raise ConfigError(f"storage: {url!r} is not a proxy address; write grpc://HOST:PORT "
                          "(what `autometa storage-proxy URL` prints when it starts)")
    return host.strip("[]"), int(port)


def require_grpc() -> Any:
    """The ``grpc`` module.

    Raises:
        ConfigError: grpcio is not installed (the fix: the ``grpc`` extra).
    """
    try:
        import grpc
    except ImportError:
        raise ConfigError(f"the gRPC storage proxy needs grpcio; install it with {INSTALL}"
                          ) from None
    return grpc


class ProxyStorage(optuna.storages.GrpcStorageProxy, BaseHeartbeat):
    """Optuna's ``GrpcStorageProxy`` with heartbeats: a trial's beat and the look for stale
    trials are calls to the proxy (:data:`SERVICE`), which makes them on its RDB storage,
    so a trial of a lost machine is found stale and queued again as it is without a proxy.

    Use :func:`open_proxy`, which checks that the proxy is autometa's.
    """

    def __init__(self, url: str) -> None:
        host, port = address(url)
        self.url = url
        with warnings.catch_warnings():  # experimental in Optuna since 4.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(host=host, port=port)
        self._interval: int | None = None
        #: What Optuna's ``fail_stale_trials`` calls on each stale trial (set by the opener).
        self.stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        call = self._channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=encode,
                                         response_deserializer=decode)
        return call(request, timeout=timeout)

    def info(self, timeout: float | None = None) -> dict[str, Any]:
        """What the proxy serves: ``{"heartbeat_interval": seconds or None, "version"}``.

        Raises:
            grpc.RpcError: UNIMPLEMENTED from a proxy that is not autometa's.
        """
        info: dict[str, Any] = self._call(INFO, {}, timeout)
        self._interval = info.get("heartbeat_interval")
        return info

    def record_heartbeat(self, trial_id: int) -> None:
        self._call(BEAT, {"trial_id": trial_id})

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return list(self._call(STALE, {"study_id": study_id}))

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial],
                                                             None] | None:
        return self.stale_callback

    @contextmanager
    def hold_lock(self) -> Iterator[None]:
        """Hold the lock of the storage behind the proxy (see the module's docstring).

        The proxy lets a bounded number of calls wait for the lock (``--threads`` less the
        threads it keeps for the storage); a call it turns away is made again after a
        random pause that doubles each time, up to :data:`MAX_BACKOFF` seconds.
        """
        method = self._channel.unary_stream(f"/{SERVICE}/{LOCK}", request_serializer=encode,
                                            response_deserializer=decode)
        pause = 0.01
        while True:
            call = method({})
            try:
                held = next(call)
            except BaseException:
                call.cancel()
                raise
            if held:
                break
            call.cancel()
            time.sleep(random.uniform(0.5, 1.0) * pause)
            pause = min(2 * pause, MAX_BACKOFF)
        try:
            yield
        finally:
            call.cancel()  # the proxy sees the call end and releases the lock


_opened: dict[str, ProxyStorage] = {}
_opening = threading.Lock()


def open_proxy(url: str) -> ProxyStorage:
    """The storage behind the proxy at ``grpc://host:port``, after checking that it answers
    and is autometa's (one client per URL and process: the lock and the storage share it).

    Raises:
        ConfigError: grpcio missing, a malformed URL, a proxy that does not answer within
            :data:`CONNECT_TIMEOUT` seconds, or one that is not ``autometa storage-proxy``.
    """
    grpc = require_grpc()
    with _opening:
        storage = _opened.get(url)
        if storage is not None:
            return storage
        storage = ProxyStorage(url)
        try:
            storage.info(timeout=CONNECT_TIMEOUT)
        except grpc.RpcError as exc:
            storage.close()
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ConfigError(
                    f"storage: {url} is not an autometa storage proxy (it has no budget "
                    "lock, so the budget could not be kept exact); serve the database with "
                    "`autometa storage-proxy URL`") from None
            raise ConfigError(f"storage: no storage proxy answers at {url} "
                              f"({exc.code().name.lower()}); start it with `autometa "
                              "storage-proxy DATABASE-URL --host HOST --port PORT`, or check "
                              "the address") from None
        _opened[url] = storage
        return storage


@contextmanager
def hold_lock(url: str) -> Iterator[None]:
    """Hold the lock of the storage behind the proxy at ``url`` (:meth:`ProxyStorage.hold_lock`).

    Raises:
        ConfigError: see :func:`open_proxy`.
    """
    with open_proxy(url).hold_lock():
        yield
