"""MongoDB's ``$regex`` (PCRE2) on RE2, an engine whose running time is linear in its input.

A client's pattern runs against every event the relay reads, so an engine that backtracks (PCRE,
Python's ``re``) would let one pattern such as ``(a|a)+$`` stall the event loop for everyone.
RE2 never backtracks (https://github.com/google/re2/wiki/Syntax). This module reads a pattern as
MongoDB does — PCRE2 with ``UTF`` and the ``$options`` flags, nothing else
(``src/mongo/util/pcre_util.cpp``; https://www.pcre.org/current/doc/html/pcre2pattern.html) —
and writes the RE2 pattern that matches the same strings, or refuses it naming the construct:

* what RE2 cannot run at all: backreferences, lookaround, atomic groups, possessive quantifiers,
  recursion, conditionals, ``\\K``, ``\\G``, ``\\R``, ``\\X``, ``\\C`` …;
* what the two engines read differently and cannot be translated exactly (a ``$`` that is not at
  the end of the pattern, ``{,n}``, which PCRE2 reads as a literal before 10.43 and as ``{0,n}``
  after …).

Everything whose meaning differs but can be spelled exactly is spelled out: ``$`` (end, or
before a final newline), ``\\Z``, ``\\s`` (which includes VT in PCRE2), ``\\w`` and POSIX classes
under ``i`` (ASCII tables in PCRE2; RE2 would add U+212A KELVIN SIGN and U+017F LONG S), the
``x`` and ``m``/``s`` flags and their inline forms, ``(?#…)`` comments, and character escapes
(``\\x``, ``\\o{}``, octal, ``\\cX``, ``\\e``). Matching only asks *whether* a string matches, so
greediness and capture groups, which change *how*, are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import re2

__all__ = ["FLAGS", "MAX_LENGTH", "MAX_POSITIONS", "Regex", "RegexError", "compile_regex"]

#: ``$options`` letters MongoDB accepts; ``u`` is accepted and ignored, UTF is always on.
FLAGS = "imsux"
#: Pattern characters; what the relay compiles and holds per pattern stays small.
MAX_LENGTH = 256
#: Characters a match can be in the middle of at once (literals and classes, with ``{n,m}``
#: counted m times): RE2's worst case per input byte grows with it (see ``Regex.positions``).
#: 1000 is also RE2's own limit for one counted repetition.
MAX_POSITIONS = 1000
#: RE2's memory per pattern (program and DFA cache); with less, large programs fall back to the
#: NFA at microseconds per byte, with more, hostile patterns only hold more memory.
MEMORY = 1 << 20

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # absl would print parse errors to stderr: logs stay one JSON a line
_OPTIONS.never_capture = True
_OPTIONS.max_mem = MEMORY
_UNANCHORED = re2._re2.RE2.Anchor.UNANCHORED

# PCRE2's "Pattern White Space", ignored under x (pcre2pattern, "Option settings").
_X_SPACE = frozenset("\t\n\x0b\x0c\r \x85\u200e\u200f\u2028\u2029")
_CONTROL = {"a": 7, "e": 0x1B, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09}
# PCRE2's \s (since 8.34, as in Perl 5.18) includes VT, RE2's does not.
_SPACE = "\\t\\n\\x0B\\f\\r "
_NOT_SPACE = "\\x00-\\x08\\x0E-\\x1F\\x21-\\x{10FFFF}"
_POSIX = frozenset({"alnum", "alpha", "ascii", "blank", "cntrl", "digit", "graph", "lower",
                    "print", "punct", "space", "upper", "word", "xdigit"})
# POSIX classes with letters: under i RE2 would fold k and s in them to U+212A KELVIN SIGN and
# U+017F LONG S, while PCRE2 (without UCP) matches them as ASCII tables.
_LETTER_POSIX = frozenset({"alnum", "alpha", "ascii", "graph", "lower", "print", "upper", "word"})
_REFUSED_ESCAPES = {
    "G": "\\G (start of match) has no meaning for a single search",
    "K": "\\K (reset match start)",
    "R": "\\R (newline sequence; atomic in PCRE2) — write (?:\\r\\n|\\n|\\r)",
    "X": "\\X (extended grapheme cluster)",
    "C": "\\C (one byte, which can split a character)",
    "N": "\\N — write [^\\n]",
    "h": "\\h — write the horizontal spaces as a class",
    "H": "\\H — write the horizontal spaces as a negated class",
    "v": "\\v (vertical space in PCRE2, a VT in other dialects) — write [\\n\\x0B\\f\\r]",
    "V": "\\V — write [^\\n\\x0B\\f\\r]",
    "g": "backreferences (\\g) need backtracking",
    "k": "backreferences (\\k) need backtracking",
    "u": "\\u is not PCRE2 syntax — write \\x{hhhh}",
    "U": "\\U is not PCRE2 syntax — write \\x{hhhh}",
    "L": "\\L is not PCRE2 syntax",
    "l": "\\l is not PCRE2 syntax",
    "F": "\\F is not PCRE2 syntax",
}


class RegexError(ValueError):
    """A pattern was refused; the message names the construct and, where one exists, the fix.

    ``code`` is the filter language's error code: ``regex_too_long``, ``regex_too_complex`` or
    ``invalid_regex``."""

    def __init__(self, message: str, code: str = "invalid_regex") -> None:
        super().__init__(message)
        self.code = code


class Regex:
    """A compiled pattern. ``search(data)`` takes the subject as UTF-8 bytes."""

    __slots__ = ("positions", "search", "translated")

    def __init__(self, translated: str, positions: int) -> None:
        compiled = re2._re2.RE2(translated.encode(), _OPTIONS)
        if not compiled.ok():
            message = compiled.error().decode("utf-8", "replace")
            if "too large" in message:
                raise RegexError("it compiles to more than RE2's memory for one pattern",
                                 "regex_too_complex")
            raise RegexError(f"RE2 cannot run it ({message})")
        match = compiled.Match
        self.translated = translated
        #: An upper bound on the NFA threads a search can run at once: RE2 costs up to about
        #: ten nanoseconds per position per byte when its DFA cannot help.
        self.positions = max(positions, 1)
        self.search: Callable[[bytes], bool] = (
            lambda data: match(_UNANCHORED, data, 0, len(data))[0][0] >= 0)


def compile_regex(pattern: str, flags: str) -> Regex:
    """The RE2 form of a MongoDB pattern with ``$options`` ``flags``, or :class:`RegexError`."""
    if len(pattern) > MAX_LENGTH:
        raise RegexError(f"it is {len(pattern)} characters; the limit is {MAX_LENGTH}",
                         "regex_too_long")
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise RegexError(f"flags {''.join(unknown)!r} are not $options MongoDB knows; use "
                         f"{FLAGS!r}")
    if "\0" in pattern:
        raise RegexError("it contains a NUL character (MongoDB refuses it too)")
    if any("\ud800" <= char <= "\udfff" for char in pattern):
        raise RegexError("it is not valid Unicode")
    tree = _Parser(pattern, frozenset(flags) & set("imsx")).parse()
    positions = _positions(tree)
    if positions > MAX_POSITIONS:
        raise RegexError(f"a match can be inside {positions} of its characters at once; the "
                         f"limit is {MAX_POSITIONS}: shorten its counted repetitions",
                         "regex_too_complex")
    return Regex(_emit(tree, tail=True), positions)


# ---------------------------------------------------------------------------------------------
# The tree: what the pattern means, flags already applied to each node.
#   ("seq", [nodes])  ("alt", [seq, ...])  ("repeat", node, low, high | None)
#   ("text", str, folded)  ("class", re2 text)  ("dot", dotall)  ("assert", kind)
# ---------------------------------------------------------------------------------------------

Node = tuple[Any, ...]


class _Parser:
    def __init__(self, pattern: str, flags: frozenset[str]) -> None:
        self.text = pattern
        self.at = 0
        self.flags = set(flags)
        self.names: set[str] = set()
        self.depth = 0

    def refuse(self, what: str) -> RegexError:
        return RegexError(f"{what} (at character {self.at})")

    def peek(self, ahead: int = 0) -> str:
        index = self.at + ahead
        return self.text[index] if index < len(self.text) else ""

    def parse(self) -> Node:
        tree = self.alternation()
        if self.at < len(self.text):  # only an unmatched ")" stops an alternation early
            raise self.refuse("an unmatched ')'")
        return tree

    def alternation(self) -> Node:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.at += 1
            branches.append(self.sequence())
        return ("alt", branches)

    def sequence(self) -> Node:
        items: list[Node] = []
        while True:
            self.skip_ignored()
            char = self.peek()
            if char in ("", "|", ")"):
                self.check_not_word(items)
                return ("seq", items)
            atom = self.atom()
            if atom is None:  # an option setting or \E: nothing to match, nothing to repeat
                if self.quantifier_ahead():
                    raise self.refuse("a quantifier that follows nothing it can repeat")
                continue
            if atom[0] == "seq":  # \Q…\E: a quantifier after it repeats its last character
                *quoted, atom = atom[1]
                items.extend(quoted)
            items.append(self.quantified(atom))

    def check_not_word(self, items: list[Node]) -> None:
        """RE2 tests \\B between bytes, so inside a multi-byte character it holds: exact only
        next to something that matches a character, which puts it between characters."""
        for index, item in enumerate(items):
            if item == ("assert", "not_word") and not (
                    (index and _consumes(items[index - 1]))
                    or (index + 1 < len(items) and _consumes(items[index + 1]))):
                raise self.refuse("a \\B with nothing next to it that matches a character: RE2 "
                                  "would find it inside a multi-byte character")

    def skip_ignored(self) -> None:
        """Comments ``(?#…)``, and under x white space and ``#…`` to the end of the line: PCRE2
        ignores them everywhere between items, even between an item and its quantifier."""
        while True:
            char = self.peek()
            if char == "(" and self.text.startswith("?#", self.at + 1):
                end = self.text.find(")", self.at)
                if end < 0:
                    raise self.refuse("a comment (?# that is not closed")
                self.at = end + 1
            elif "x" not in self.flags:
                return
            elif char in _X_SPACE:
                self.at += 1
            elif char == "#":
                end = self.text.find("\n", self.at)
                self.at = len(self.text) if end < 0 else end + 1
            else:
                return

    # -- quantifiers ----------------------------------------------------------------------------

    def quantifier_ahead(self) -> bool:
        self.skip_ignored()
        return self.peek() in ("*", "+", "?") or self.counted() is not None

    def counted(self) -> tuple[int, int | None, int] | None:
        """``{n}``, ``{n,}``, ``{n,m}`` at the cursor as (low, high, length), else None.

        PCRE2 10.42, which MongoDB vendors, reads anything else in braces literally; 10.43 also
        reads ``{,m}`` and spaces inside the braces as a quantifier, so those are refused."""
        if self.peek() != "{":
            return None
        end = self.text.find("}", self.at)
        if end < 0:
            return None
        body = self.text[self.at + 1:end]
        low, comma, high = body.partition(",")
        if _digits(low) and (_digits(high) or not high):
            return int(low), (int(high) if high else None if comma else int(low)), end + 1 - self.at
        low, _, high = "".join(body.split()).partition(",")
        if (_digits(low) or not low) and (_digits(high) or not high) and (low or high):
            raise self.refuse(f"{{{body}}}, which PCRE2 reads as a literal before 10.43 and as a "
                              "quantifier after: write {n}, {n,} or {n,m} without spaces")
        return None

    def quantified(self, atom: Node) -> Node:
        while True:
            self.skip_ignored()
            char = self.peek()
            if char in ("*", "+", "?"):
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
                self.at += 1
            else:
                counted = self.counted()
                if counted is None:
                    return atom
                low, high, length = counted
                if high is not None and high < low:
                    raise self.refuse(f"a quantifier {{{low},{high}}} whose numbers are out of "
                                      "order")
                if max(low, high or 0) > 1000:
                    raise self.refuse("a counted repetition above 1000, RE2's limit")
                self.at += length
            if atom[0] == "assert":
                raise self.refuse("a quantifier after an assertion (PCRE2 refuses it too)")
            if atom[0] == "repeat":
                raise self.refuse("a quantifier that follows another one; group the inner one")
            self.skip_ignored()
            if self.peek() == "+":
                raise self.refuse("a possessive quantifier (*+, ++, ?+, {n}+) needs "
                                  "backtracking control that RE2 does not have")
            if self.peek() == "?":
                self.at += 1  # lazy: changes which match is found, not whether one is
            atom = ("repeat", atom, low, high)

    # -- atoms ----------------------------------------------------------------------------------

    def atom(self) -> Node | None:
        char = self.peek()
        self.at += 1
        if char == "(":
            return self.group()
        if char == "[":
            return self.character_class()
        if char == ".":
            return ("dot", "s" in self.flags)
        if char == "^":
            return ("assert", "line_start" if "m" in self.flags else "start")
        if char == "$":
            return ("assert", "line_end" if "m" in self.flags else "dollar")
        if char == "\\":
            return self.escape()
        if char in ("*", "+", "?") or (char == "{" and self.counted_at(self.at - 1)):
            raise self.refuse("a quantifier that follows nothing it can repeat")
        return self.literal(char)

    def counted_at(self, index: int) -> bool:
        saved, self.at = self.at, index
        try:
            return self.counted() is not None
        finally:
            self.at = saved

    def literal(self, char: str) -> Node:
        return ("text", char, "i" in self.flags)

    def group(self) -> Node | None:
        self.depth += 1
        if self.depth > 64:
            raise self.refuse("groups nested more than 64 deep")
        saved = set(self.flags)
        try:
            if self.peek() == "*":
                raise self.refuse("a (*VERB) or (*name: …) construct")
            if self.peek() != "?":
                return self.group_body()
            self.at += 1
            kind = self.peek()
            if kind in (":", "|"):  # (?| resets group numbers, which only naming cares about
                self.at += 1
                return self.group_body()
            if kind in ("=", "!") or (kind == "<" and self.peek(1) in ("=", "!")):
                raise self.refuse("a lookahead or lookbehind assertion, which RE2 cannot run")
            if kind == ">":
                raise self.refuse("an atomic group (?>…), which RE2 cannot run")
            if kind == "(":
                raise self.refuse("a conditional group (?(…)…), which RE2 cannot run")
            if (kind == "P" and self.peek(1) == "<") or kind in ("<", "'"):
                self.group_name()
                return self.group_body()
            if (kind == "P" and self.peek(1) in ("=", ">")) or kind in ("&", "R") or (
                    kind.isdigit() or (kind in ("+", "-") and self.peek(1).isdigit())):
                raise self.refuse("a backreference, recursion or subroutine call, which RE2 "
                                  "cannot run")
            if kind == "C":
                raise self.refuse("a callout (?C…)")
            return self.option_setting(saved)
        finally:
            self.depth -= 1

    def group_body(self) -> Node:
        saved = set(self.flags)
        body = self.alternation()
        self.flags = saved  # an option set inside a group ends with it
        if self.peek() != ")":
            raise self.refuse("a '(' without its ')'")
        self.at += 1
        return body

    def group_name(self) -> None:
        self.at += 2 if self.peek() == "P" else 1
        close = "'" if self.text[self.at - 1] == "'" else ">"
        end = self.text.find(close, self.at)
        name = self.text[self.at:end] if end > 0 else ""
        if not (name and name.isascii() and (name[0].isalpha() or name[0] == "_")
                and name.replace("_", "a").isalnum() and len(name) <= 32):
            raise self.refuse("a group name that is not 1-32 ASCII letters, digits or _")
        if name in self.names:
            raise self.refuse(f"the group name {name!r} used twice")
        self.names.add(name)
        self.at = end + 1

    def option_setting(self, saved: set[str]) -> Node | None:
        """``(?i)``, ``(?i-m:…)``: PCRE2's option letters, of which matching needs ``imsx``."""
        on = True
        while True:
            char = self.peek()
            self.at += 1
            if char == "-" and on:
                on = False
            elif char in ("i", "m", "s", "x"):
                if char == "x" and self.peek() == "x":
                    raise self.refuse("the xx option (?xx)")
                (self.flags.add if on else self.flags.discard)(char)
            elif char in ("n", "U", "J"):  # capture, greediness, duplicate names: not matching
                continue
            elif char == ")":
                return None  # applies to the rest of the enclosing group, by both engines
            elif char == ":":
                body = self.group_body()
                self.flags = saved
                return body
            elif char == "^":
                raise self.refuse("the option reset (?^)")
            else:
                raise self.refuse(f"an unknown group or option (?{char}")

    # -- escapes --------------------------------------------------------------------------------

    def escape(self) -> Node | None:
        char = self.peek()
        self.at += 1
        if char == "":
            raise self.refuse("a '\\' at the end of the pattern")
        if char == "Q":
            end = self.text.find("\\E", self.at)
            end = len(self.text) if end < 0 else end
            quoted, self.at = self.text[self.at:end], min(end + 2, len(self.text))
            if not quoted:
                return None
            return ("seq", [self.literal(c) for c in quoted])
        if char == "E":
            return None
        assertions = {"b": "word", "B": "not_word", "A": "start", "z": "end", "Z": "dollar"}
        if char in assertions:
            return ("assert", assertions[char])
        if char in ("d", "D", "w", "W", "s", "S", "p", "P"):
            return ("class", self.class_escape(char))  # emitted outside (?i:…): never folded
        if char.isdigit() and char != "0":
            raise self.refuse(f"a backreference \\{char}, which needs backtracking; for a "
                              "character by its code, write \\x{hh}")
        if char in _REFUSED_ESCAPES:
            raise self.refuse(_REFUSED_ESCAPES[char])
        return self.literal(chr(self.code_point(char)))

    def class_escape(self, char: str) -> str:
        """``\\d \\s \\w \\p{…}`` (and negations) as RE2 class text usable inside ``[…]``."""
        if char == "s":
            return f"[{_SPACE}]"
        if char == "S":
            return f"[{_NOT_SPACE}]"
        if char in ("p", "P"):
            if self.peek() == "{":
                end = self.text.find("}", self.at)
                if end < 0:
                    raise self.refuse("a \\p{ without its }")
                name, self.at = self.text[self.at + 1:end], end + 1
            else:
                name, self.at = self.peek(), self.at + 1
            if not name.replace("_", "").replace("^", "").isalnum() or not name.isascii():
                raise self.refuse(f"a Unicode property \\{char}{{{name}}} RE2 does not know")
            if "i" in self.flags and name.removeprefix("^") in _CASED_PROPERTIES:
                raise self.refuse(f"\\{char}{{{name}}} under the i flag, which PCRE2 10.45 "
                                  "changed to match either case; write \\p{L}")
            return f"\\{char}{{{name}}}"
        return f"\\{char}"

    def code_point(self, char: str) -> int:
        """The character an escape other than a class or an assertion stands for."""
        if char in _CONTROL:
            return _CONTROL[char]
        if char == "0":
            digits = ""
            while len(digits) < 2 and self.peek() in "01234567" and self.peek():
                digits += self.peek()
                self.at += 1
            return int(digits or "0", 8)
        if char in ("x", "o"):
            return self.braced_code(16 if char == "x" else 8, char)
        if char == "c":
            target = self.peek()
            if not target or not " " <= target <= "~":
                raise self.refuse("\\c must be followed by a printable ASCII character")
            self.at += 1
            return ord(target.upper()) ^ 0x40
        if char.isascii() and char.isalnum():
            raise self.refuse(f"the escape \\{char}, which PCRE2 does not know")
        return ord(char)  # \. \* \\ \é …: the character itself

    def braced_code(self, base: int, letter: str) -> int:
        digits = "0123456789abcdefABCDEF"[: 22 if base == 16 else 8]
        if self.peek() == "{":
            end = self.text.find("}", self.at)
            raw = self.text[self.at + 1:end] if end > 0 else ""
            self.at = end + 1
        elif letter == "x":
            raw = ""
            while len(raw) < 2 and self.peek() and self.peek() in digits:
                raw += self.peek()
                self.at += 1
        else:
            raise self.refuse("\\o needs braces: \\o{101}")
        if not raw or any(d not in digits for d in raw):
            raise self.refuse(f"\\{letter} without {'hex' if base == 16 else 'octal'} digits")
        value = int(raw, base)
        if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
            raise self.refuse(f"\\{letter}{{{raw}}} is not a Unicode character")
        return value

    # -- character classes ----------------------------------------------------------------------

    def character_class(self) -> Node:
        negated = self.peek() == "^"
        self.at += negated
        chars: list[tuple[int, int]] = []  # ranges of literal characters, case-folded under i
        items: list[str] = []  # \d \w [:alpha:] …, which PCRE2 does not case-fold
        pending: list[tuple[int | str, bool]] = []  # (code point or item, was a bare '-')
        first = True
        while True:
            char = self.peek()
            if char == "":
                raise self.refuse("a '[' without its ']'")
            self.at += 1
            if char == "]" and not first:
                break
            first = False
            if char == "[" and self.posix_ahead():
                pending.append((self.posix_class(), False))
            elif char == "\\":
                pending.extend(self.class_member_escape())
            else:
                pending.append((ord(char), char == "-"))
        index = 0
        while index < len(pending):
            member, _ = pending[index]
            dash = index + 2 < len(pending) and pending[index + 1][1]
            if dash:
                low, high = member, pending[index + 2][0]
                if isinstance(low, str) or isinstance(high, str):
                    raise self.refuse("a range whose end is a class, like [\\d-z]")
                if high < low:
                    raise self.refuse(f"the range {chr(low)}-{chr(high)} is out of order")
                chars.append((low, high))
                index += 3
            else:
                if isinstance(member, str):
                    items.append(member)
                else:
                    chars.append((member, member))
                index += 1
        return ("class", self.render_class(negated, chars, items))

    def posix_ahead(self) -> bool:
        """``[:name:]`` (or ``[.x.]``, ``[=x=]``) closed before the class ends; else ``[`` is a
        literal, as in PCRE2."""
        kind = self.peek()
        end = self.text.find(kind + "]", self.at + 1) if kind in (":", ".", "=") else -1
        return end > 0 and "]" not in self.text[self.at + 1:end]

    def posix_class(self) -> str:
        kind = self.peek()
        end = self.text.find(kind + "]", self.at + 1)
        name = self.text[self.at + 1:end]
        if kind != ":":
            raise self.refuse("POSIX collating elements [[.x.]] and [[=x=]] (PCRE2 refuses "
                              "them too)")
        bare = name.removeprefix("^")
        if bare not in _POSIX:
            raise self.refuse(f"the POSIX class [:{name}:]")
        self.at = end + 2
        return f"[:{name}:]"

    def class_member_escape(self) -> list[tuple[int | str, bool]]:
        char = self.peek()
        self.at += 1
        if char == "Q":
            end = self.text.find("\\E", self.at)
            end = len(self.text) if end < 0 else end
            quoted, self.at = self.text[self.at:end], min(end + 2, len(self.text))
            return [(ord(c), False) for c in quoted]
        if char == "E":
            return []
        if char in ("d", "D", "w", "W", "s", "S", "p", "P"):
            item = self.class_escape(char)
            return [(item[1:-1] if item.startswith("[") else item, False)]
        if char == "b":
            return [(0x08, False)]
        if char in "1234567":  # octal inside a class: there are no backreferences there
            digits = char
            while len(digits) < 3 and self.peek() and self.peek() in "01234567":
                digits += self.peek()
                self.at += 1
            return [(int(digits, 8), False)]
        if char in ("8", "9"):
            return [(ord(char), False)]
        if char in _REFUSED_ESCAPES or char in ("B", "A", "z", "Z", "G", "K", "R", "X", "N"):
            raise self.refuse(f"\\{char} inside a character class")
        return [(self.code_point(char), False)]

    def render_class(self, negated: bool, chars: list[tuple[int, int]], items: list[str]) -> str:
        text = "".join(_char(low) if low == high else f"{_char(low)}-{_char(high)}"
                       for low, high in chars)
        if "i" not in self.flags:
            return f"[{'^' if negated else ''}{text}{''.join(items)}]"
        if not items:
            return f"(?i:[{'^' if negated else ''}{text}])"
        if negated:
            if any(_folds(item) for item in items):
                raise self.refuse("a negated class with \\w, \\W, \\p{…} or a POSIX class of "
                                  "letters under the i flag (RE2 would case-fold it, PCRE2 does "
                                  "not); spell the letters out, e.g. [^A-Za-z0-9_]")
            return f"(?i:[^{text}{''.join(items)}])"
        # PCRE2 (10.42) does not case-fold class escapes and POSIX classes, except that under i
        # [:upper:] and [:lower:] mean letters; RE2 folds what it is given, so only the literal
        # characters are given to it under (?i:…).
        tables = "".join(items).replace("upper", "alpha").replace("lower", "alpha")
        return f"(?:[{tables}]|(?i:[{text}]))" if text else f"[{tables}]"


_CASED_PROPERTIES = frozenset({"Lu", "Ll", "Lt", "Lc", "LC"})


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _folds(item: str) -> bool:
    """Whether RE2 would case-fold ``item`` differently from PCRE2, which does not fold it."""
    return item[:2] in ("\\w", "\\W", "\\p", "\\P") or item.strip("[:^]") in _LETTER_POSIX


def _char(code: int) -> str:
    return f"\\x{{{code:X}}}"


# ---------------------------------------------------------------------------------------------
# Writing RE2 syntax
# ---------------------------------------------------------------------------------------------

_ASSERTIONS = {"start": "\\A", "end": "\\z", "line_start": "(?m:^)", "line_end": "(?m:$)",
               "word": "\\b", "not_word": "\\B"}


def _emit(node: Node, tail: bool) -> str:
    """RE2 text for ``node``; ``tail``: nothing can follow it in a match."""
    kind = node[0]
    if kind == "seq":
        items = node[1]
        return "".join(_emit(item, tail and i == len(items) - 1) for i, item in enumerate(items))
    if kind == "alt":
        return "(?:" + "|".join(_emit(branch, tail) for branch in node[1]) + ")"
    if kind == "repeat":
        _, child, low, high = node
        # A later iteration may follow a $ only where one iteration is enough (low <= 1).
        body = _emit(child, tail and low <= 1)
        bounds = f"{{{low},}}" if high is None else f"{{{low},{high}}}"
        return f"(?:{body}){bounds}"
    if kind == "text":
        _, char, folded = node
        escaped = _char(ord(char)) if not char.isalnum() else char
        return f"(?i:{escaped})" if folded and char.lower() != char.upper() else escaped
    if kind == "class":
        return str(node[1])
    if kind == "dot":
        return "(?s:.)" if node[1] else "[^\\n]"
    if node[1] == "dollar":
        # PCRE2's $ (and \Z): the end, or before a newline that ends the subject. Consuming that
        # newline is exact only where nothing follows; RE2 has no lookahead to do otherwise.
        if not tail:
            raise RegexError("a $ (or \\Z) with more pattern after it: PCRE2's 'end or before "
                             "a final newline' can only be spelled out at the end of the pattern "
                             "or of an alternative; use \\z for the very end")
        return "(?:\\n?\\z)"
    return _ASSERTIONS[node[1]]


def _consumes(node: Node) -> bool:
    """Whether every match of ``node`` is at least one character long."""
    kind = node[0]
    if kind in ("text", "class", "dot"):
        return True
    if kind == "repeat":
        return node[2] >= 1 and _consumes(node[1])
    if kind == "seq":
        return any(_consumes(item) for item in node[1])
    if kind == "alt":
        return all(_consumes(branch) for branch in node[1])
    return False


def _positions(node: Node) -> int:
    kind = node[0]
    if kind in ("seq", "alt"):
        return sum(_positions(child) for child in node[1])
    if kind == "repeat":
        _, child, low, high = node
        return _positions(child) * max(1, int(high if high is not None else low))
    return 0 if kind == "assert" else 1
