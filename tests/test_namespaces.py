"""Namespaces by MongoDB's naming rules: one parser for query parameters, claims and WATCH_*."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from changerelay import namespaces as nss
from changerelay.namespaces import Namespace, NamespaceError


@pytest.mark.parametrize("text, expected", [
    ("shop", Namespace("shop", None)),
    ("shop.orders", Namespace("shop", "orders")),
    ("shop.orders.2024", Namespace("shop", "orders.2024")),   # dots are fine in a collection
    ("shop.my orders", Namespace("shop", "my orders")),       # and so are spaces
    ("shop.*", Namespace("shop", "*")),                       # "*" is a collection, not "all"
    ("shop.orders ", Namespace("shop", "orders ")),           # taken as written
    ("Shop-1_x", Namespace("Shop-1_x", None)),
    ("d" * 63, Namespace("d" * 63, None)),
    ("é" * 31 + "d", Namespace("é" * 31 + "d", None)),       # 63 bytes
    ("shop." + "c" * 250, Namespace("shop", "c" * 250)),     # 255 bytes in all
])
def test_valid_namespaces(text, expected):
    assert nss.parse(text) == expected


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("shop.", "empty collection"),
    (".orders", "empty database"),
    ("shop..orders", "'.'"),                 # collection ".orders": MongoDB refuses a leading dot
    ("sh op", "database"),
    ("sh/op", "database"),
    ("sh\\op", "database"),
    ('sh"op', "database"),
    ("sh$op", "database"),
    ("sh\x00op", "database"),
    ("shop.ord$ers", "$"),
    ("shop.ord\x00ers", "NUL"),
    ("shop.system.views", "system."),
    ("d" * 64, "63 bytes"),
    ("é" * 32, "63 bytes"),                  # 32 characters, 64 bytes
    ("shop." + "c" * 251, "255 bytes"),
])
def test_invalid_namespaces(text, words):
    with pytest.raises(NamespaceError) as info:
        nss.parse(text)
    assert words in str(info.value)


def test_comma_separated_lists_are_exact_but_for_spaces_after_commas():
    assert nss.parse_list("shop.a, shop.b,other") == frozenset(
        {Namespace("shop", "a"), Namespace("shop", "b"), Namespace("other", None)})
    for text in ("", "shop.a,", ",shop.a", "shop.a,,shop.b", " "):
        with pytest.raises(NamespaceError):
            nss.parse_list(text)
    with pytest.raises(NamespaceError) as info:
        nss.parse_list(",".join(["shop"] * 4), limit=3)
    assert "more than 3" in str(info.value)


def test_settings_check_each_part_and_the_whole():
    assert nss.database("shop") == "shop"
    assert nss.collection("orders.2024") == "orders.2024"
    for bad in ("a.b", "", "a b"):
        with pytest.raises(NamespaceError):
            nss.database(bad)
    for bad in ("", ".x", "a$b", "system.js"):
        with pytest.raises(NamespaceError):
            nss.collection(bad)
    with pytest.raises(NamespaceError):
        nss.make("d" * 60, "c" * 200)


def test_normalise_drops_collections_their_database_covers():
    assert nss.normalise([("shop", None), ("shop", "orders"), ("other", "x")]) == frozenset(
        {Namespace("shop", None), Namespace("other", "x")})


def test_within():
    allowed = frozenset({Namespace("shop", "orders"), Namespace("logs", None)})
    assert nss.within({Namespace("shop", "orders"), Namespace("logs", "a")}, allowed)
    assert not nss.within({Namespace("shop", None)}, allowed)
    assert not nss.within({Namespace("shop", "users")}, allowed)


names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


@given(names, st.one_of(st.none(), names))
def test_a_parsed_namespace_prints_back_to_itself(db, coll):
    try:
        namespace = nss.make(db, coll)
    except NamespaceError:
        return
    assert nss.parse(str(namespace)) == namespace
