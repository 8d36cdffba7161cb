"""Every FUSE handler answers with an errno, whatever it raises.

pyfuse3 turns only ``FUSEError`` into an answer. Any other exception leaves its request
unanswered and ends ``pyfuse3.main()``: the daemon exits and the mount is dead ("Transport
endpoint is not connected") until someone runs ``fusermount3 -u``. One hostile name did that (a
256-byte name in uploads/ made ``lstat`` raise ENAMETOOLONG). So ``answer_errors`` wraps every
handler a class overrides, once, when the class is made:

==========================  ===================================================================
raised                      answered
==========================  ===================================================================
``FUSEError``               as it is
``OSError``                 its errno (a real file's error in uploads/ is the client's answer)
``DicomfsError``            its ``errno`` (errors.py), logged without traceback (a warning,
                            but for NotFoundError: a race with a delete, not news)
anything else               EIO, logged with its traceback: a bug or a damaged store
==========================  ===================================================================

``forget`` has no answer (pyfuse3 awaits it outside its error handling): a failure there is
logged and dropped. The wrapper is one more coroutine per request and a ``try`` that costs
nothing until something is raised: ~0.4 us on a mapped read, under 1% of a 128 KiB request.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
from typing import Any, Callable, Coroutine, TypeVar

import pyfuse3

from dicomfs.errors import DicomfsError, NotFoundError

__all__ = ["answer_errors"]

_log = logging.getLogger(__name__)
_C = TypeVar("_C", bound=type)
_UNANSWERED = frozenset({"forget"})
"""Handlers the kernel expects no answer from."""


def answer_errors(cls: _C) -> _C:
    """Wrap every ``pyfuse3.Operations`` handler ``cls`` defines so that no exception escapes it."""
    for name, handler in list(vars(cls).items()):
        if inspect.iscoroutinefunction(handler) and hasattr(pyfuse3.Operations, name):
            setattr(cls, name, _guarded(name, handler))
    return cls


def _guarded(name: str, handler: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Coroutine[Any, Any, Any]]:
    unanswered = name in _UNANSWERED

    @functools.wraps(handler)
    async def guarded(*args: Any) -> Any:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            if unanswered:
                return None
            raise
        except OSError as error:
            code = error.errno or errno.EIO
        except DicomfsError as error:
            _log.log(logging.DEBUG if isinstance(error, NotFoundError) else logging.WARNING, "FUSE %s: %s", name, error)
            code = error.errno
        except Exception:  # trio.Cancelled and KeyboardInterrupt are BaseExceptions: they go on
            _log.exception("FUSE %s failed (answered EIO)", name)
            code = errno.EIO
        if unanswered:
            return None
        raise pyfuse3.FUSEError(code)

    return guarded
