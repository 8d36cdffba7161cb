"""Password guessing slowed per client address, as fail2ban and nginx's ``limit_req`` do.

Each wrong password (or unknown user) is counted against the address it came from. An address
with ``failures`` of them within ``window`` seconds waits: its requests that carry credentials
are answered 429 Too Many Requests with a Retry-After, before any password is checked, until the
oldest of those failures is ``window`` seconds old. Other addresses, and so a right user
elsewhere, go on as before. The table remembers at most ``MAX_ADDRESSES`` addresses; when full,
the address whose last failure is oldest is forgotten first (nginx's zones drop the least
recently used entry the same way).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

__all__ = ["LoginThrottle", "MAX_ADDRESSES", "Throttled"]

MAX_ADDRESSES = 10_000
"""Addresses remembered at once: ~10 MB at most, and more than the clients of any one archive."""


class LoginThrottle:
    """Failed logins per client address within a sliding window."""

    def __init__(self, failures: int, window: float, *, max_addresses: int = MAX_ADDRESSES) -> None:
        self.failures, self.window, self.max_addresses = failures, window, max_addresses
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()  # oldest last failure first
        self._lock = threading.Lock()

    def wait_for(self, address: str) -> float:
        """Seconds ``address`` must wait before it may try a password again (0: it may now)."""
        with self._lock:
            times = self._failed.get(address)
            if times is None or len(times) < self.failures:
                return 0.0
            return max(0.0, times[0] + self.window - time.monotonic())

    def failed(self, address: str) -> None:
        """Count a wrong password from ``address``."""
        now = time.monotonic()
        with self._lock:
            times = self._failed.pop(address, None)
            if times is None:
                times = deque(maxlen=self.failures)
                while len(self._failed) >= self.max_addresses:
                    self._failed.popitem(last=False)
            times.append(now)
            self._failed[address] = times


class Throttled:
    """A WSGI layer answering 429 to a request with credentials from an address that must wait,
    and counting each 401 answered to credentials as a failure of its address."""

    def __init__(self, app: Callable[..., Iterable[bytes]], throttle: LoginThrottle) -> None:
        self._app, self._throttle = app, throttle

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if "HTTP_AUTHORIZATION" not in environ:
            return self._app(environ, start_response)
        address = environ.get("REMOTE_ADDR", "")
        wait = self._throttle.wait_for(address)
        if wait > 0:
            body = b"429 Too Many Requests: too many wrong passwords from this address; try again later\n"
            start_response("429 Too Many Requests", [
                ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                ("Retry-After", str(math.ceil(wait)))])
            return [body]

        def counting(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # every door answers wrong credentials with a 401 (wsgidav, the PUT fast path falling
            # back to it, /transfers/), so a failure is counted once, wherever it was checked
            if status.startswith("401"):
                self._throttle.failed(address)
            return start_response(status, headers, exc_info)

        return self._app(environ, counting)
