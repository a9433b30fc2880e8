"""FakeApiServer: the store + HTTPS handlers, run on a private event loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import socket
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import orjson
from aiohttp import web

from .authz import Rbac
from .faults import Faults
from .http import ApiHandlers
from .records import RequestLog, RequestRecord
from .resources import resource_type
from .state import Store
from .tls import TlsMaterial, kubeconfig, write_kubeconfig

T = TypeVar("T")

_CALL_TIMEOUT_S = 60.0  # generous: load() of 20k objects runs as one call
_SHUTDOWN_TIMEOUT_S = 0.2  # how long in-flight handlers get before being cancelled on stop


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (for servers that must start later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _Server(web.Server):
    """web.Server that remembers its transports: stop() aborts the ones still waiting for
    a peer's TLS close_notify, which would otherwise outlive the loop as open sockets."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.transports: weakref.WeakSet[asyncio.Transport] = weakref.WeakSet()

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.transports.add(transport)

    def abort_transports(self) -> None:
        for transport in list(self.transports):
            transport.abort()


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    """Deep copy that can't leak references into the store (objects are plain JSON)."""
    result: dict[str, Any] = orjson.loads(orjson.dumps(obj))
    return result


class FakeApiServer:
    """An in-process kube-apiserver stand-in for Services, EndpointSlices, Pods, Namespaces
    and Nodes, speaking the real wire protocol over HTTPS.

    The HTTP server runs on its own daemon thread and event loop, so sync tests, async
    tests on another loop and daemons in subprocesses can all use it. Every public method
    is synchronous and thread-safe: while the server runs, the work is marshalled onto its
    loop (which keeps watch fan-out ordered with HTTP writes).

    `stop()` closes the listener and every connection but keeps all state and the port, so
    `start()` brings the "same" API server back; `close()` (or leaving the `with` block)
    also removes the certificate directory. Both join the server thread.
    """

    def __init__(
        self,
        token: str = "t0k3n",
        port: int = 0,
        history_limit: int = 10_000,
        bookmark_interval: float = 1.0,
        *,
        host: str = "127.0.0.1",
        watch_queue_limit: int = 100_000,
        rbac: Rbac | None = None,
        server_names: Sequence[str] = (),
        in_test_netns: bool = False,
    ) -> None:
        # in_test_netns: the caller runs start() inside a network namespace it created, where
        # any address is the test's own (tests/cluster binds the control-plane node's).
        if host not in ("127.0.0.1", "::1") and not in_test_netns:
            raise ValueError("the fake API server only binds loopback addresses")
        self.token = token
        self.host = host
        # Resolve port 0 now: a kubeconfig can then be written before the first start
        # (to test daemons that come up while the API is down) and restarts reuse it.
        self._port = port or free_port(host)
        self._store = Store(history_limit=history_limit, watch_queue_limit=watch_queue_limit)
        self._faults = Faults()
        self._log = RequestLog()
        self._dir = Path(tempfile.mkdtemp(prefix="fake-apiserver-"))
        # Remove the cert directory even for servers that are only ever stop()ped.
        self._cleanup_dir = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        self._tls = TlsMaterial(self._dir, server_names)
        self._handlers = ApiHandlers(
            self._store,
            self._faults,
            self._log,
            token=lambda: self.token,
            server_address=lambda: f"{self._url_host}:{self._port}",
            bookmark_interval=bookmark_interval,
        )
        self._handlers.rbac = rbac
        # Serializes start/stop against each other and against marshalled calls.
        self._lifecycle = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.ServerRunner | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    @property
    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def url(self) -> str:
        return f"https://{self._url_host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def ca_path(self) -> Path:
        return self._tls.ca_path

    @property
    def running(self) -> bool:
        return self._runner is not None

    def start(self) -> FakeApiServer:
        """Bind https://host:port and serve; no-op if already running."""
        with self._lifecycle:
            if self._runner is not None:
                return self
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=_run_loop, args=(loop,), name=f"fake-apiserver-{self._port}", daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
            try:
                future = asyncio.run_coroutine_threadsafe(self._serve(), loop)
                self._runner = future.result(timeout=_CALL_TIMEOUT_S)
            except BaseException:
                self._stop_loop()
                raise
            return self

    async def _serve(self) -> web.ServerRunner:
        self._faults.attach()
        server = _Server(self._handlers.handle, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(
            runner,
            self.host,
            self._port,
            ssl_context=self._tls.server_context(),
            reuse_address=True,
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    def stop(self) -> None:
        """Close the listener and all connections (state, port and certs are kept)."""
        with self._lifecycle:
            if self._loop is None:
                return
            if self._runner is not None:
                future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
                try:
                    future.result(timeout=_CALL_TIMEOUT_S)
                finally:
                    self._runner = None
            self._stop_loop()

    async def _shutdown(self) -> None:
        # End watches first so their handlers return instead of waiting to be cancelled.
        self._store.end_watches(abort=True)
        runner = self._runner
        assert runner is not None
        server = runner.server  # cleanup() forgets it
        await runner.cleanup()
        if isinstance(server, _Server):
            server.abort_transports()
        await asyncio.sleep(0)  # let the aborted transports close their sockets
        self._faults.detach()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_CALL_TIMEOUT_S)
        loop.close()

    def close(self) -> None:
        """Final shutdown: stop, then delete the certificate directory."""
        self.stop()
        self._cleanup_dir()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- marshalling --------------------------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the server loop thread (or here while the server is down)."""
        with self._lifecycle:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or threading.current_thread() is thread:
                return fn(*args, **kwargs)
            future: concurrent.futures.Future[T] = concurrent.futures.Future()

            def run() -> None:
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

            loop.call_soon_threadsafe(run)
            return future.result(timeout=_CALL_TIMEOUT_S)

    # ---- objects ------------------------------------------------------------------------

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create; assigns uid/resourceVersion/creationTimestamp. AlreadyExists (a
        ValueError, HTTP 409) if the object exists."""
        return _copy(self._call(self._store.create, obj).obj)

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace (metadata.resourceVersion is not checked); NotFound (a KeyError) if
        missing. An update that changes nothing keeps the rv and sends no event."""
        return _copy(self._call(self._store.update, obj).obj)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or update."""
        return _copy(self._call(self._store.apply, obj).obj)

    def delete(self, resource: str, namespace: str | None, name: str) -> None:
        """Delete now (no graceful deletion); NotFound (a KeyError) if missing."""
        resource_type(resource)
        self._call(self._store.delete, resource, namespace, name)

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        resource_type(resource)
        entry = self._call(self._store.get, resource, namespace, name)
        return None if entry is None else _copy(entry.obj)

    def load(self, objs: Iterable[dict[str, Any]]) -> None:
        """Bulk create (each object gets its own rv and history entry)."""
        self._call(self._store.load, list(objs))

    def list_objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Current objects of a resource (with kind/apiVersion), sorted by namespace/name."""
        rtype = resource_type(resource)

        def current() -> list[dict[str, Any]]:
            snap = self._store.collections[rtype.resource].snapshot()
            lo, hi = snap.bounds(namespace if rtype.namespaced else None)
            return [_copy(entry.obj) for entry in snap.entries[lo:hi]]

        return self._call(current)

    # ---- history, watches, faults -------------------------------------------------------

    def compact(self) -> None:
        """Forget all history up to the current rv: older watches/continues get 410."""
        self._call(self._store.compact)

    def drop_watches(self) -> None:
        """End every open watch stream cleanly, as an apiserver does on timeout."""
        self._call(self._store.end_watches)

    def watch_count(self) -> int:
        return self._call(self._store.watcher_count)

    def fail_next(
        self,
        n: int,
        status: int = 500,
        retry_after: float | None = None,
        verb: str | None = None,
        resource: str | None = None,
    ) -> None:
        """The next n requests matching verb/resource (None: any) get `status` with a
        Status body (and Retry-After when given)."""
        self._call(self._faults.fail_next, n, status, retry_after, verb, resource)

    def garbage_next(
        self, n: int, body: bytes, verb: str | None = None, resource: str | None = None
    ) -> None:
        """The next n requests matching verb/resource get HTTP 200 with `body` as it is (a
        list body that is not a List object, not JSON, ...)."""
        self._call(self._faults.garbage_next, n, body, verb, resource)

    def inject_watch_lines(self, lines: list[bytes], resource: str | None = None) -> None:
        """Every open watch stream (of `resource`, or all) writes these raw lines next, then
        goes on with real events: non-JSON, JSON that is not an object, unknown event types,
        ERROR events with odd Status bodies. Streams pick them up within a second."""
        if resource is not None:
            resource_type(resource)
        self._call(self._faults.inject_watch_lines, list(lines), resource)

    def forbid(self, resource: str) -> None:
        """Answer every request for `resource` with 403 Forbidden until allow()."""
        resource_type(resource)
        self._call(self._faults.forbid, resource)

    def allow(self, resource: str) -> None:
        self._call(self._faults.allow, resource)

    def clear_faults(self) -> None:
        """Drop pending fail_next rules and forbidden resources."""
        self._call(self._faults.clear)

    def pause(self) -> None:
        """Hang every new request, and delivery on open watches, until resume()."""
        self._call(self._faults.pause)

    def resume(self) -> None:
        self._call(self._faults.resume)

    # ---- introspection ------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        return self._log.snapshot()

    def count(self, verb: str | None = None, resource: str | None = None) -> int:
        return self._log.count(verb, resource)

    def clear_requests(self) -> None:
        self._log.clear()

    @property
    def resource_version(self) -> int:
        return self._store.rv

    # ---- client configuration -----------------------------------------------------------

    def write_kubeconfig(
        self,
        path: str | Path,
        token: str | None = None,
        client_cert: bool = False,
        namespace: str = "default",
    ) -> Path:
        """Write a kubeconfig (context "fake") for this server; `token` overrides the
        server's token (e.g. a wrong one), client_cert=True authenticates with the
        client certificate instead of a token."""
        config = kubeconfig(
            self.url,
            self._tls.ca_pem,
            token=None if client_cert else (token or self.token),
            client_cert_pem=self._tls.client_cert_pem if client_cert else None,
            client_key_pem=self._tls.client_key_pem if client_cert else None,
            namespace=namespace,
        )
        return write_kubeconfig(Path(path), config)

    def ssl_context(self, client_cert: bool = False) -> Any:
        """An ssl.SSLContext trusting this server's CA (for test clients)."""
        return self._tls.client_context(client_cert)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        _cancel_leftovers(loop)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and reap whatever tasks remain so the loop closes without warnings."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
