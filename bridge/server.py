"""The WebDAV bridge as a server: the wsgidav application over the provider, hosted by cheroot,
with Basic authentication, optional HTTPS, and a janitor for ``uploads/``.

``Bridge(store, config, bind=...)`` builds everything; ``start()`` binds and serves from threads
(the caller keeps its own thread: the mount's trio loop, or a wait for a signal), ``stop()``
finishes the requests in flight, ingests what was queued and joins every thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from pathlib import Path
from typing import Any, Sequence

from wsgidav.dir_browser import WsgiDavDirBrowser
from wsgidav.http_authenticator import HTTPAuthenticator
from wsgidav.request_resolver import RequestResolver
from wsgidav.wsgidav_app import WsgiDAVApp

from bridge.auth import USERS_KEY, Credentials, UsersDomainController
from bridge.errors import ErrorPages, PathGuard
from bridge.fast_put import FastPut
from bridge.guard import RequestGuard
from bridge.headgate import GatedServer, LazyHandshakeAdapter
from bridge.properties import PropertyLimits, StorePropertyManager
from bridge.provider import BridgeSettings, DicomfsProvider
from bridge.throttle import LoginThrottle, Throttled
from bridge.transfers import TransferRoutes
from dicomfs.config import Config, parse_bind
from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.jobs.storage import open_jobs
from dicomfs.store import Store
from dicomfs.uploads import UploadArea
from dicomfs.views import Tree

__all__ = ["Bridge", "BridgeError"]

_log = logging.getLogger("dicomfs.webdav")
_JANITOR_SECONDS = 5.0
_ABANDONED_CHUNKS_SECONDS = 7 * 86400.0
"""Chunks of a large instance whose transfer stopped a week ago are given up."""
_UNUSED_PLAN_SECONDS = 86400.0
"""A pull plan no peer fetched from for a day is forgotten (the peer registers it again if needed)."""


class BridgeError(DicomfsError):
    """The bridge cannot start as configured (an address in use, an open bind without users)."""


class Bridge:
    """One WebDAV server over one open store."""

    def __init__(self, store: Store, config: Config, *, bind: str | None = None, allow_anonymous: bool = False) -> None:
        webdav = config.webdav
        if not webdav.enabled:
            raise BridgeError("the WebDAV bridge is turned off (webdav.enabled = false)")
        self.host, self.port = parse_bind(bind or webdav.bind)
        if not config.users and not allow_anonymous and not _is_loopback(self.host):
            raise BridgeError(f"refusing to serve {self.host} without users: anyone who can reach it could "
                              "read and change the archive. Add [users.NAME] (see `dicomfs passwd`) or pass "
                              "--allow-anonymous")
        self.store = store
        self.config = config
        self.tls = bool(webdav.certificate)
        uploads = UploadArea(store.folder / "uploads")
        writable = not store.readonly
        self.provider = DicomfsProvider(store, Tree(store, uploads=writable, jobs=open_jobs(store)), uploads,
                                        BridgeSettings.of(webdav, writable=writable))
        self.properties = StorePropertyManager(store.folder / "webdav" / "properties", PropertyLimits(
            webdav.dead_property_max, webdav.dead_properties_per_resource, webdav.dead_property_bytes_per_resource))
        self.credentials = Credentials(config.users)
        dav = FastPut(WsgiDAVApp(self._wsgidav_config()), self.provider, self.credentials, webdav.block_size)
        self.transfers = TransferRoutes(dav, store, self.credentials, writable=writable, path_lookup=self._resource_at)
        self.app = PathGuard(Throttled(self.transfers, LoginThrottle(webdav.login_failures, webdav.login_window)))
        self._server: GatedServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def _wsgidav_config(self) -> dict[str, Any]:
        webdav = self.config.webdav
        return {
            "provider_mapping": {"/": self.provider},
            "http_authenticator": {
                "domain_controller": UsersDomainController,
                "accept_basic": True,
                "accept_digest": False,  # digest would need a password equivalent on the server
                "default_to_digest": False,
                "trusted_auth_header": None,
            },
            USERS_KEY: self.credentials,
            "lock_storage": True,  # class 2: Windows and Finder mount read-write only with locks
            "property_manager": self.properties,
            "block_size": webdav.block_size,
            "hotfixes": {"emulate_win32_lastmod": True, "re_encode_path_info": True, "unquote_path_info": False},
            "dir_browser": {"enable": True, "response_trailer": "dicomfs", "show_user": True,
                            "davmount": False, "ms_sharepoint_support": False},
            "middleware_stack": [ErrorPages, HTTPAuthenticator, RequestGuard, WsgiDavDirBrowser, RequestResolver],
            "add_header_MS_Author_Via": True,
            "suppress_version_info": True,
            "logging": {"enable": False},  # dicomfs's own logging setup applies to wsgidav's loggers
            "verbose": 2,
            "ssl_certificate": webdav.certificate or None,  # only silences wsgidav's "Basic without TLS" warning
        }

    def _resource_at(self, parts: Sequence[str]) -> str | None:
        """The resource a tree path shows (``by-patients/P1 - DOE^J``), for transfer selectors."""
        tree = self.provider.tree
        tree.refresh()
        try:
            return tree.lookup(parts).resource_id
        except NotFoundError:
            return None

    # -- running ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> None:
        """Bind and serve from background threads; BridgeError if the address cannot be had."""
        webdav = self.config.webdav
        server = GatedServer((self.host, self.port), self.app, numthreads=webdav.threads, server_name="dicomfs",
                             request_queue_size=64, timeout=60, shutdown_timeout=5, header_timeout=webdav.header_timeout)
        server.max_request_body_size = 0  # uploads stream to disk: no size to guard against
        if self.tls:
            for key in ("certificate", "private_key"):
                if not Path(getattr(webdav, key)).is_file():
                    raise BridgeError(f"webdav.{key}: no such file {getattr(webdav, key)}")
            server.ssl_adapter = LazyHandshakeAdapter(webdav.certificate, webdav.private_key)
        try:
            server.prepare()
        except OSError as error:
            raise BridgeError(f"cannot listen on {self.host}:{self.port}: {error.strerror or error}") from None
        self.port = server.bind_addr[1]  # port 0 picks a free one
        self._server = server
        if self.provider.queue is not None:  # uploads answered by a bridge killed before it ingested them
            self.provider.queue.adopt_leftovers()
        for target, name in ((server.serve, "webdav-server"), (self._janitor, "webdav-janitor")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        _log.info("WebDAV bridge serving %s (store %s; %s)", self.url, self.store.folder,
                  f"{len(self.config.users)} users" if self.config.users else "no password asked")

    def stop(self) -> None:
        """Stop serving, ingest what was queued, and close what the bridge opened."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self.provider.close()
        self.properties.close()

    def _janitor(self) -> None:
        uploads, settings = self.provider.uploads, self.config.uploads
        while not self._stopping.wait(_JANITOR_SECONDS):
            try:
                self.provider.release_expired()
                self.provider.forget_gone_properties()
                queue = self.provider.queue
                if queue is not None:  # a bridge that takes no uploads changes nothing in uploads/
                    queue.adopt_leftovers(busy=self.provider.busy_uploads())
                    busy = {uploads.path(parts) for parts in self.provider.busy_uploads()}  # now with those just queued
                    uploads.sweep(rejected_ttl=settings.rejected_ttl, empty_folder_idle=settings.empty_folder_idle, busy=busy)
                self.transfers.receiver.sweep(_ABANDONED_CHUNKS_SECONDS)
                self.transfers.outbox.sweep(_UNUSED_PLAN_SECONDS)
            except Exception:  # the janitor must outlive one bad pass
                _log.exception("uploads/ janitor pass failed")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False

