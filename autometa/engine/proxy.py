"""``autometa storage-proxy``: a database storage served to many workers over gRPC.

What ``optuna.storages.run_grpc_proxy_server`` does (Optuna's ``StorageService`` over one
RDB storage, behind Optuna's in-process cache of finished trials), with autometa's service
(:data:`~autometa.study.proxy.SERVICE`) on the same port: the storage lock, taken on the
database for a worker (:func:`~autometa.engine.lock.storage_lock`) and held while its call
stays open, and trials' heartbeats recorded on the proxy's storage. Workers then hold one
gRPC connection each, and the database a few connections per proxy, however many workers
there are. Optuna's function cannot take a second service, report the port it bound or stop
on a signal, so its three lines (``optuna.storages._grpc.server.make_server``) are here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import optuna

from autometa.engine.lock import storage_lock
from autometa.engine.outage import is_storage_error
from autometa.errors import ConfigError, redact
from autometa.study.proxy import BEAT, INFO, LOCK, SERVICE, STALE, decode, encode, require_grpc
from autometa.study.storage import one_reason, open_storage
from autometa.study.urls import JOURNAL_SUFFIXES, is_proxy, scheme
from autometa.version import __version__

log = logging.getLogger(__name__)

#: Threads serving calls. Each worker waiting for the lock holds one (idle: a thread
#: blocked on a lock costs no CPU), so this bounds the workers that wait without retrying.
THREADS = 1024
#: Threads kept for the storage's calls, never waiting for the lock: the worker holding it
#: is never starved of one.
SPARE = 32
#: Seconds calls in flight get to finish when the proxy is stopped.
STOP_GRACE = 2.0


class Proxy:
    """A started proxy of the storage at ``url`` on ``host:port``; :meth:`stop` ends it.

    Raises:
        ConfigError: a storage that cannot be proxied (a journal file, in-memory, another
            proxy) or opened, grpcio missing, or a port that cannot be bound.
    """

    def __init__(self, url: str, host: str = "127.0.0.1", port: int = 13000,
                 threads: int = THREADS) -> None:
        grpc = require_grpc()
        if is_proxy(url) or scheme(url) not in {"sqlite", "postgresql", "mysql"}:
            raise ConfigError(f"storage-proxy: {redact(url)} cannot be proxied; give a "
                              "database URL (postgresql://..., mysql://... or a SQLite file "
                              "sqlite:///path.db), not a journal file "
                              f"({', '.join(JOURNAL_SUFFIXES)}), memory or another proxy")
        from optuna.storages._cached_storage import _CachedStorage
        from optuna.storages._grpc.auto_generated import api_pb2_grpc
        from optuna.storages._grpc.servicer import OptunaStorageProxyService

        self.url = url
        rdb = open_storage(url)  # creates the tables: workers through the proxy cannot
        assert isinstance(rdb, optuna.storages.RDBStorage)
        # Optuna's own advice for the proxy: its cache of finished trials in front.
        self.storage = _CachedStorage(rdb)
        # No SO_REUSEPORT (gRPC's default on Linux): a second proxy on a taken port must
        # fail, not share the port with the first and serve half of the calls.
        self._server = grpc.server(ThreadPoolExecutor(max_workers=threads,
                                                      thread_name_prefix="proxy"),
                                   interceptors=(_outage_interceptor(grpc),),
                                   options=[("grpc.so_reuseport", 0)])
        api_pb2_grpc.add_StorageServiceServicer_to_server(
            OptunaStorageProxyService(self.storage), self._server)
        self._service = _Service(self.storage, url, max(1, threads - SPARE, threads // 2))
        self._server.add_generic_rpc_handlers((self._service.handler(grpc),))
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ConfigError(f"storage-proxy: cannot listen on {host}:{port} (taken, or not "
                              "an address of this machine); choose another --port or --host")
        self.host = host
        self._server.start()

    @property
    def address(self) -> str:
        """The URL workers give as ``--storage``: ``grpc://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"grpc://{host}:{self.port}"

    def wait(self) -> None:
        """Serve until :meth:`stop` (or Ctrl-C, SIGTERM: the caller stops it then)."""
        self._server.wait_for_termination()

    def stop(self) -> None:
        """Stop serving: calls in flight get :data:`STOP_GRACE` seconds; locks held are
        released with them."""
        self._server.stop(STOP_GRACE).wait()
        self.storage._backend.engine.dispose()


def _outage_interceptor(grpc: Any) -> Any:
    """Calls that fail because the database cannot be reached (a server restarting) end
    with gRPC's UNAVAILABLE, not UNKNOWN: a worker then waits for it as it waits for a
    database it reaches directly (:func:`~autometa.engine.outage.is_storage_error`)."""

    def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: Any) -> Any:
            try:
                return behavior(request, context)
            except Exception as exc:
                if is_storage_error(exc):
                    context.abort(grpc.StatusCode.UNAVAILABLE,
                                  f"the database is unreachable: {one_reason(exc)}")
                raise
        return call

    class Interceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            handler = continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler  # the lock (a stream) reports its own failures
            return handler._replace(unary_unary=guard(handler.unary_unary))

    return Interceptor()


class _Service:
    """autometa's calls (:mod:`autometa.study.proxy`) on the proxy's storage."""

    def __init__(self, storage: Any, url: str, waiters: int) -> None:
        self._storage, self._url = storage, url
        self._local = threading.Lock()  # one holder in this process, then the database's
        self._waiting = threading.BoundedSemaphore(waiters)

    def handler(self, grpc: Any) -> Any:
        self._grpc = grpc
        def unary(fn: Callable[[Any, Any], Any]) -> Any:
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=decode,
                                                       response_serializer=encode)

        return grpc.method_handlers_generic_handler(SERVICE, {
            LOCK: grpc.unary_stream_rpc_method_handler(self.lock, request_deserializer=decode,
                                                       response_serializer=encode),
            BEAT: unary(self.beat), STALE: unary(self.stale), INFO: unary(self.info)})

    def lock(self, request: Any, context: Any) -> Iterator[bool]:
        """Answer True once the lock is held, and hold it until the caller's call ends
        (the caller cancels it, or its connection drops); False (try again later) when all
        the threads that may wait are waiting already."""
        if not self._waiting.acquire(blocking=False):
            yield False
            return
        ended = threading.Event()
        context.add_callback(ended.set)
        with ExitStack() as held:
            try:
                self._local.acquire()
                held.callback(self._local.release)
            finally:
                self._waiting.release()
            if not context.is_active():
                return
            try:
                held.enter_context(storage_lock(self._url))
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                context.abort(self._grpc.StatusCode.UNAVAILABLE,
                              f"the database is unreachable: {one_reason(exc)}")
            yield True
            while not ended.wait(1.0) and context.is_active():
                pass

    def beat(self, request: Any, context: Any) -> dict[str, Any]:
        self._storage.record_heartbeat(int(request["trial_id"]))
        return {}

    def stale(self, request: Any, context: Any) -> list[int]:
        return list(self._storage._get_stale_trial_ids(int(request["study_id"])))

    def info(self, request: Any, context: Any) -> dict[str, Any]:
        return {"heartbeat_interval": self._storage.get_heartbeat_interval(),
                "version": __version__}
