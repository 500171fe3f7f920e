"""Row rules: what a token's ``filter`` claim lets through, decided on the event as it was.

A rule such as ``{"fullDocument.owner": "alice"}`` is about a document, and only a document as of
the event can decide it: the insert's or replace's own document, the update's post-image, the
pre-image. ``FULL_DOCUMENT=updateLookup`` gives an update the most recent majority-committed
version of the document when the event is *read* (the drivers' words: "a copy of the entire
document that was changed from some time after the change occurred"), which may already be
someone else's; so an update is decided on ``fullDocument`` only when that is a post-image
(``whenAvailable``/``required``, with ``changeStreamPreAndPostImages`` on the collection, MongoDB
6.0+). Both are described in https://www.mongodb.com/docs/manual/changeStreams/.

For one event a rule gives one verdict:

* ``DELIVER`` — the document is the reader's after the change (a delete: before it);
* ``ENTERED`` — it became the reader's with this change: the event goes without its pre-image,
  which was not theirs;
* ``LEAVE`` — it was the reader's before and is not after: the reader gets ``{"type": "leave",
  "ns", "documentKey"}`` in the event's place, nothing of the new content;
* ``WITHHOLD`` — anything else, and whenever the rule reads a part of the event that the relay
  does not have for it (no post-image, no pre-image, no ``documentKey``…): never guessed.

MongoDB writes ``null`` where an image was asked for and is missing, and leaves ``fullDocument``
out of an update when no document was asked for; both mean "not there".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import filters
from .events import Change

DELIVER, ENTERED, LEAVE, WITHHOLD = "deliver", "entered", "leave", "withhold"

# FULL_DOCUMENT modes in which an update's fullDocument is its post-image, as of the event.
POST_IMAGE_MODES = frozenset({"whenAvailable", "required"})
DOCUMENT = "fullDocument"
PRE_IMAGE = "fullDocumentBeforeChange"
OWN_DOCUMENT = frozenset({"insert", "replace"})  # the event carries the document it wrote


class AccessRule:
    """A JWT ``filter`` claim, compiled; ``decide(change)`` is its verdict on one event."""

    __slots__ = ("decide", "key", "paths", "reads_document", "spec")

    def __init__(self, spec: dict[str, Any], post_images: bool):
        compiled = filters.compile_filter(spec)
        self.key = compiled.key
        self.spec = compiled.spec  # normalised: what the subscription index files it under
        self.paths = frozenset(_paths(compiled.spec))  # the event fields it reads
        parts = {path.split(".", 1)[0] for path in self.paths}
        self.reads_document = DOCUMENT in parts
        # Compiled into a closure, as filters are: it runs per event per group.
        self.decide = _verdict(compiled.predicate, tuple(sorted(parts - {DOCUMENT})),
                                 self.reads_document, post_images)


def _verdict(matches: filters.Predicate, needs: tuple[str, ...], reads_document: bool,
             post_images: bool) -> Callable[[Change], str]:
    """``needs``: the parts besides ``fullDocument`` the rule reads, which the event must have."""
    deliver, entered, leave, withhold = DELIVER, ENTERED, LEAVE, WITHHOLD
    as_of_event = OWN_DOCUMENT | {"update"} if post_images else OWN_DOCUMENT

    def decide(change: Change) -> str:
        for part in needs:
            if change.get(part) is None:
                return withhold
        if not reads_document:
            return deliver if matches(change) else withhold
        op = change.get("operationType")
        after = change.get(DOCUMENT) if op in as_of_event else None
        before = change.get(PRE_IMAGE)  # only update, replace and delete carry one
        if before is None:
            return deliver if after is not None and matches(change) else withhold
        # The event as it was before: the rule reads only fullDocument and ``needs``.
        was = matches({part: change[part] for part in needs} | {DOCUMENT: before}
                      if needs else {DOCUMENT: before})
        if after is not None and matches(change):
            return deliver if was else entered
        if was and op == "delete":
            return deliver
        return leave if was and after is not None else withhold

    return decide


def _paths(spec: dict[str, Any]) -> set[str]:
    """The field paths a normalised filter reads (its keys, and those of its $and/$or/$nor)."""
    found: set[str] = set()
    for key, value in spec.items():
        if key in filters.LOGICAL_OPERATORS:
            for branch in value:
                found |= _paths(branch)
        else:
            found.add(key)
    return found
