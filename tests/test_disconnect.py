"""The disconnect table (changerelay/disconnect.py) is the one list of close codes and refusals:
the code that closes and refuses, the JavaScript client and the README must all agree with it.

Each check reads the other party as text — the package's source through its syntax tree, the
client's table as the JSON it is written in, the README's tables — so that a cause added in one
place and not the others fails here, with the difference named.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from changerelay import frames
from changerelay.admission import Refusal
from changerelay.disconnect import CLOSES, REFUSALS, Retry

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "changerelay"
CLIENT = ROOT / "static" / "changerelay.js"
PAGE = ROOT / "static" / "app.js"
README = ROOT / "README.md"

CLOSE_CONSTANTS = {name: value for name, value in vars(frames).items()
                   if name.isupper() and isinstance(value, int) and 1000 <= value < 5000}


def relay_sources() -> dict[str, ast.Module]:
    """The relay's modules; the test primary (changerelay/primary/) is a MongoDB stand-in whose
    errors are MongoDB's, not the relay's refusals, and this glob does not reach it."""
    return {path.name: ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE.glob("*.py"))}


def literal(node: ast.AST | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def close_code(node: ast.AST | None) -> int | None:
    """``frames.PROTOCOL_ERROR`` (or a bare ``PROTOCOL_ERROR`` inside frames.py) as its
    number."""
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    return CLOSE_CONSTANTS.get(name)


def refusals_in_code() -> set[str]:
    """The ``error`` of every ``Refusal("code", …)`` the package raises, and of every filter
    error (a bad ``filter`` parameter is refused with its code). Their statuses come from the
    table itself (``admission.Refusal``)."""
    found = set()
    for name, tree in relay_sources().items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            called = getattr(node.func, "id", getattr(node.func, "attr", None))
            if called == "RegexError" and name == "regex.py":  # (message, code="invalid_regex")
                given = node.args[1:] or [k.value for k in node.keywords if k.arg == "code"]
                found.add(literal(given[0]) if given else "invalid_regex")
                continue
            code = literal(node.args[0])
            if not isinstance(code, str):
                continue  # re-raised with a code chosen elsewhere (collected there)
            if called == "Refusal" or (called == "FilterError" and name == "filters.py"):
                found.add(code)
    return found


def closes_named_in_code() -> set[str]:
    """The causes the package closes a connection for by name: every ``CLOSES["cause"]``."""
    return {literal(node.slice) for tree in relay_sources().values() for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "CLOSES"}


def closes_in_code() -> set[tuple[int, str | None]]:
    """``(code, reason)`` of every close the package sends: calls and defaults that pair a
    close-code constant with a literal reason, and protocol errors (whose reason names the
    fault, so it is None here)."""
    found = set()
    for tree in relay_sources().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                called = getattr(node.func, "id", getattr(node.func, "attr", None))
                values = [*node.args, *(k.value for k in node.keywords)]
                codes = [c for c in map(close_code, values) if c is not None]
                if called == "ProtocolError" and codes:
                    found.add((codes[0], None))
                    continue
                reasons = [r for r in map(literal, values) if isinstance(r, str)]
                if len(codes) == 1 and len(reasons) == 1:
                    found.add((codes[0], reasons[0]))
            elif isinstance(node, ast.FunctionDef):
                arguments = node.args.args[len(node.args.args) - len(node.args.defaults):]
                defaults = {a.arg: d for a, d in zip(arguments, node.args.defaults, strict=True)}
                code, reason = close_code(defaults.get("code")), literal(defaults.get("reason"))
                if code is not None and reason:  # reason="" only spells a signature out
                    found.add((code, reason))
    return found


def client_table() -> dict:
    """``DISCONNECTS`` in static/changerelay.js, written as JSON so that it can be read here."""
    match = re.search(r"^export const DISCONNECTS = (\{.*?^\});$", CLIENT.read_text(),
                      re.MULTILINE | re.DOTALL)
    assert match, "static/changerelay.js must export DISCONNECTS = {…}; as a JSON literal"
    return json.loads(match.group(1))


def readme_rows() -> list[list[str]]:
    """The cells of every table row in the README's "Close codes and refusals" section."""
    text = README.read_text()
    match = re.search(r"^### Close codes and refusals\n(.*?)(?=^##)", text,
                      re.MULTILINE | re.DOTALL)
    assert match, 'the README needs a "### Close codes and refusals" section'
    rows = []
    for line in match.group(1).splitlines():
        cells = [cell.strip().replace("`", "") for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows.append(cells)
    return rows


def as_reason(cell: str) -> str | None:
    return None if cell.startswith("—") else cell


def as_errors(cell: str) -> tuple[str, ...]:
    return () if cell.startswith("—") else tuple(cell.split(", "))


# -- the table against the code --------------------------------------------------------------


def test_every_refusal_the_code_raises_is_in_the_table_and_no_other() -> None:
    in_table = {error for refusal in REFUSALS.values() for error in refusal.errors}
    in_code = refusals_in_code()
    assert in_code - in_table == set(), "raised, but missing from disconnect.REFUSALS"
    assert in_table - in_code == set(), "in disconnect.REFUSALS, but raised nowhere"


def test_a_refusal_answers_with_the_status_the_table_lists_it_under() -> None:
    for status, refusal in REFUSALS.items():
        for error in refusal.errors:
            assert Refusal(error, "why").status == status, error


def test_a_refusal_the_table_does_not_list_cannot_be_raised() -> None:
    with pytest.raises(KeyError):
        Refusal("made_up", "a cause no client has heard of")


def test_every_close_the_code_sends_is_in_the_table() -> None:
    in_table = {(close.code, close.reason) for close in CLOSES.values()}
    assert closes_in_code() - in_table == set(), "sent, but missing from disconnect.CLOSES"


def test_the_relay_closes_by_the_table_s_causes() -> None:
    """Slow consumers, expired tokens, unanswered pings and shutdown close with the table's code
    and reason, named by cause, not with a code and a reason written out again."""
    named = closes_named_in_code()
    assert named <= set(CLOSES), named - set(CLOSES)
    assert named >= {"slow_consumer", "token_expired", "ping_timeout", "shutdown"}


def test_a_close_code_shared_by_causes_tells_them_apart_by_reason() -> None:
    pairs = [(close.code, close.reason) for close in CLOSES.values()]
    assert len(pairs) == len(set(pairs))
    for code in {close.code for close in CLOSES.values()}:
        variable = [close for close in CLOSES.values() if close.code == code and not close.reason]
        assert len(variable) <= 1, f"{code}: one cause at most may leave its reason open"


def test_refusal_policies_follow_the_issue() -> None:
    """Permanent refusals stop a client; temporary ones back off; 401 needs a fresh token."""
    assert {s for s, r in REFUSALS.items() if r.retry is Retry.NO} >= {
        400, 403, 413, 414, 421, 431}
    assert {s for s, r in REFUSALS.items() if r.retry is Retry.BACKOFF} == {408, 429, 503}
    assert REFUSALS[401].retry is Retry.FRESH_TOKEN
    assert all(400 <= status < 600 for status in REFUSALS)


# -- the table against the JavaScript client and the README ---------------------------------


def test_the_js_client_carries_the_same_table() -> None:
    table = client_table()
    assert table["closes"] == {
        cause: {"code": close.code, "reason": close.reason, "retry": close.retry.value}
        for cause, close in CLOSES.items()
    }
    assert table["refusals"] == {str(status): refusal.retry.value
                                 for status, refusal in REFUSALS.items()}
    retries = {entry["retry"] for entry in table["closes"].values()} | set(
        table["refusals"].values())
    assert retries <= {retry.value for retry in Retry}


def test_the_page_takes_its_table_from_the_client() -> None:
    """app.js imports DISCONNECTS rather than keeping a close-code list that could drift."""
    source = PAGE.read_text()
    assert re.search(r'import \{[^}]*\bDISCONNECTS\b[^}]*\} from "\./changerelay\.js";', source)
    assert not re.search(r"^\s*\d{3,4}\s*:", source, re.MULTILINE), "a code table of its own"


def test_the_readme_lists_the_same_table() -> None:
    rows = readme_rows()  # closes: code, reason, cause, retry, meaning; refusals: no cause
    closes = {(int(r[0]), as_reason(r[1]), r[2], r[3]) for r in rows if len(r) == 5}
    assert closes == {(close.code, close.reason, cause, close.retry.value)
                      for cause, close in CLOSES.items()}
    refusals = {(int(r[0]), as_errors(r[1]), r[2]) for r in rows if len(r) == 4}
    assert refusals == {(status, refusal.errors, refusal.retry.value)
                        for status, refusal in REFUSALS.items()}
