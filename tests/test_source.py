"""The change source's reading of MongoDB's errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pymongo.errors import OperationFailure

from changerelay.source import images_help, missing_image

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
