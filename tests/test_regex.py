"""MongoDB's $regex dialect on RE2: same answers as PCRE2, linear time, refusals that name things.

The oracle is PCRE2 itself (the ``pcre2`` package), compiled as MongoDB compiles patterns: UTF and
the $options flags, no UCP (``src/mongo/util/pcre_util.cpp``). It is PCRE2 10.47 where MongoDB
vendors 10.42, so the generated patterns leave out what changed in between (``{,n}``, spaces in
braces, ``\\p{Lu}`` under i), which the relay refuses anyway.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pcre2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pcre2 import _cy

from changerelay.regex import MAX_LENGTH, MAX_POSITIONS, RegexError, compile_regex
from tests.support import examples

# PCRE2 option bits (pcre2.h).
_UTF, _UCP, _ALT_BSUX, _NEVER_BACKSLASH_C = 0x00080000, 0x00020000, 0x00000002, 0x00100000
_PCRE2_FLAGS = {"i": 0x00000008, "m": 0x00000400, "s": 0x00000020, "x": 0x00000080}


def mongodb_matches(pattern: str, flags: str, subject: str) -> bool:
    """What MongoDB's PCRE2 answers: UTF plus the flags, and none of the binding's own defaults."""
    options = _UTF
    for flag in set(flags) & set(_PCRE2_FLAGS):
        options |= _PCRE2_FLAGS[flag]
    code = _cy.compile(pattern, options, _UCP | _ALT_BSUX | _NEVER_BACKSLASH_C)
    return pcre2.Pattern(code, pattern, 0, False, None).search(subject) is not None


def relay_matches(pattern: str, flags: str, subject: str) -> bool:
    return compile_regex(pattern, flags).search(subject.encode())


# Each row is read off pcre2pattern (https://www.pcre.org/current/doc/html/pcre2pattern.html)
# and checked against PCRE2 as MongoDB compiles it.
KELVIN, LONG_S = "\u212a", "\u017f"
SEMANTICS = [
    # $ is the end or before a final newline (section "Circumflex and dollar"); \Z the same.
    ("b$", "", "ab\n", True),
    ("b$", "", "ab\n\n", False),
    ("^a$|^b$", "", "b\n", True),
    ("(x|b$)", "", "ab\n", True),
    ("b\\Z", "m", "ab\n", True),
    ("b\\z", "", "ab\n", False),
    ("^b", "m", "a\nb", True),
    ("a$", "m", "a\nb", True),
    # \s includes VT since PCRE2 10.0 (section "Generic character types").
    ("\\s", "", "\x0b", True),
    ("[\\S]", "", "\x0b", False),
    # Without UCP, \w \d and POSIX classes are ASCII tables, which i does not case-fold.
    ("\\w", "i", KELVIN, False),
    ("\\W", "i", KELVIN, True),
    ("[\\w.]", "i", KELVIN, False),
    ("[[:upper:]]", "i", "a", True),
    ("[[:upper:]]", "i", LONG_S, False),
    ("k", "i", KELVIN, True),
    ("[a-z]", "i", KELVIN, True),
    ("\\d", "", "\u0663", False),
    # x ignores Pattern White Space and #-comments to the newline, not inside classes.
    ("a b # comment\n c", "x", "abc", True),
    ("a[ ]b", "x", "a b", True),
    ("a\\ b", "x", "a b", True),
    ("a(?x) b", "", "ab", True),
    ("(?x: a b )c d", "", "abc d", True),
    ("a(?#comment)+$", "", "aaa", True),
    # Option settings last to the end of their group, across alternatives.
    ("(a(?i)b|c)", "", "C", True),
    ("((?i)a)b", "", "AB", False),
    ("(?-i)a", "i", "A", False),
    (".", "s", "\n", True),
    ("(?s-s).", "", "\n", False),
    # Escapes for characters, and \Q…\E.
    ("\\x41\\x{42}\\o{103}", "", "ABC", True),
    ("\\cA\\e\\0", "", "\x01\x1b\x00", True),
    ("\\Qa.b\\E", "", "axb", False),
    ("[\\Q]\\E]", "", "]", True),
    ("[]a]", "", "]", True),
    ("[a-]", "", "-", True),
    ("a{2}", "", "a{2}", False),
    ("a{x}", "", "a{x}", True),
    # \b and \B are ASCII word boundaries; a non-ASCII letter is not a word character.
    ("a\\B.", "", "aé", False),
    ("a\\b.", "", "aé", True),
    ("é\\Bb", "", "éb", False),
    ("\\é", "", "é", True),
]


@pytest.mark.parametrize(("pattern", "flags", "subject", "expected"), SEMANTICS)
def test_matches_as_pcre2_reads_it(pattern, flags, subject, expected):
    assert mongodb_matches(pattern, flags, subject) is expected  # the row itself is right
    assert relay_matches(pattern, flags, subject) is expected


REFUSED = [
    ("(a)\\1", "backreference"),
    ("(?P<n>a)(?P=n)", "backreference"),
    ("(a)\\g{1}", "backreference"),
    ("(?=a)", "lookahead or lookbehind"),
    ("(?<!a)b", "lookahead or lookbehind"),
    ("(?>a+)b", "atomic group"),
    ("a++", "possessive"),
    ("a{2}+", "possessive"),
    ("(a|b)(?1)", "recursion"),
    ("(?(1)a|b)", "conditional"),
    ("(*FAIL)", "(*VERB)"),
    ("a\\Kb", "\\K"),
    ("\\R", "\\R"),
    ("\\X", "\\X"),
    ("\\C", "\\C"),
    ("\\Ga", "\\G"),
    ("\\h", "\\h"),
    ("\\v", "\\v"),
    ("\\N", "\\N"),
    ("\\u0041", "\\u"),
    ("a{,3}", "{,3}"),
    ("a{1, 3}", "{1, 3}"),
    ("a$b", "$"),
    ("(a$|b)c", "$"),
    ("(a$){2}", "$"),
    ("a\\Zb", "$"),
    ("[\\d-z]", "range"),
    ("[z-a]", "out of order"),
    ("[[.a.]]", "collating"),
    ("[[:nope:]]", "POSIX class"),
    ("(?i)[^\\w]", "negated class"),
    ("\\B", "\\B"),
    ("(?:a|\\B)", "\\B"),
    ("\\p{Lu}", "under the i flag"),
    ("(?xx)a", "xx"),
    ("(?^)a", "(?^)"),
    ("a**", "another one"),
    ("^*", "after an assertion"),
    ("*a", "follows nothing"),
    ("(a", "without its ')'"),
    ("a)", "unmatched"),
    ("[a", "without its ']'"),
    ("\\y", "\\y"),
    ("\\x{110000}", "not a Unicode character"),
    ("a{1001}", "1000"),
    ("(?:a{30}){40}", "limit"),
    ("x" * (MAX_LENGTH + 1), "limit"),
]


def test_the_one_known_difference_left():
    """docs/filters.md, Known differences: with m, PCRE2's ^ does not match after a newline that
    ends the subject (pcre2pattern, "Circumflex and dollar"); RE2's does."""
    assert not mongodb_matches("^$", "m", "a\n") and relay_matches("^$", "m", "a\n")
    assert mongodb_matches("^$", "m", "a\n\nb") and relay_matches("^$", "m", "a\n\nb")


@pytest.mark.parametrize(("pattern", "named"), REFUSED)
def test_refusals_name_the_construct(pattern, named):
    with pytest.raises(RegexError) as caught:
        compile_regex(pattern, "i" if "under the i flag" in named else "")
    assert named in str(caught.value)


@pytest.mark.parametrize("flags", ["g", "l", "iq"])
def test_only_mongodb_options(flags):
    with pytest.raises(RegexError) as caught:
        compile_regex("a", flags)
    assert "imsux" in str(caught.value)


def test_u_is_accepted_and_changes_nothing():
    """docs: $regex $options, "u: Unicode support. This flag is accepted, but is redundant"."""
    assert relay_matches("^é", "u", "éa") and not relay_matches("^É", "u", "éa")


def test_catastrophic_patterns_take_microseconds():
    """The issue's patterns: exponential for a backtracking engine, linear for RE2."""
    cases = [("(a|a)+$", "a" * 29 + "!"), ("(.|..)*!", "john.smith.1984@example.com.au.org"),
             ("(a+)+b", "a" * 5000), ("(x+x+)+y", "x" * 5000), ("^(\\w+\\s?)*$", "ab " * 2000)]
    for pattern, subject in cases:
        regex = compile_regex(pattern, "")
        data = subject.encode()
        started = time.perf_counter()
        regex.search(data)
        assert time.perf_counter() - started < 0.01, pattern


def test_positions_bound_what_a_search_may_cost():
    assert compile_regex("abc", "").positions == 3
    assert compile_regex("(?:ab|c){3}", "").positions == 9
    assert compile_regex("[a-z]+@x", "i").positions == 3
    assert compile_regex("^$", "").positions == 1  # never zero: a search costs something
    assert compile_regex("." * 10 + "{100}", "").positions == 109
    assert compile_regex("a{1000}", "").positions == MAX_POSITIONS


def test_a_refused_pattern_prints_nothing():
    """RE2 logs parse errors to stderr through absl unless told not to; logs stay JSON lines."""
    script = ("from changerelay.regex import compile_regex, Regex, RegexError\n"
              "for bad in ('(a', 'a{2,1}', '\\\\p{Nope}'):\n"
              "    try: compile_regex(bad, '')\n"
              "    except RegexError: pass\n"
              "try: Regex('(', 1)\n"  # straight to RE2, past the parser
              "except RegexError: pass\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=60,
                          env={**os.environ, "LOG_FORMAT": "json"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""


# ---------------------------------------------------------------------------------------------
# Generated patterns against PCRE2
# ---------------------------------------------------------------------------------------------

ALPHABET = ["a", "b", "k", "K", KELVIN, "s", LONG_S, "\n", "\x0b", " ", "é", "É", "_", "1", "."]
ATOMS = st.sampled_from([
    "a", "b", "k", "S", "é", "\\.", "\\n", " ", "#", ".", "^", "$", "\\d", "\\D", "\\w", "\\W",
    "\\s", "\\S", "\\b", "\\B", "\\A", "\\z", "\\Z", "\\x{212A}", "\\x61", "\\Qa.\\E", "(?#c)",
    "[ab]", "[^ab]", "[a-k]", "[\\w.]", "[^\\d]", "[[:upper:]]", "[[:^alpha:]]", "[[:space:]]",
    "[\\s]", "[^\\S\\n]", "[]a]", "[a\\-z]", "\\p{L}", "\\P{Greek}", "(?i)", "(?-i)", "(?m)",
    "(?s)", "(?x)", "(?-x)", " # c\n", "[\\x{212A}]", "[k-s]", "[[:word:]]", "[^[:space:]k]",
    "\\Qk \\E", "[\\Q^\\E]",
])
QUANTIFIERS = st.sampled_from(["", "", "", "*", "+", "?", "{2}", "{1,3}", "{0,}", "*?", "+?"])


def _join(parts):
    return "".join(parts)


PIECES = st.recursive(
    st.builds(lambda atom, quantifier: atom + quantifier, ATOMS, QUANTIFIERS),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=4).map(_join),
        st.builds(lambda opener, body, quantifier: f"{opener}{body}){quantifier}",
                  st.sampled_from(["(", "(?:", "(?i:", "(?-i:", "(?x:", "(?s:", "(?<n>"]),
                  inner, QUANTIFIERS),
        st.builds(lambda a, b: f"{a}|{b}", inner, inner),
    ),
    max_leaves=8,
)


@settings(max_examples=examples(1500), deadline=None, database=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(PIECES, st.sets(st.sampled_from("imsx")).map(_join),
       st.lists(st.lists(st.sampled_from(ALPHABET), max_size=6).map(_join), min_size=1,
                max_size=6))
def test_agrees_with_pcre2(pattern, flags, subjects):
    try:
        regex = compile_regex(pattern, flags)
    except RegexError:
        assume(False)
    for subject in subjects:  # the relay accepts only what MongoDB compiles, and agrees on it
        assert regex.search(subject.encode()) is mongodb_matches(pattern, flags, subject), (
            pattern, flags, subject, regex.translated)
