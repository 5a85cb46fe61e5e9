"""The body of ``vm create``: a spec file (YAML or JSON) or libvirt domain XML, then flags over it.

``build_spec`` validates the spec part locally, against ``protocols.vmspec``, so a typo fails before
any request. It imports ``protocols`` and ``controller.cli.exits``, nothing else of ours.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import msgspec

from controller.cli.exits import CliError
from protocols.vmspec import VmSpecInput, explain_validation_error

#: ``vm create`` flag (argparse dest) -> spec field it sets.
_SPEC_FLAGS = (
    ("vcpus", "vcpus"),
    ("memory", "memory_mib"),
    ("disk", "disk_gib"),
    ("arch", "arch"),
    ("ha_priority", "ha_priority"),
)
#: repeatable ``vm create`` flag (argparse dest) -> scheduling field, a list.
_SCHEDULING_LISTS = (("host", "hosts"), ("avoid_host", "avoid_hosts"), ("feature", "required_features"))


def _load_spec_file(path: str) -> dict[str, Any]:
    file = pathlib.Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read spec file {path!r}: {exc.strerror}") from None
    try:
        data = msgspec.yaml.decode(raw) if file.suffix in (".yaml", ".yml") else msgspec.json.decode(raw)
    except (msgspec.DecodeError, ImportError) as exc:
        raise CliError(
            f"spec file {path!r} is not valid {'YAML' if file.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise CliError(
            f"spec file {path!r} must hold one object (a mapping of fields), not {type(data).__name__}"
        )
    return data


def _load_domain_xml(path: str) -> dict[str, Any]:
    from protocols import domxml  # only --xml needs it (40 ms of imports every command would pay)

    try:
        text = pathlib.Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read domain XML {path!r}: {exc}") from None
    try:
        spec = domxml.spec_from_xml(text)
    except domxml.DomainXmlError as exc:
        raise CliError(f"domain XML {path!r}: {exc}") from None
    body: dict[str, Any] = msgspec.to_builtins(spec)
    return body


def _base_body(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``--file`` or ``--xml``, or none."""
    if args.file and args.xml:
        raise CliError("vm create: give either --file or --xml, not both")
    body: dict[str, Any] = _load_spec_file(args.file) if args.file else {}
    if args.xml:
        body = _load_domain_xml(args.xml)
    return body


def _apply_spec_flags(body: dict[str, Any], args: argparse.Namespace) -> None:
    """Set the spec fields the flags give, over those of the file."""
    if args.name:
        body["name"] = args.name
    if args.ha:
        body["ha"] = True
    for flag, key in _SPEC_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            body[key] = value
    if args.label:
        labels = dict(body.get("labels") or {})
        for item in args.label:
            key, sep, value = item.partition("=")
            if not sep:
                raise CliError(f"--label {item!r}: write it as KEY=VALUE, e.g. --label zone=a")
            labels[key] = value
        body["labels"] = labels


def _scheduling(scheduling: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The file's scheduling hints with the flags' over them."""
    if args.group:
        scheduling["group"] = args.group
    if args.group_policy:
        scheduling["group_policy"] = args.group_policy
    for item in args.require or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--require {item!r}: write it as KEY=VALUE, e.g. --require zone=a")
        scheduling.setdefault("require", {})[key] = value
    for flag, key in _SCHEDULING_LISTS:
        if getattr(args, flag):
            scheduling[key] = list(getattr(args, flag))
    if args.policy:
        scheduling["policy"] = args.policy
    if getattr(args, "start_on", None):
        scheduling["start_on"] = args.start_on
    return scheduling


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The create body from a spec file and/or flags (flags win), validated locally first.

    Raises ``CliError`` naming the file, flag or field at fault.
    """
    body = _base_body(args)
    _apply_spec_flags(body, args)
    if "name" not in body:
        raise CliError("vm create: give the VM a name (positional NAME or `name:` in --file)")
    scheduling = _scheduling(dict(body.pop("scheduling", None) or {}), args)
    if scheduling:
        body["scheduling"] = scheduling
    if args.count != 1:
        body["count"] = args.count
    spec_only = {k: v for k, v in body.items() if k not in ("scheduling", "count")}
    try:
        msgspec.convert(spec_only, VmSpecInput)
    except msgspec.ValidationError as exc:
        raise CliError(f"vm spec: {_in_flags(explain_validation_error(exc), args)}") from None
    return body


def _in_flags(text: str, args: argparse.Namespace) -> str:
    """``text`` naming the flag the user typed (``--memory``) where it names the field (``$.memory_mib``)."""
    given = [
        (f"--{flag.replace('_', '-')}", key) for flag, key in _SPEC_FLAGS if getattr(args, flag) is not None
    ]
    if args.label:
        given.append(("--label", "labels"))
    if args.name:
        given.append(("NAME", "name"))
    for flag, key in given:
        text = text.replace(f"`$.{key}`", flag).replace(f"`$.{key}.", f"{flag} `")
    return text
