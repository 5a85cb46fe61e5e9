"""The generic checks of domain XML import, shared by every element handler of the reader.

:class:`Checks` records each problem it finds as ``"<where>: <reason>; <fix>"``: attributes and
children the vocabulary does not accept, missing required parts, values a spec field refuses.
:class:`Node` is an element with the path messages name it by. Only
:mod:`protocols.domxml.reader` uses this module. It imports only the stdlib, msgspec and protocols
modules; protocols imports nothing of ours outside protocols.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from protocols import vmspec
from protocols.domxml import vocabulary
from protocols.domxml.vocabulary import FLEETVISOR_NS, FLEETVISOR_PREFIX, Rules

#: The prefix of Fleetvisor's element names in the vocabulary and in messages.
FV_PREFIX: Final = f"{FLEETVISOR_PREFIX}:"
_CLARK_PREFIX: Final = f"{{{FLEETVISOR_NS}}}"
_WHOLE_NUMBER_RE: Final = re.compile(r"[0-9]{1,24}")
_NO_RULES: Final[Rules] = {}
#: The spec data being collected, as plain values for msgspec to convert.
Data = dict[str, Any]


def clark(name: str) -> str:
    """The ElementTree name of a vocabulary name: ``fleetvisor:vm`` → ``{ns}vm``, others unchanged."""
    return f"{_CLARK_PREFIX}{name[len(FV_PREFIX) :]}" if name.startswith(FV_PREFIX) else name


def readable(tag: str) -> str:
    """An element or attribute name as a person reads it: ``fleetvisor:vm``, or ``{ns}x`` for others."""
    return f"{FV_PREFIX}{tag[len(_CLARK_PREFIX) :]}" if tag.startswith(_CLARK_PREFIX) else tag


def shown(value: str) -> str:
    """A value quoted for a message, shortened when long."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


def rule_at(path: str) -> vocabulary.Element:
    """The vocabulary row of the element at ``path`` (``/domain/devices/disk``)."""
    return vocabulary.BY_PATH[path]


@dataclass(frozen=True)
class Node:
    """An element with its path for messages, e.g. ``/domain/devices/disk[2]``."""

    el: ET.Element
    path: str

    @property
    def tag(self) -> str:
        """The ElementTree tag (``{ns}vm`` for Fleetvisor's elements)."""
        return self.el.tag

    @property
    def name(self) -> str:
        """The tag as the vocabulary spells it (``fleetvisor:vm``)."""
        return readable(self.el.tag)

    def attr_path(self, name: str) -> str:
        """Where an attribute is, with its value, e.g. ``/domain/devices/disk[2]/@type='block'``."""
        return f"{self.path}/@{readable(name)}={shown(self.el.attrib[name])}"


class Invalid:
    """Marks a value that failed its check; the problem is already recorded."""


INVALID: Final = Invalid()


@dataclass
class Checks:
    """The generic checks every element handler uses; each problem found is recorded."""

    problems: list[str] = field(default_factory=list)

    def problem(self, where: str, reason: str, fix: str) -> None:
        """Record a problem as ``"<where>: <reason>; <fix>"``."""
        self.problems.append(f"{where}: {reason}; {fix}")

    def missing(self, node: Node, what: str, fix: str, because: str = "") -> None:
        """Record that ``node`` lacks ``what``."""
        self.problem(node.path, f"{what} is missing{because}", fix)

    def attributes(
        self, node: Node, rules: Rules = _NO_RULES, required: Iterable[str] = ()
    ) -> dict[str, str]:
        """The accepted attributes of ``node``; every other one is a problem."""
        accepted: dict[str, str] = {}
        for name, value in node.el.attrib.items():
            if name not in rules:
                self.problem(node.attr_path(name), "not supported", "remove it")
                continue
            choices = rules[name]
            if choices is not None and value not in choices:
                default_fix = "use " + " or ".join(f"{name}={choice!r}" for choice in choices)
                fix = vocabulary.VALUE_FIXES.get((node.name, name), default_fix)
                self.problem(node.attr_path(name), "not supported", fix)
                continue
            accepted[name] = value
        self.required_attributes(node, rules, required)
        return accepted

    def required_attributes(self, node: Node, rules: Rules, required: Iterable[str]) -> None:
        """A problem for each attribute in ``required`` that ``node`` lacks, with an example value."""
        for name in required:
            if name not in node.el.attrib:
                example = (rules.get(name) or [vocabulary.EXAMPLES.get((node.name, name), "...")])[0]
                self.missing(node, f"attribute {name!r}", f"add {name}={example!r}")

    def children(
        self,
        node: Node,
        allowed: Iterable[str] = (),
        *,
        repeatable: Iterable[str] = (),
        unknown_fix: str | None = None,
    ) -> list[Node]:
        """The accepted child elements of an element that holds elements only (vocabulary names)."""
        allowed, repeatable = {clark(name) for name in allowed}, {clark(name) for name in repeatable}
        stray = [piece.strip() for piece in [node.el.text or "", *(child.tail or "" for child in node.el)]]
        if any(stray):
            self.problem(
                node.path, f"unexpected text {shown(next(s for s in stray if s))}", "remove the text"
            )
        counts = Counter(child.tag for child in node.el)
        seen: Counter[str] = Counter()
        accepted: list[Node] = []
        for child in node.el:
            seen[child.tag] += 1
            index = f"[{seen[child.tag]}]" if counts[child.tag] > 1 else ""
            child_node = Node(child, f"{node.path}/{readable(child.tag)}{index}")
            if child.tag not in allowed:
                fix = unknown_fix or vocabulary.ELEMENT_FIXES.get(child.tag, "remove it")
                self.problem(child_node.path, "not supported", fix)
            elif seen[child.tag] > 1 and child.tag not in repeatable:
                self.problem(
                    child_node.path,
                    f"<{child_node.name}> may appear only once here",
                    "remove the extra one",
                )
            else:
                accepted.append(child_node)
        return accepted

    def contents(self, node: Node, rule: vocabulary.Element, without: Iterable[str] = ()) -> list[Node]:
        """The accepted children of ``node`` by ``rule``, less the names in ``without``."""
        allowed = [name for name in rule.children if name not in set(without)]
        return self.children(node, allowed, repeatable=rule.repeatable, unknown_fix=rule.unknown_fix)

    def parts(self, node: Node, rule: vocabulary.Element, without: Iterable[str] = ()) -> dict[str, Node]:
        """Like :meth:`contents`, for children that may each appear once: by vocabulary name."""
        return {child.name: child for child in self.contents(node, rule, without)}

    def part(self, parent: Node, found: Mapping[str, Node], path: str) -> Node | None:
        """The child at vocabulary ``path`` if present; if not, a problem when the vocabulary needs it."""
        name = path.rsplit("/", 1)[1]
        if name in found:
            return found[name]
        rule = rule_at(path)
        if rule.missing_fix:
            self.missing(parent, f"<{name}>", rule.missing_fix, because=rule.missing_because)
        return None

    def empty(self, node: Node, rule: vocabulary.Element) -> dict[str, str]:
        """The accepted attributes of an element that must have no content."""
        self.children(node)
        return self.attributes(node, rule.attributes, rule.required)

    def leaf(self, node: Node, rule: vocabulary.Element) -> str:
        """The text of an element that holds text only ("" when empty); attributes per ``rule``."""
        self.attributes(node, rule.attributes)
        for child in node.el:
            self.problem(f"{node.path}/{readable(child.tag)}", "not supported", "remove it")
        return node.el.text or ""

    def checked(self, where: str, value: Any, annotation: Any) -> Any:
        """``value`` converted to a spec field's type, or :data:`INVALID` with the problem recorded."""
        if isinstance(value, Invalid):
            return value
        try:
            return msgspec.convert(value, annotation)
        except msgspec.ValidationError as exc:
            reason = re.sub(r" - at `[^`]*`$", "", vmspec.explain_validation_error(exc))
            self.problems.append(f"{where}: invalid value: {reason}")
            return INVALID

    def whole_number(self, where: str, text: str, what: str) -> int | Invalid:
        """``text`` as a whole number, or :data:`INVALID` with the problem recorded."""
        if not _WHOLE_NUMBER_RE.fullmatch(text.strip()):
            self.problem(where, f"{shown(text)} is not a whole number", f"write {what} in digits")
            return INVALID
        return int(text.strip())

    @staticmethod
    def store(data: Data, key: str, value: Any) -> None:
        """Set ``data[key]`` unless ``value`` is :data:`INVALID`."""
        if not isinstance(value, Invalid):
            data[key] = value
