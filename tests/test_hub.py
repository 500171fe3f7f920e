"""The hub's ordering promise, without I/O: every client gets each matching event once, in order."""

from __future__ import annotations

import json
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from changerelay import events as ev
from changerelay.filters import compile_filter
from changerelay.hub import RETELL_INTERVALS, Hub
from changerelay.rows import AccessRule
from changerelay.subscription import Subscription
from tests.support import FakeClient, event, token

EVERYTHING = Subscription()  # no namespace, operation or filter: every event


def flush_now(flush):
    """The hub's flush, run at once rather than on the next loop iteration."""
    flush()


def new_hub(call_soon=flush_now, behind=lambda client, after: None, max_events=10000,
            max_bytes=64 * 1024 * 1024) -> Hub:
    return Hub(call_soon, behind, max_events, max_bytes)


def started_hub(**kwargs) -> Hub:
    hub = new_hub(**kwargs)
    hub.start(token(0))
    return hub


def test_live_clients_share_one_payload_per_group():
    hub = started_hub()
    packed = []

    class Counting(FakeClient):
        def pack(self, events):
            packed.append(len(events))
            return super().pack(events)

    a, b = Counting(), Counting()
    hub.subscribe(a)
    hub.subscribe(b)
    for n in range(1, 4):
        hub.publish(event(n))
    assert a.received == b.received == [token(1), token(2), token(3)]
    assert len(packed) == 3  # once per flush for the group, not once per client


def test_resume_inside_buffer_replays_then_continues_live():
    hub = started_hub()
    for n in range(1, 6):
        hub.publish(event(n))
    client = FakeClient()
    assert hub.resume(client, token(2))
    hub.publish(event(6))
    assert client.received == [token(n) for n in range(3, 7)]


def test_resume_before_floor_is_refused_for_catch_up():
    hub = started_hub(max_events=3)
    for n in range(1, 10):
        hub.publish(event(n))
    assert hub.floor == token(6)
    assert not hub.resume(FakeClient(), token(5))
    client = FakeClient()
    assert hub.resume(client, token(6))
    assert client.received == [token(7), token(8), token(9)]


def test_resume_ahead_of_head_skips_what_client_has_seen():
    hub = started_hub()
    hub.publish(event(1))
    client = FakeClient()
    assert hub.resume(client, token(3))  # from a relay that is further along
    for n in range(2, 6):
        hub.publish(event(n))
    assert client.received == [token(4), token(5)]


def test_a_client_from_a_relay_ahead_joins_once_the_stream_passes_it_without_events():
    """On a quiet deployment only the stream's high-water mark moves: the client is live (told
    positions) once it passes the client's point, not at the next event."""
    hub = started_hub()
    hub.publish(event(1))
    client = FakeClient()
    assert hub.resume(client, token(3))
    hub.advance(token(2))
    assert hub.send_positions(idle=0) == 0  # still held back: not live yet
    hub.advance(token(3))
    assert hub.send_positions(idle=0) == 1
    assert client.controls == [{"type": "position", "resume_after": token(3)}]
    hub.publish(event(4))
    assert client.received == [token(4)]


def test_resume_far_ahead_is_told_to_resync_instead_of_waiting_forever():
    hub = started_hub()
    hub.publish(event(1))
    client = FakeClient()
    far = f"82{0x7FFF0000:08X}00000001"  # cluster time decades ahead: not a relay's recent id
    assert hub.resume(client, far)
    assert client.controls == [{"type": "resync", "reason": "invalid_token"}]
    hub.publish(event(2))
    assert client.received == [token(2)]


def test_resume_before_stream_opens_waits_for_it():
    hub = new_hub()
    client = FakeClient()
    assert hub.resume(client, token(0))
    hub.start(token(0))
    hub.publish(event(1))
    assert client.received == [token(1)]


def test_waiting_client_older_than_the_new_stream_goes_to_catch_up():
    behind = []
    hub = new_hub(behind=lambda client, after: behind.append((client, after)))
    client = FakeClient()
    assert hub.resume(client, token(3))   # the stream has not opened yet: wait
    hub.start(token(10))                  # it opens later than the client's position
    assert behind == [(client, token(3))]
    assert client not in hub.clients


def test_history_lost_tells_everyone_to_resync():
    hub = started_hub()
    client = FakeClient()
    hub.subscribe(client)
    hub.publish(event(1))
    hub.start(token(50), resync=True)
    assert client.controls == [{"type": "resync", "reason": "history_lost"}]
    assert hub.floor == token(50)
    hub.publish(event(51))
    assert client.received == [token(1), token(51)]


def test_subscription_groups_filter_by_ns_and_ops():
    hub = started_hub()
    inserts = FakeClient(Subscription(ops=frozenset({"insert"})))
    other = FakeClient(Subscription(namespaces=frozenset({("db", "other")})))
    hub.subscribe(inserts)
    hub.subscribe(other)
    hub.publish(event(1, "insert"))
    hub.publish(event(2, "delete"))
    hub.publish(event(3, "insert", coll="other"))
    hub.publish(event(4, "dropDatabase", coll=None))
    assert inserts.received == [token(1), token(3)]
    assert other.received == [token(3), token(4)]


def test_position_sent_once_to_quiet_clients_only():
    hub = started_hub()
    quiet = FakeClient(Subscription(ops=frozenset({"delete"})))
    hub.subscribe(quiet)
    hub.publish(event(1))
    hub.advance(token(2))
    assert hub.send_positions(idle=0) == 1
    assert quiet.controls == [{"type": "position", "resume_after": token(2)}]
    assert hub.send_positions(idle=0) == 0


def test_positions_go_out_a_budget_at_a_time_and_every_quiet_client_gets_one():
    hub = started_hub()
    quiet = [FakeClient(Subscription(ops=frozenset({"delete"}))) for _ in range(10)]
    for client in quiet:
        hub.subscribe(client)
    hub.publish(event(1))
    hub.advance(token(2))
    assert [hub.send_positions(idle=0, budget=3) for _ in range(5)] == [3, 3, 3, 1, 0]
    assert all(c.controls == [{"type": "position", "resume_after": token(2)}] for c in quiet)


def test_a_quiet_client_is_told_again_only_when_its_position_is_about_to_leave_the_buffer():
    """Telling every quiet client its position every interval costs more than the events do
    at 10,000 per-user clients (issue 14). Told once, a client is told again when the replay
    buffer is about to drop where it would resume from, or after RETELL_INTERVALS of silence:
    until then a reconnect resumes from the buffer, losing nothing."""
    hub = started_hub(max_events=20)
    quiet = FakeClient(Subscription(ops=frozenset({"delete"})))
    hub.subscribe(quiet)

    def silent_for(seconds):
        quiet.last_send = time.monotonic() - seconds

    hub.publish(event(1))
    silent_for(2)
    assert hub.send_positions(idle=1) == 1  # first told after one interval, as before
    for n in range(2, 10):  # still in the newer half of the buffer
        hub.publish(event(n))
    silent_for(2)
    assert hub.send_positions(idle=1) == 0
    silent_for(RETELL_INTERVALS + 1)
    assert hub.send_positions(idle=1) == 1  # a long silence: told anyway
    for n in range(10, 20):  # 10 events after token(9): half the buffer
        hub.publish(event(n))
    silent_for(2)
    assert hub.send_positions(idle=1) == 0
    replayed = FakeClient(Subscription())
    assert hub.resume(replayed, token(9))  # had it left now, it would resume from the buffer
    assert replayed.received == [token(n) for n in range(10, 20)]
    hub.publish(event(20))  # 11 after it: in the older half now
    silent_for(2)
    assert hub.send_positions(idle=1) == 1
    assert [c["resume_after"] for c in quiet.controls] == [token(1), token(9), token(20)]


def test_a_position_pass_can_look_at_a_share_of_the_groups_and_a_round_covers_them_all():
    """The app passes several times per interval: each pass looks at its share of the groups,
    not at all 10,000 of them (issue 14), and every quiet client is told once a round."""
    hub = started_hub()
    quiet = [FakeClient(Subscription(filter=compile_filter({"fullDocument.n": n})))
             for n in range(10)]
    for client in quiet:
        hub.subscribe(client)
    hub.publish(event(1))
    assert [hub.send_positions(idle=0, share=0.25) for _ in range(4)] == [3, 3, 3, 1]
    assert all(c.controls == [{"type": "position", "resume_after": token(1)}] for c in quiet)
    assert [hub.send_positions(idle=0, share=0.25) for _ in range(4)] == [0, 0, 0, 0]


def test_byte_bound_evicts_oldest():
    one = event(1)
    hub = started_hub(max_bytes=one.size * 2)
    for n in range(1, 5):
        hub.publish(event(n))
    assert hub.stats()["buffered_events"] == 2
    assert hub.floor == token(2)


def test_deferred_flush_batches_and_resume_sees_pending():
    scheduled = []
    hub = new_hub(call_soon=scheduled.append)
    hub.start(token(0))
    live = FakeClient()
    hub.subscribe(live)
    hub.publish(event(1))
    hub.publish(event(2))
    assert live.received == [] and len(scheduled) == 1
    late = FakeClient()
    hub.resume(late, token(1))        # flushes pending first, then replays
    assert live.received == [token(1), token(2)]
    assert late.received == [token(2)]
    scheduled[0]()
    hub.publish(event(3))
    scheduled[-1]()
    assert live.received == [token(1), token(2), token(3)]
    assert late.received == [token(2), token(3)]


operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 3)),
        st.tuples(st.just("join"), st.integers(0, 40)),
        st.tuples(st.just("leave"), st.integers(0, 10)),
        st.tuples(st.just("flush"), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 8))
def test_any_interleaving_delivers_each_event_once_in_order(script, capacity):
    """Clients join at arbitrary points (live, resuming inside or before the buffer); each one
    must receive exactly the events after its starting point, in order, with no duplicate."""
    scheduled = []
    hub = new_hub(max_events=capacity, call_soon=scheduled.append)
    hub.start(token(0))
    published = 0
    clients: list[tuple[FakeClient, int]] = []
    for action, arg in script:
        if action == "publish":
            for _ in range(arg):
                published += 1
                hub.publish(event(published))
        elif action == "flush" and scheduled:
            scheduled.pop(0)()
        elif action == "join":
            client = FakeClient()
            after = max(0, published - arg)
            if arg == 0:
                hub.subscribe(client)
                after = published
            elif not hub.resume(client, token(after)):
                continue  # beyond the buffer: catch-up's job, tested end to end
            clients.append((client, after))
        elif action == "leave" and clients:
            client, _ = clients.pop(arg % len(clients))
            hub.unsubscribe(client)
    hub.flush()
    for client, after in clients:
        assert client.received == [token(n) for n in range(after + 1, published + 1)]


SAMPLE_EVENTS = [
    ev.encode_change({"_id": {"_data": token(100 + i)}, "operationType": op,
                      "ns": {"db": db, "coll": coll} if coll else {"db": db},
                      "documentKey": {"_id": n}, "fullDocument": {"_id": n, "n": n}})
    for i, (op, db, coll, n) in enumerate(
        (op, db, coll, n) for op in ("insert", "update", "delete")
        for db, coll in (("db", "c"), ("db", "*"), ("other", "x"), ("db", None))
        for n in (1, 2))
] + [ev.encode_change({"_id": {"_data": token(200)}, "operationType": "invalidate"})]

namespace_sets = st.one_of(st.none(), st.frozensets(st.sampled_from(
    [("db", None), ("db", "c"), ("db", "*"), ("other", None), ("other", "x")]), max_size=3))
op_sets = st.one_of(st.none(), st.frozensets(st.sampled_from(["insert", "update", "delete"]),
                                              max_size=2))
specs = st.one_of(st.none(), st.sampled_from([
    {"fullDocument.n": 1}, {"fullDocument.n": {"$eq": 1}}, {"fullDocument.n": {"$ne": 1}},
    {"documentKey._id": 2}, {"$or": [{"fullDocument.n": 1}, {"documentKey._id": 2}]}]))
subscriptions = st.builds(
    lambda ns, ops, spec, rule: Subscription(
        ns, ops, None if spec is None else compile_filter(spec),
        None if rule is None else AccessRule(rule, post_images=True)),
    namespace_sets, op_sets, specs, specs)


def decides(subscription, event) -> list:
    return [(type(item).__name__, item.data) for item in subscription.select([event])]


@settings(max_examples=400, deadline=None)
@given(subscriptions, subscriptions)
def test_two_subscriptions_share_a_group_only_if_they_are_equal(one, two):
    """The hub hands every client of a group the group's compiled subscription, so sharing a
    group must mean deciding every event alike; and equal subscriptions should share one."""
    hub = started_hub()
    a, b = FakeClient(one), FakeClient(two)
    hub.subscribe(a)
    hub.subscribe(b)
    if a.subscription is b.subscription:
        assert one == two
        for event in SAMPLE_EVENTS:
            assert decides(one, event) == decides(two, event), event
    twin = FakeClient(Subscription(one.namespaces, one.ops, one.filter, one.access))
    hub.subscribe(twin)
    assert twin.subscription is a.subscription


def test_an_empty_namespace_set_is_not_every_namespace():
    hub = started_hub()
    everything, nothing = FakeClient(), FakeClient(Subscription(frozenset()))
    hub.subscribe(everything)
    hub.subscribe(nothing)
    hub.publish(event(1))
    assert everything.received == [token(1)] and nothing.received == []


# -- row rules: one decision per group per event, the same on every path ----------------------

def image_event(n, op, post=None, pre=None, key=1):
    doc = {"_id": {"_data": token(n)}, "operationType": op, "ns": {"db": "db", "coll": "c"},
           "documentKey": {"_id": key}}
    if post is not None:
        doc["fullDocument"] = {"_id": key, **post}
    if op != "insert":
        doc["fullDocumentBeforeChange"] = None if pre is None else {"_id": key, **pre}
    return ev.encode_change(doc)


def moving_document():
    """Bob's document gets a secret, moves to alice, changes, moves back; then one of alice's
    comes and goes."""
    return [
        image_event(1, "insert", {"owner": "bob"}),
        image_event(2, "update", {"owner": "bob", "note": "S"}, {"owner": "bob"}),
        image_event(3, "update", {"owner": "alice", "note": ""}, {"owner": "bob", "note": "S"}),
        image_event(4, "update", {"owner": "alice", "note": "A"}, {"owner": "alice", "note": ""}),
        image_event(5, "update", {"owner": "bob", "note": "B"}, {"owner": "alice", "note": "A"}),
        image_event(6, "delete", pre={"owner": "bob", "note": "B"}),
        image_event(7, "insert", {"owner": "alice"}, key=2),
        image_event(8, "delete", pre={"owner": "alice"}, key=2),
    ]


def reader(owner):
    return Subscription(access=AccessRule({"fullDocument.owner": owner}, post_images=True))


class Reader(FakeClient):
    """Records what it is sent as the JSON its socket would carry: events and leaves alike."""

    def pack(self, events):
        return json.dumps([json.loads(e.data) for e in events]).encode()


def seen(client):
    return [(f.get("type") or f["operationType"], f["documentKey"]["_id"],
             f.get("fullDocument", {}).get("note"), "fullDocumentBeforeChange" in f)
            for f in client.received]


ALICE_SEES = [("update", 1, "", False),   # brought to her: without bob's pre-image
              ("update", 1, "A", True),
              ("leave", 1, None, False),   # taken away: the key, nothing of the new content
              ("insert", 2, None, False),
              ("delete", 2, None, True)]
BOB_SEES = [("insert", 1, None, False), ("update", 1, "S", True), ("leave", 1, None, False),
            ("update", 1, "B", False), ("delete", 1, None, True)]


def test_row_rules_live_with_bystanders():
    hub = started_hub()
    alice, bob, everyone = Reader(reader("alice")), Reader(reader("bob")), Reader()
    for client in (alice, bob, everyone):
        hub.subscribe(client)
    for change in moving_document():
        hub.publish(change)
    assert seen(alice) == ALICE_SEES
    assert seen(bob) == BOB_SEES
    assert len(everyone.received) == 8 and "S" in json.dumps(everyone.received)
    assert "S" not in json.dumps(alice.received) and "A" not in json.dumps(bob.received)


def test_row_rules_on_replay_ahead_and_waiting_paths_match_live():
    hub = started_hub()
    live = Reader(reader("alice"))
    hub.subscribe(live)
    for change in moving_document():
        hub.publish(change)
    replayed = Reader(reader("alice"))
    assert hub.resume(replayed, token(0))
    assert replayed.received == live.received

    hub = started_hub()
    hub.publish(moving_document()[0])
    ahead = Reader(reader("alice"))
    assert hub.resume(ahead, token(4))   # from a relay further along: holds back up to 4
    for change in moving_document()[1:]:
        hub.publish(change)
    assert ahead.received == live.received[2:]

    hub = new_hub()
    waiting = Reader(reader("alice"))
    assert hub.resume(waiting, token(0))
    hub.start(token(0))
    for change in moving_document():
        hub.publish(change)
    assert waiting.received == live.received


def test_row_rules_on_the_catch_up_path_match_live():
    from changerelay.catchup import CatchUp, Job

    hub = started_hub()
    live = Reader(reader("alice"))
    hub.subscribe(live)
    catchup = CatchUp(hub, open_stream=None, streams=1, missing_image=lambda exc: None,
                      per_peer=1)
    job = Job(token(0), ("peer 1",))
    riders = [Reader(reader("alice")), Reader(reader("alice")), Reader(reader("bob"))]
    for rider in riders:
        job.add(rider, token(0))
    for change in moving_document():
        hub.publish(change)
        catchup._deliver(job, change)
    assert riders[0].received == riders[1].received == live.received
    assert seen(riders[2]) == BOB_SEES


# -- positions for a client whose token restricts it: high-water marks and its own ids ---------

# Ids the hub can tell apart (tokens.py): at cluster time t (seconds, increment 1), the
# high-water mark sorts before every event; events follow by key (here the document's number).
def hwm(t: int) -> str:
    return f"82{t:08X}000000012B0429296E1404"


def keyed(t: int, key: int, coll="c") -> ev.Event:
    return ev.encode_change({"_id": {"_data": f"82{t:08X}000000012B042C0100296E{key:04X}04"},
                             "operationType": "insert", "ns": {"db": "db", "coll": coll},
                             "documentKey": {"_id": key}})


ONLY_C = Subscription(namespaces={("db", "c")}, grant={("db", "c")})  # as an ns claim makes it


def test_a_restricted_client_is_told_a_high_water_mark_at_others_events():
    hub = new_hub()
    hub.start(hwm(1))  # a fresh stream: MongoDB's high-water mark, the spelling to copy
    mine, everyone = FakeClient(ONLY_C), FakeClient()
    hub.subscribe(mine)
    hub.subscribe(everyone)
    hub.publish(keyed(5, 1, coll="c"))
    hub.publish(keyed(7, 2, coll="other"))
    hub.publish(keyed(7, 3, coll="other"))
    assert hub.send_positions(idle=0) == 2
    assert mine.controls == [{"type": "position", "resume_after": hwm(7)}]
    assert everyone.controls == [{"type": "position", "resume_after": keyed(7, 3).token}]


def test_a_restricted_client_sent_an_event_of_the_newest_time_is_told_that_event():
    """The high-water mark at that time would bring its own event back."""
    hub = new_hub()
    hub.start(hwm(1))
    mine = FakeClient(ONLY_C)
    hub.subscribe(mine)
    hub.publish(keyed(7, 1, coll="c"))
    hub.publish(keyed(7, 2, coll="other"))  # same cluster time: a transaction
    hub.send_positions(idle=0)
    assert mine.controls == [{"type": "position", "resume_after": keyed(7, 1).token}]


def test_a_restricted_client_replayed_to_the_newest_time_is_told_what_it_was_sent():
    hub = new_hub()
    hub.start(hwm(1))
    hub.publish(keyed(7, 1, coll="c"))
    hub.publish(keyed(7, 2, coll="other"))
    late = FakeClient(ONLY_C)
    assert hub.resume(late, hwm(1))  # its group had no events live: the replay says what it had
    hub.send_positions(idle=0)
    assert late.received == [keyed(7, 1).token]
    assert late.controls == [{"type": "position", "resume_after": keyed(7, 1).token}]


def test_without_a_high_water_mark_to_copy_a_restricted_client_keeps_its_own_ids():
    hub = new_hub()
    hub.start(keyed(3, 0, coll="other").token)  # the first batch held an event: no mark seen
    mine, quiet = FakeClient(ONLY_C), FakeClient(ONLY_C)
    hub.subscribe(mine)
    hub.publish(keyed(5, 1, coll="c"))
    hub.subscribe(quiet)
    hub.publish(keyed(7, 2, coll="other"))
    hub.send_positions(idle=0)
    assert mine.controls == [{"type": "position", "resume_after": keyed(5, 1).token}]
    # its group's newest: an event of its own subscription, and nothing after it was for it
    assert quiet.controls == mine.controls
    hub.advance(hwm(8))  # an empty batch: MongoDB's high-water mark
    hub.send_positions(idle=0)
    assert mine.controls[-1] == {"type": "position", "resume_after": hwm(8)}


def test_a_position_from_a_long_idle_stream_resumes_live_not_as_an_invalid_token():
    """On an idle deployment the stream's high-water mark moves with the primary's no-op while
    the newest event stays where it was: a client told that position minutes later resumes
    from it, here or at a relay that has followed the stream as far."""
    hub = new_hub()
    hub.start(hwm(1))
    hub.publish(keyed(5, 1))
    hub.advance(hwm(5 + 600))  # ten minutes of no-ops later
    quiet = FakeClient()
    hub.subscribe(quiet)
    hub.send_positions(idle=0)
    [position] = quiet.controls
    back = FakeClient()
    assert hub.resume(back, position["resume_after"])
    hub.publish(keyed(700, 2))
    assert back.controls == [] and back.received == [keyed(700, 2).token]
