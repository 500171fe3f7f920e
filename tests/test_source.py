"""The change source's reading of MongoDB's errors."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from pymongo.errors import ConnectionFailure, OperationFailure

from changerelay.fragments import OutOfOrder
from changerelay.source import (
    ChangeSource,
    bad_resume_token,
    images_help,
    missing_image,
    resync_reason,
    too_large_help,
)

HISTORY_LOST_MESSAGE = ("Resume of change stream was not possible, as the resume point may no "
                        "longer be in the oplog.")

# MongoDB's messages (src/mongo/db/pipeline/document_source_change_stream_add_post_image.cpp,
# document_source_change_stream_add_pre_image.cpp).
POST = ("Change stream was configured to require a post-image for all update events, but the "
        "post-image was not found for event: {operationType: \"update\"}")
PRE = ("Change stream was configured to require a pre-image for all update, delete and replace "
       "events, but the pre-image was not found for event: {operationType: \"delete\"}")


def config(post="off", pre="off"):
    return SimpleNamespace(full_document=post, full_document_before_change=pre,
                           watch_db="shop", watch_collection="notes")


@pytest.mark.parametrize("message, settings, image", [
    (POST, config(post="required"), "post-image"),
    (PRE, config(pre="required"), "pre-image"),
    (POST, config("required", "required"), "post-image"),
    (PRE, config("required", "required"), "pre-image"),
    ("no image, somehow", config(pre="required"), "pre-image"),
    (POST, config(post="whenAvailable"), None),   # not ours to stop for: an ordinary error
])
def test_which_image_is_missing(message, settings, image):
    assert missing_image(OperationFailure(message, 47), settings) == image


def test_other_errors_are_not_missing_images():
    assert missing_image(OperationFailure(POST, 286), config("required")) is None
    assert missing_image(ValueError(POST), config("required")) is None


def test_the_readiness_reason_says_how_to_recover():
    text = images_help("pre-image", config(pre="required"))
    for words in ("pre-image", "shop.notes", "FULL_DOCUMENT_BEFORE_CHANGE=required",
                  'collMod: "notes"', "changeStreamPreAndPostImages", "restart", "resync"):
        assert words in text


# MongoDB's refusals of a resume token: resume_token.cpp (40647, 9 and the "Resume Token ..."
# family), key_string.cpp (50811, every message prefixed "KeyString format error"),
# error_codes.yml (260 InvalidResumeToken), as the test primary raises them.
BAD_TOKENS = [
    (260, "Attempting to resume a change stream using 'resumeAfter' is not allowed from an "
          "invalidate notification"),
    (40647, "Bad resume token: _data of missing or of wrong type. Expected string, got {}"),
    (9, "resume token string was not a valid hex string"),
    (50811, "KeyString format error: Unknown type: 3"),
    (50811, "KeyString format error: unexpected end of buffer"),
    (40649, "invalid empty resume token"),
    (50795, "Invalid Resume Token: only supports version 0, 1 and 2"),
    (51057, "Token type 7 not recognized"),
    (50870, "Resume Token fromInvalidate is not a boolean."),
    (22, "invalid bson"),
]


@pytest.mark.parametrize("code, message", BAD_TOKENS)
def test_every_refusal_of_a_resume_token_is_classified_as_one(code, message):
    assert bad_resume_token(OperationFailure(message, code))


@pytest.mark.parametrize("exc", [
    OperationFailure("Resume of change stream was not possible, as the resume point may no "
                     "longer be in the oplog.", 286),
    OperationFailure("not authorized on shop to execute command", 13),
    OperationFailure(POST, 47),
    OperationFailure("The $changeStream stage is only supported on replica sets", 40573),
    ConnectionFailure("connection refused"),
    ValueError("Bad resume token"),
])
def test_other_failures_are_not_bad_tokens(exc):
    assert not bad_resume_token(exc)


@pytest.mark.parametrize("code, message", BAD_TOKENS)
async def test_the_change_source_starts_afresh_on_any_refused_token(code, message):
    """Reopening with a token MongoDB refused would fail the same way forever (the source knew
    260 only)."""
    source = ChangeSource(config(), hub=None)
    source._token = {"_data": "82AB"}
    state, reason = source._classify(OperationFailure(message, code))
    assert source._token is None and source._start_after is None
    assert state == "error" and "resume token rejected" in reason


async def test_fragments_out_of_order_are_a_failure_to_reopen_from_not_a_crash(caplog):
    """A stream that returned fragments out of order reopens from its last whole event, as a
    catch-up does: an error state, no 'unexpected error' traceback."""
    source = ChangeSource(config(), hub=None)
    with caplog.at_level(logging.ERROR):
        state, reason = source._classify(OutOfOrder("fragment 3 of 4 arrived out of order"))
    assert (state, reason) == ("error", "fragment 3 of 4 arrived out of order")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("exc, reason", [
    (ConnectionFailure("connection refused"), None),  # the network: try again
    (OperationFailure("cursor id 7 not found", 43), None),
    (OperationFailure("interrupted", 11602, {"errorLabels": ["ResumableChangeStreamError"]}),
     None),
    (OperationFailure(HISTORY_LOST_MESSAGE, 286), "history_lost"),
    (OperationFailure("cannot resume stream; the resume token was not found.", 280),
     "invalid_token"),
    (OperationFailure("KeyString format error: Expected type Decimal.", 50810), "invalid_token"),
    (OperationFailure("BSONObj size: 18874663 (0x1200027) is invalid.", 10334),
     "event_too_large"),
    (OperationFailure("Splitting change event failed: fragment size 17000000 is greater",
                      7182500), "event_too_large"),
    (OperationFailure("Invalid resumeToken: txnOpIndex was skipped", 50792), "resume_failed"),
    (OperationFailure("not authorized on shop to execute command", 13), "resume_failed"),
])
def test_why_a_resume_cannot_go_on(exc, reason):
    """Named where the relay knows the refusal; never None for a server's refusal that no retry
    gets past, so that no client waits on retries for ever."""
    assert resync_reason(exc) == reason


@pytest.mark.parametrize("pipeline, words", [
    ((), ["$changeStreamSplitLargeEvent", "7.0", "CLIENT_BUFFER_BYTES", "restart"]),
    (({"$changeStreamSplitLargeEvent": {}},), ["one of its fields alone", "$unset", "restart"]),
])
def test_the_readiness_reason_for_an_event_over_16mb_says_how_to_go_past_it(pipeline, words):
    text = too_large_help(SimpleNamespace(pipeline=pipeline))
    for word in ["16 MB", *words]:
        assert word in text
