"""Namespaces — ``db`` or ``db.collection`` — read one way wherever they are written.

A subscription's ``ns`` parameter, a token's ``ns`` claim and WATCH_DB/WATCH_COLLECTION all name
namespaces, and what a client may see is decided by comparing them; two parsers that disagree
(one reading ``shop.`` as the whole database, the other refusing it) turn a malformed grant into
a wider one. So all of them go through :func:`parse`, which accepts exactly the names MongoDB
accepts and refuses the rest with a message that says why.

MongoDB's rules, from ``src/mongo/db/namespace_string.h`` (``validCollectionName``,
``MaxUserNsCollectionLen``) and ``src/mongo/db/database_name.h`` (``validDBName``,
``kMaxDatabaseNameLength``), as documented in
https://www.mongodb.com/docs/manual/reference/limits/#naming-restrictions:

* a database name is 1 to 63 bytes without ``/ \\ . space " $`` or NUL (``$`` is refused for
  user databases; Windows servers refuse more, which only makes fewer names exist);
* a collection name is not empty, does not start with ``.``, has no ``$`` or NUL, and may
  contain dots and spaces; ``system.`` names are MongoDB's own, and change streams never report
  them (SERVER-34040 refuses to open one there, SERVER-35401 leaves them out of database and
  deployment streams);
* ``db.collection`` is at most 255 bytes.

The first ``.`` ends the database name, as it does in MongoDB, so ``a.b.c`` is collection
``b.c`` of database ``a``, and ``shop.*`` is a collection named ``*``, not a wildcard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

MAX_DATABASE_BYTES = 63
MAX_NAMESPACE_BYTES = 255
DATABASE_FORBIDDEN = frozenset('/\\. "$\x00')
SYSTEM_PREFIX = "system."


class NamespaceError(ValueError):
    """A name MongoDB would not accept; the message says which rule it breaks."""


class Namespace(NamedTuple):
    db: str
    coll: str | None = None  # None: the whole database

    def __str__(self) -> str:
        return self.db if self.coll is None else f"{self.db}.{self.coll}"


def database(name: str) -> str:
    """A database name (WATCH_DB), checked."""
    if not name:
        raise NamespaceError("the database name is empty")
    if DATABASE_FORBIDDEN.intersection(name):
        raise NamespaceError(f"{name!r} is not a valid database name (no / \\ . space \" $ "
                             "or NUL)")
    if len(name.encode()) > MAX_DATABASE_BYTES:
        raise NamespaceError(f"database name {name!r} is longer than {MAX_DATABASE_BYTES} bytes")
    return name


def collection(name: str) -> str:
    """A collection name (WATCH_COLLECTION), checked on its own; :func:`make` checks the
    length of the whole namespace."""
    if not name:
        raise NamespaceError("the collection name is empty")
    if name.startswith("."):
        raise NamespaceError(f"collection name {name!r} starts with '.'")
    if "$" in name:
        raise NamespaceError(f"collection name {name!r} contains '$'")
    if "\x00" in name:
        raise NamespaceError(f"collection name {name!r} contains NUL")
    if name.startswith(SYSTEM_PREFIX):
        raise NamespaceError(f"{name!r} is one of MongoDB's system. collections, which change "
                             "streams never report")
    return name


def make(db: str, coll: str | None = None) -> Namespace:
    """A checked namespace from its two parts."""
    namespace = Namespace(database(db), None if coll is None else collection(coll))
    if len(str(namespace).encode()) > MAX_NAMESPACE_BYTES:
        raise NamespaceError(f"namespace {str(namespace)[:40]!r}... is longer than "
                             f"{MAX_NAMESPACE_BYTES} bytes")
    return namespace


def parse(text: str) -> Namespace:
    """``db`` or ``db.collection``, exactly as written."""
    if not text:
        raise NamespaceError("the namespace is empty; write db or db.collection")
    db, dot, coll = text.partition(".")
    if not db:
        raise NamespaceError(f"{text!r} has an empty database name; write db or db.collection")
    if dot and not coll:
        raise NamespaceError(f"{text!r} has an empty collection name; write {db!r} for the "
                             "whole database")
    return make(db, coll if dot else None)


def parse_list(text: str, limit: int | None = None) -> frozenset[Namespace]:
    """Comma-separated namespaces. Spaces after a comma are skipped (a database name cannot
    start with one); anything else is part of a name, and an empty item is an error."""
    items = text.split(",")
    if limit is not None and len(items) > limit:
        raise NamespaceError(f"more than {limit} namespaces")
    return frozenset(parse(item.lstrip(" ")) for item in items)


def normalise(namespaces: Iterable[tuple[str, str | None]]) -> frozenset[Namespace]:
    """The same set of namespaces written one way: a collection whose database is listed too
    adds nothing."""
    found = {Namespace(*namespace) for namespace in namespaces}
    databases = {namespace.db for namespace in found if namespace.coll is None}
    return frozenset(n for n in found if n.coll is None or n.db not in databases)


def within(wanted: Iterable[Namespace], allowed: Iterable[Namespace]) -> bool:
    """Does every wanted namespace lie inside one of the allowed ones?"""
    allowed = frozenset(allowed)
    databases = {namespace.db for namespace in allowed if namespace.coll is None}
    return all(db in databases or (db, coll) in allowed for db, coll in wanted)
