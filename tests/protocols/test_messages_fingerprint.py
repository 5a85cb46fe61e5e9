"""The wire schema fingerprint: any change to a bus message must be a deliberate one.

The fingerprint covers the JSON schema of every message (types, constraints, defaults, tags), the
order of every struct's fields (MessagePack ``array_like`` structs depend on it, and the evolution
rules forbid reordering), and WIRE_VERSION. Docstrings and descriptions are left out, so editing
documentation does not trip it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

from protocols import messages

# Last change: the VM-name rule widened to letters of either case, digits, ".", "_" and "-" (an
# agent of an earlier version refuses a define for such a name; every name it took still passes).
FINGERPRINT = "sha256:e97defc88b181404bb7a4ba7066dfbd322da0ad1dd24d9ffe8400cdfd0fe7689"

_DOC_KEYS = frozenset({"title", "description"})


def _without_docs(node: Any, *, in_properties: bool = False) -> Any:
    """Drop documentation keys (but not properties that happen to be named like them)."""
    if isinstance(node, dict):
        return {
            key: _without_docs(value, in_properties=key == "properties" and not in_properties)
            for key, value in node.items()
            if in_properties or key not in _DOC_KEYS or not isinstance(value, str)
        }
    if isinstance(node, list):
        return [_without_docs(value) for value in node]
    return node


def _field_orders(types: tuple[type[msgspec.Struct], ...]) -> dict[str, list[str]]:
    """Every reachable struct's wire field names, in order."""
    orders: dict[str, list[str]] = {}
    seen: set[int] = set()

    def walk(info: msgspec.inspect.Type) -> None:
        if id(info) in seen:
            return
        seen.add(id(info))
        if isinstance(info, msgspec.inspect.StructType):
            orders[info.cls.__qualname__] = [f.encode_name for f in info.fields]
            for f in info.fields:
                walk(f.type)
            return
        for attr in ("item_type", "key_type", "value_type", "item_types", "types"):
            child = getattr(info, attr, None)
            if isinstance(child, tuple):
                for c in child:
                    walk(c)
            elif child is not None:
                walk(child)

    for t in msgspec.inspect.multi_type_info(types):
        walk(t)
    return dict(sorted(orders.items()))


def wire_description() -> dict[str, Any]:
    schemas, components = msgspec.json.schema_components(messages.ALL_MESSAGES)
    return {
        "wire_version": messages.WIRE_VERSION,
        "messages": _without_docs(list(schemas)),
        "components": _without_docs(components),
        "field_order": _field_orders(messages.ALL_MESSAGES),
    }


def fingerprint() -> str:
    canonical = json.dumps(wire_description(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def test_wire_schema_matches_the_recorded_fingerprint() -> None:
    """Pins the wire schema of every bus message (and WIRE_VERSION) to FINGERPRINT."""
    current = fingerprint()
    assert current == FINGERPRINT, (
        "the wire schema changed; if deliberate, follow the evolution rules in protocols/messages.py "
        f"and update FINGERPRINT to {current}\n"
        "(rules: a new field gets a default and goes last; never retype, rename or reorder a field; "
        "a breaking change moves to fv/v2 and bumps WIRE_VERSION)"
    )


def test_fingerprint_ignores_documentation_but_sees_field_order() -> None:
    """Pins that docs are not fingerprinted while field order is (so reordering is caught)."""
    description = wire_description()
    assert "description" not in json.dumps(description["components"]["HostState"])
    assert description["field_order"]["VmTelemetry"] == ["name", "cpu_util", "dirty_mib_s", "memory_mib"]
    assert description["field_order"]["HostState"][:2] == ["host_id", "online"]
