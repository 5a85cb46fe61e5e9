"""One selector grammar for hosts and VMs: labels, plus the fields every record has.

A selector is requirements separated by commas, all of which must hold (an empty selector selects
everything)::

    rack=3            label rack is 3 (== also works)
    tier!=db          label tier is not db, or the label is absent
    gpu               label gpu is present, with any value
    !gpu              label gpu is absent
    zone in (a,b)     label zone is a or b
    zone notin (a,b)  label zone is neither a nor b, or absent

The words ``name``, ``state``, ``host`` and ``group`` are fields, not labels: ``state=running``,
``host in (h1,h2)``, ``group=web``. A label that is called like a field is written ``label:state``.
Hosts have ``name`` (the host id, also ``host``) and ``state`` (online, offline, maintenance,
standby, fenced); VMs have ``name``, ``state``, ``host`` (empty when on none) and ``group``.

:func:`parse` reads a selector once; a bad one raises :class:`SelectorError`, whose message quotes
the selector with a caret under the offending character and says what was expected there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from controller.common.errors import Invalid

#: The fields a selector can name besides labels, by the kind of record it selects.
FIELDS: Mapping[str, frozenset[str]] = {
    "vm": frozenset({"name", "state", "host", "group"}),
    "host": frozenset({"name", "state", "host"}),
}
#: Keys and values: label keys' characters (protocols.vmspec.LABEL_PATTERN), and ':' for ``label:``.
_WORD = re.compile(r"[A-Za-z0-9._/:-]+")
_MAX_LENGTH = 4096

Op = Literal["exists", "absent", "eq", "ne", "in", "notin"]


class SelectorError(Invalid):
    """A selector that cannot be read, or names a field the records it selects do not have."""

    def __init__(self, text: str, position: int, problem: str) -> None:
        shown = text if len(text) <= 200 else text[:200] + "..."
        caret = " " * min(position, len(shown)) + "^"
        super().__init__(
            "invalid_selector",
            f"selector {text!r}: {problem} at character {position + 1}\n  {shown}\n  {caret}\n"
            "write requirements separated by commas: key=value, key!=value, key, !key, "
            "key in (a,b), key notin (a,b)",
            {"selector": text, "position": position},
        )
        self.position = position


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: Op
    values: frozenset[str] = frozenset()
    #: True for a field (name, state, host, group), False for a label.
    field: bool = False

    def holds(self, value: str | None) -> bool:
        """Whether a record whose ``key`` is ``value`` (None: no such label) meets this."""
        match self.op:
            case "exists":
                return value is not None
            case "absent":
                return value is None
            case "eq" | "in":
                return value is not None and value in self.values
            case _:
                return value is None or value not in self.values


@dataclass(frozen=True, slots=True)
class Selector:
    text: str
    requirements: tuple[Requirement, ...]

    def matches(self, fields: Mapping[str, str], labels: Mapping[str, str]) -> bool:
        return all(r.holds(fields.get(r.key) if r.field else labels.get(r.key)) for r in self.requirements)


EVERYTHING = Selector("", ())


def parse(text: str, kind: Literal["vm", "host"]) -> Selector:
    """Read ``text`` as a selector of ``kind`` records.

    Raises:
        SelectorError: the text is not a selector, or names a field ``kind`` records do not have.
    """
    if len(text) > _MAX_LENGTH:
        raise SelectorError(text, _MAX_LENGTH, f"longer than {_MAX_LENGTH} characters")
    reader = _Reader(text, kind)
    if not text.strip():
        return EVERYTHING
    requirements = [reader.requirement()]
    while not reader.at_end():
        reader.expect(",", "a ',' before the next requirement")
        requirements.append(reader.requirement())
    return Selector(text, tuple(requirements))


class _Reader:
    def __init__(self, text: str, kind: Literal["vm", "host"]) -> None:
        self.text, self.kind, self.pos = text, kind, 0

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def at_end(self) -> bool:
        self._skip()
        return self.pos >= len(self.text)

    def fail(self, problem: str) -> SelectorError:
        return SelectorError(self.text, self.pos, problem)

    def _found(self) -> str:
        return f"found {self.text[self.pos]!r}" if self.pos < len(self.text) else "found the end"

    def expect(self, token: str, what: str) -> None:
        self._skip()
        if not self.text.startswith(token, self.pos):
            raise self.fail(f"expected {what}, {self._found()}")
        self.pos += len(token)

    def word(self, what: str) -> str:
        self._skip()
        m = _WORD.match(self.text, self.pos)
        if m is None:
            raise self.fail(f"expected {what}, {self._found()}")
        self.pos = m.end()
        return m.group()

    def key(self) -> tuple[str, bool]:
        start = self.pos
        word = self.word("a label or field name")
        if word.startswith("label:"):
            label = word.removeprefix("label:")
            if not label or ":" in label:
                self.pos = start
                raise self.fail(f"{word!r} is not a label name")
            return label, False
        if ":" in word:
            self.pos = start
            raise self.fail(f"{word!r} is not a name (':' belongs only in label:NAME)")
        if word in FIELDS["vm"] | FIELDS["host"]:
            if word not in FIELDS[self.kind]:
                self.pos = start
                raise self.fail(
                    f"{self.kind}s have no field {word!r} (they have {', '.join(sorted(FIELDS[self.kind]))}); "
                    f"for a label of that name write label:{word}"
                )
            return word, True
        return word, False

    def requirement(self) -> Requirement:
        self._skip()
        if self.text.startswith("!", self.pos) and not self.text.startswith("!=", self.pos):
            self.pos += 1
            key, field = self.key()
            return Requirement(key, "absent", field=field)
        key, field = self.key()
        self._skip()
        rest = self.text[self.pos :]
        for token, op in (("==", "eq"), ("!=", "ne"), ("=", "eq")):
            if rest.startswith(token):
                self.pos += len(token)
                return Requirement(key, op, frozenset({self.word("a value")}), field)  # type: ignore[arg-type]
        m = re.match(r"(notin|in)(?=[ (])", rest)
        if m is not None:
            self.pos += m.end()
            self.expect("(", "'(' to open the list of values")
            values = {self.word("a value")}
            while True:
                self._skip()
                if self.text.startswith(")", self.pos):
                    self.pos += 1
                    break
                self.expect(",", "',' or ')' in the list of values")
                values.add(self.word("a value"))
            return Requirement(key, "in" if m.group(1) == "in" else "notin", frozenset(values), field)
        if self.at_end() or self.text.startswith(",", self.pos):
            return Requirement(key, "exists", field=field)
        raise self.fail(f"expected =, !=, in, notin, ',' or the end after {key!r}, {self._found()}")
