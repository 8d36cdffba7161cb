"""PROPFIND of the views answered without wsgidav's generic machinery: the 207 multistatus built as
text from the folder's listing.

wsgidav answers a PROPFIND by making a resource object per member, asking it for each property
separately (a DAVError raised for every property a resource lacks), building an ElementTree and
serialising it: about 0.2 ms per entry, so a 2,000-patient ``by-patients/`` took 0.4 s. What a view
entry shows is known from its ``Entry`` alone, so here each entry becomes one :class:`Row` and each
row a few formatted strings, with the href quoted once per name and each date formatted once.

This module is the pure part: parsing the request body into what to answer (or None when this
module cannot answer it exactly, and wsgidav must), and writing the multistatus from rows. Which
requests come here, and the rows, are the provider's business (``DicomfsProvider._fast_propfind``).

The answer is the one wsgidav gives for the same resources (same hrefs, properties, values and
statuses; the namespace prefixes differ, which XML does not care about): the rules below mirror
``DAVResource.get_property_names``/``get_property_value`` and ``util.add_property_response`` of
wsgidav 4.4, and tests/test_webdav.py compares both answers.
"""

from __future__ import annotations

import functools
import math
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from email.utils import formatdate
from typing import Iterable, Iterator, Mapping, Sequence
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

__all__ = ["DICOMFS_PREFIX", "PIECE_CHARACTERS", "PropfindRequest", "Row", "dates", "href", "multistatus", "parse_request",
           "quoted_name"]

DICOMFS_PREFIX = "{urn:dicomfs}"
"""The namespace of the live tag and metadata properties (``bridge.resources.NAMESPACE``)."""

_HREF_SAFE = "/"
"""An href escapes all but RFC 3986's unreserved characters (``quote`` never escapes those) and
``/``. wsgidav's get_href also left ``!*'(),$|`` alone, for a Nautilus of long ago; neon (cadaver)
escapes ``(`` to ``%28`` and compares that with the href it gets back, so every ``(no name)``
and ``(2)`` folder failed to open. This is also the form of wsgidav's get_ref_url (the lock
and property keys) and of its Location headers: one form everywhere."""
_OK = "HTTP/1.1 200 OK"
_NOT_FOUND = "HTTP/1.1 404 Not Found"
_SUPPORTED_LOCK = ("<D:lockentry><D:lockscope><D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype></D:lockentry>"
                   "<D:lockentry><D:lockscope><D:shared/></D:lockscope><D:locktype><D:write/></D:locktype></D:lockentry>")


@dataclass(frozen=True)
class PropfindRequest:
    """What a PROPFIND asks for: every live property (``names is None``: an empty body or
    ``<allprop/>``), or the properties named in ``<prop>``, in Clark notation and in order."""

    names: tuple[str, ...] | None

    @property
    def wants_attributes(self) -> bool:
        """Whether a ``{urn:dicomfs}`` property is asked for (reading them costs an index lookup per entry)."""
        return self.names is not None and any(name.startswith(DICOMFS_PREFIX) for name in self.names)


@dataclass(frozen=True, slots=True)
class Row:
    """One resource of the answer, as wsgidav's ViewFolder or ViewFile would show it."""

    href: str
    """Already quoted, as :func:`href` makes it (folders end with ``/``)."""
    name: str
    """``displayname``."""
    is_folder: bool
    mtime: float
    """Both ``creationdate`` and ``getlastmodified``."""
    size: int = 0
    """Files only."""
    content_type: str = ""
    """Files only."""
    etag: str = ""
    """Files only; folders have none."""
    attributes: Mapping[str, str] | None = None
    """The ``{urn:dicomfs}`` properties (names without the namespace), when asked for."""


def parse_request(body: bytes | None) -> PropfindRequest | None:
    """The request of a PROPFIND body (None: no body), or None when the default handler must answer:
    ``<propname/>``, a malformed body (its 400 is wsgidav's to give), or any shape wsgidav reads
    in a way this module does not mirror (several children, ``<include>``, ...)."""
    if body is None:
        return PropfindRequest(None)  # RFC 4918 9.1: an empty body asks for allprop
    if b"<!DOCTYPE" in body:
        return None  # entities (billion laughs): wsgidav's parser, defusedxml, refuses them with 400
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    children = list(root)
    if root.tag != "{DAV:}propfind" or len(children) != 1:
        return None
    child = children[0]
    if child.tag == "{DAV:}allprop" and not len(child):
        return PropfindRequest(None)
    if child.tag == "{DAV:}prop":
        return PropfindRequest(tuple(element.tag for element in child))
    return None


@functools.lru_cache(maxsize=1 << 16)
def quoted_name(name: str) -> str:
    """``name`` quoted for an href, as :func:`href` quotes a path. Cached: a listing is asked
    for again and again, and ``urllib.parse.quote`` is a noticeable part of a big answer."""
    return quote(name, safe=_HREF_SAFE)


def href(path: str) -> str:
    """The href of a resource at ``path`` (unquoted, absolute): every resource's ``get_href``."""
    return quote(path, safe=_HREF_SAFE)


# -- writing -------------------------------------------------------------------------------------

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@functools.lru_cache(maxsize=1 << 16)
def dates(mtime: float) -> tuple[str, str]:
    """``creationdate`` (RFC 3339) and ``getlastmodified`` (RFC 1123) of a time, as wsgidav's
    util.get_rfc3339_time and get_rfc1123_time write them. Cached across requests: each patient,
    study and instance has its own time, and email.utils.formatdate costs several microseconds."""
    t = time.gmtime(mtime)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", t)
    if mtime < 0 or mtime - math.floor(mtime) >= 0.999999:
        # formatdate rounds to the microsecond before it drops the fraction (gmtime truncates):
        # this close to the next second let it decide
        return created, formatdate(mtime, localtime=False, usegmt=True)
    return created, (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
                     f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


_ALLPROP_FOLDER = ("{DAV:}resourcetype", "{DAV:}creationdate", "{DAV:}getlastmodified", "{DAV:}displayname")
_ALLPROP_FILE = ("{DAV:}resourcetype", "{DAV:}creationdate", "{DAV:}getcontentlength", "{DAV:}getcontenttype",
                 "{DAV:}getlastmodified", "{DAV:}displayname", "{DAV:}getetag")
"""get_property_names(is_allprop=True) of a view folder and file (RFC 4918's live properties, in
wsgidav's order; a folder has no length, type nor ETag), before the lock properties."""
_LOCK_PROPERTIES = ("{DAV:}lockdiscovery", "{DAV:}supportedlock")


def _fragment(name: str, tag: str, *, is_folder: bool, locking: bool) -> str | None:
    """How get_property_value of a view folder or file answers ``name`` (not a ``{urn:dicomfs}``
    one), as a str.format template over a row's fields; None: "404 Not Found"."""
    if name == "{DAV:}resourcetype":
        return f"<{tag}><D:collection/></{tag}>" if is_folder else f"<{tag}/>"
    if name == "{DAV:}creationdate":
        return f"<{tag}>{{created}}</{tag}>"
    if name == "{DAV:}getlastmodified":
        return f"<{tag}>{{modified}}</{tag}>"
    if name == "{DAV:}displayname":
        return f"<{tag}>{{name}}</{tag}>"
    if name in ("{DAV:}getcontentlength", "{DAV:}getcontenttype", "{DAV:}getetag"):
        return None if is_folder else f"<{tag}>{{{name[6:]}}}</{tag}>"
    if name in ("{DAV:}quota-used-bytes", "{DAV:}quota-available-bytes"):
        return f"<{tag}/>"  # wsgidav returns the getter's None without checking it: empty, and 200
    if name == "{DAV:}lockdiscovery" and locking:
        return f"<{tag}/>"  # the provider answers here only where no lock is held
    if name == "{DAV:}supportedlock" and locking:
        return f"<{tag}>{_SUPPORTED_LOCK}</{tag}>"
    # any other DAV: name is unsupported; any other namespace would be a dead property, and the
    # provider answers here only for resources that have none
    return None


def _response(found: Sequence[str], missing: Sequence[str], *, missing_first: bool) -> str:
    """A <response> of one href: one propstat per status, in the order the statuses first occur
    among the names asked for (as util.add_property_response groups them)."""
    groups = [(missing, _NOT_FOUND), (found, _OK)] if missing_first else [(found, _OK), (missing, _NOT_FOUND)]
    stats = "".join(f"<D:propstat><D:prop>{''.join(props)}</D:prop><D:status>{status}</D:status></D:propstat>"
                    for props, status in groups if props)
    return f"<D:response><D:href>{{href}}</D:href>{stats}</D:response>"


def _template(names: Sequence[str], tags: Sequence[str], *, is_folder: bool, locking: bool) -> str:
    """The <response> of any folder (or any file) for these names, to be filled by str.format."""
    found: list[str] = []
    missing: list[str] = []
    missing_first = False
    for name, tag in zip(names, tags, strict=True):
        fragment = _fragment(name, tag, is_folder=is_folder, locking=locking)
        if fragment is None:
            missing_first = missing_first or not found
            missing.append(f"<{tag}/>")  # wsgidav writes a property it lacks as an empty element
        else:
            found.append(fragment)
    return _response(found, missing, missing_first=missing_first)


def multistatus(request: PropfindRequest, rows: Iterable[Row], *, locking: bool) -> list[bytes]:
    """The 207 body answering ``request`` for ``rows`` (the target first, then its members), in
    pieces of about ``PIECE_CHARACTERS`` (see there).

    ``locking``: the share has a lock manager, so lockdiscovery (empty: the caller checked that
    nothing here is locked) and supportedlock are properties of every resource.

    Every folder answers the same properties with the same statuses, and so does every file:
    one str.format template each. Only ``{urn:dicomfs}`` properties vary per resource (a tag may
    be absent), so a request naming one is written property by property."""
    prefixes: dict[str, str] = {}
    locks = _LOCK_PROPERTIES if locking else ()
    asked = {True: _ALLPROP_FOLDER + locks, False: _ALLPROP_FILE + locks} if request.names is None else \
        {True: request.names, False: request.names}
    tags = {is_folder: [_tag(name, prefixes) for name in names] for is_folder, names in asked.items()}
    declarations = "".join(f" xmlns:{prefix}={quoteattr(uri)}" for uri, prefix in prefixes.items())
    head = f'<?xml version="1.0" encoding="utf-8" ?>\n<D:multistatus xmlns:D="DAV:"{declarations}>'
    if request.names is not None and request.wants_attributes:
        responses = _with_attributes(request.names, tags[True], rows, locking=locking)
    else:
        templates = {is_folder: _template(names, tags[is_folder], is_folder=is_folder, locking=locking)
                     for is_folder, names in asked.items()}
        responses = _without_attributes(templates, rows)
    return _pieces(head, responses, "</D:multistatus>")


PIECE_CHARACTERS = 1 << 16
"""A large answer is encoded in pieces of about this size. In one piece, a 20,000-patient
``by-patients/`` (10 MB) made a 10 MB string and then 10 MB of bytes for every request, each
fresh pages from the kernel: 7,500 page faults a request, against 1,500 in pieces (and the
bridge's RSS 98 MB against 83 after 33 of them)."""


def _pieces(head: str, responses: Iterable[str], tail: str) -> list[bytes]:
    pieces: list[bytes] = []
    out = [head]
    size = len(head)
    for response in responses:
        out.append(response)
        size += len(response)
        if size >= PIECE_CHARACTERS:
            pieces.append("".join(out).encode("utf-8"))
            out, size = [], 0
    out.append(tail)
    pieces.append("".join(out).encode("utf-8"))
    return pieces


def _without_attributes(templates: Mapping[bool, str], rows: Iterable[Row]) -> Iterator[str]:
    """The <response>s of a request naming no ``{urn:dicomfs}`` property: one template per kind."""
    for row in rows:
        created, modified = dates(row.mtime)
        # hrefs are quoted: no character in them needs escaping
        yield templates[row.is_folder].format(href=row.href, name=escape(row.name), created=created,
                                              modified=modified, getcontentlength=row.size,
                                              getcontenttype=escape(row.content_type), getetag=escape(row.etag))


def _with_attributes(names: Sequence[str], tags: Sequence[str], rows: Iterable[Row], *, locking: bool) -> Iterable[str]:
    """The <response>s of a request naming ``{urn:dicomfs}`` properties, one property at a time."""
    fragments = {is_folder: [_fragment(name, tag, is_folder=is_folder, locking=locking)
                             for name, tag in zip(names, tags, strict=True)] for is_folder in (True, False)}
    for row in rows:
        created, modified = dates(row.mtime)
        fields = {"name": escape(row.name), "created": created, "modified": modified, "getcontentlength": row.size,
                  "getcontenttype": escape(row.content_type), "getetag": escape(row.etag)}
        attributes = row.attributes or {}
        found: list[str] = []
        missing: list[str] = []
        missing_first = False
        for name, tag, fragment in zip(names, tags, fragments[row.is_folder], strict=True):
            if name.startswith(DICOMFS_PREFIX):
                value = attributes.get(name[len(DICOMFS_PREFIX):])
                element = None if value is None else f"<{tag}>{escape(value)}</{tag}>"
            else:
                element = None if fragment is None else fragment.format_map(fields)
            if element is None:
                missing_first = missing_first or not found
                missing.append(f"<{tag}/>")
            else:
                found.append(element)
        yield _response(found, missing, missing_first=missing_first).replace("{href}", row.href, 1)


def _tag(name: str, prefixes: dict[str, str]) -> str:
    """``{ns}local`` as a prefixed tag, declaring a prefix for each namespace other than DAV:."""
    if not name.startswith("{"):
        return name  # no namespace: no default namespace is ever declared here
    uri, _, local = name[1:].partition("}")
    if uri == "DAV:":
        return "D:" + local
    prefix = prefixes.setdefault(uri, f"N{len(prefixes) + 1}")
    return f"{prefix}:{local}"
