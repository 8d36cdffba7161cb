"""What every outgoing HTTP(S) client of the jobs shares: the TLS context a target's options ask
for, and what a failure to talk to the server means (worth trying later, or not).

The STOW-RS exporter, the XNAT exporter and the peer client each wrap the verdict in their own
error classes and put their own "where" in front; the rules are here once.
"""

from __future__ import annotations

import http.client
import socket
import ssl

from dicomfs.errors import ConfigError

__all__ = ["describe_failure", "tls_context"]


def tls_context(ca_file: str | None, *, verify: bool, verify_hostname: bool) -> ssl.SSLContext:
    """The client context: the system's authorities (or ``ca_file``'s); ``verify=False`` accepts
    any certificate (dcm4chee's disable-trust-manager), ``verify_hostname=False`` a verified one
    for another host (allow-any-hostname). ConfigError when the CA file cannot be loaded."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load the CA file {ca_file}: {error}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not verify_hostname:
        context.check_hostname = False
    return context


def describe_failure(error: BaseException, *, timeout: float, host: str, server: str = "the server") -> tuple[bool, str]:
    """(whether trying again later may work, what happened) for an exception raised while talking
    to ``host``; ``server`` names it in the text ("the peer")."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return False, f"{server}'s TLS certificate is not trusted: {error.verify_message or error}"
    if isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return True, f"the TLS connection was cut: {error}"
    if isinstance(error, ssl.SSLError):
        return False, f"TLS failed: {error.reason or error}"
    if isinstance(error, socket.gaierror):
        return True, f"cannot resolve {host}: {error.strerror or error}"
    if isinstance(error, TimeoutError):
        return True, f"no progress in {timeout:g} s"
    if isinstance(error, http.client.RemoteDisconnected):
        return True, f"{server} closed the connection without answering"
    if isinstance(error, OSError):
        return True, f"{error.strerror or error}"
    if isinstance(error, http.client.IncompleteRead):
        return True, f"the answer was cut after {len(error.partial)} bytes"
    if isinstance(error, http.client.HTTPException):
        text = " ".join(str(error).split())[:300]
        return False, f"the answer is not HTTP: {type(error).__name__} {text}"
    return True, f"{type(error).__name__}: {error}"
