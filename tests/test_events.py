"""Encoding once: relaxed Extended JSON, WebSocket frames, SSE records."""

from __future__ import annotations

import datetime
import json

import pytest
from bson import Decimal128, Int64, ObjectId, Timestamp

from changerelay import events as ev
from changerelay.frames import ws_frame


def change(**extra):
    return {"_id": {"_data": "8263A1B2C3000000012B022C0100296E5A1004"}, "operationType": "insert",
            "ns": {"db": "shop", "coll": "orders"}, **extra}


def test_relaxed_extended_json():
    oid = ObjectId("65a1b2c3d4e5f60718293a4b")
    when = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)
    event = ev.encode_change(change(
        documentKey={"_id": oid}, clusterTime=Timestamp(1700000000, 3), wallTime=when,
        fullDocument={"_id": oid, "n": Int64(5), "price": Decimal128("9.99"), "f": 1.5}))
    data = json.loads(event.data)
    assert data["documentKey"] == {"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}}
    assert data["wallTime"] == {"$date": "2026-11-27T12:00:00Z"}
    assert data["clusterTime"] == {"$timestamp": {"t": 1700000000, "i": 3}}
    assert data["fullDocument"]["n"] == 5  # relaxed: plain number
    assert data["fullDocument"]["price"] == {"$numberDecimal": "9.99"}
    assert data["_id"] == {"_data": "8263A1B2C3000000012B022C0100296E5A1004"}
    assert event.token == "8263A1B2C3000000012B022C0100296E5A1004"
    assert (event.op, event.ns) == ("insert", ("shop", "orders"))


def test_events_without_documents_encode():
    for op in ("delete", "drop", "dropDatabase", "invalidate", "somethingNew"):
        event = ev.encode_change({"_id": {"_data": "82AA"}, "operationType": op})
        assert json.loads(event.data)["operationType"] == op


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_ws_frame_lengths(size):
    payload = b"x" * size
    frame = ws_frame(payload)
    assert frame[0] == 0x81
    assert frame.endswith(payload)
    if size < 126:
        assert frame[1] == size
    elif size < 65536:
        assert frame[1] == 126 and int.from_bytes(frame[2:4], "big") == size
    else:
        assert frame[1] == 127 and int.from_bytes(frame[2:10], "big") == size


def test_sse_record():
    event = ev.encode_change(change(fullDocument={"text": "line1\nline2"}))
    record = event.sse
    assert record.startswith(b"id: 8263A1B2C3000000012B022C0100296E5A1004\ndata: {")
    assert record.endswith(b"\n\n") and record.count(b"\n") == 3  # newline in data is escaped


def test_control_messages_have_type_and_no_operation_type():
    message = json.loads(ev.control("resync", reason="history_lost"))
    assert message == {"type": "resync", "reason": "history_lost"}


def test_with_deflate_the_compressed_frame_is_built_at_once_and_counted():
    change = {"_id": {"_data": "8263A1B2C3000000012B022C0100296E5A1004"}, "operationType": "insert",
              "fullDocument": {"text": "abc" * 1000}}
    plain, compressed = ev.encode_change(change), ev.encode_change(change, deflate=True)
    assert plain.size == 2 * len(plain.frame)
    size = compressed.size
    assert size == 2 * len(compressed.frame) + len(compressed.deflated)
    assert compressed.size == size  # stable: the replay buffer adds and later subtracts it


def update_moving_a_document(**extra):
    oid = ObjectId("65a1b2c3d4e5f60718293a4b")
    return ev.encode_change(change(
        operationType="update", documentKey={"_id": oid},
        updateDescription={"updatedFields": {"owner": "bob", "note": "new"}},
        fullDocument={"_id": oid, "owner": "bob", "note": "new"},
        fullDocumentBeforeChange={"_id": oid, "owner": "alice", "note": "old"}, **extra))


def test_a_leave_carries_the_key_and_nothing_of_the_content():
    event = update_moving_a_document()
    leave = event.leave
    assert leave is event.leave  # encoded once, whoever receives it
    assert json.loads(leave.data) == {
        "type": "leave", "ns": "shop.orders",
        "documentKey": {"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}}}
    assert list(json.loads(leave.data)) == ["type", "ns", "documentKey"]
    assert leave.frame == ws_frame(leave.data)
    assert leave.deflated == leave.frame  # control messages go uncompressed (RFC 7692 §6)
    assert leave.sse == (b"id: " + event.token.encode() + b"\nevent: leave\ndata: "
                         + leave.data + b"\n\n")  # EventSource resumes past the event
    assert leave.token == event.token
    for secret in (b"new", b"old", b"bob", b"alice"):
        assert secret not in leave.data


def test_without_its_pre_image_an_event_is_the_same_event_minus_that_field():
    event = update_moving_a_document()
    entered = event.entered
    assert entered is event.entered  # encoded once, whoever receives it
    sent = json.loads(entered.data)
    assert "fullDocumentBeforeChange" not in sent and b"old" not in entered.frame
    assert sent == {k: v for k, v in json.loads(event.data).items()
                    if k != "fullDocumentBeforeChange"}
    assert (entered.token, entered.op, entered.ns) == (event.token, event.op, event.ns)
    fresh = ev.encode_change({k: v for k, v in event.change.items()
                              if k != "fullDocumentBeforeChange"}, deflate=True)
    assert entered.deflated == fresh.deflated and entered.sse == fresh.sse


def test_a_leave_survives_a_pipeline_that_removed_ns():
    event = ev.encode_change({"_id": {"_data": "82AA"}, "operationType": "update",
                              "documentKey": {"_id": 1}})
    assert json.loads(event.leave.data) == {"type": "leave", "ns": "", "documentKey": {"_id": 1}}


def test_an_event_whose_token_has_type_bits_is_known_by_its_whole_id_and_ordered_by_its_data():
    data = "8263A1B2C3000000012B042C0100296E5A1004"
    event = ev.encode_change({"_id": {"_data": data, "_typeBits": b"\x82\x00\x01"},
                              "operationType": "insert"})
    assert (event.token, event.key) == (data + ".ggAB", data)
    assert event.sse.startswith(b"id: " + data.encode() + b".ggAB\ndata: ")
    assert json.loads(event.data)["_id"]["_typeBits"] == {
        "$binary": {"base64": "ggAB", "subType": "00"}}  # the frame is MongoDB's event as it was
