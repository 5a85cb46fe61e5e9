"""What a test needs from the machine, and what happens when it is missing: skip here, fail under CI.

A test that needs a tool (QEMU, Mosquitto, ipmi_sim), a Python package, a built guest, root or the
traces in ../shared/data says so with :func:`need`, :func:`need_module` or the :func:`needs` marker,
never with a bare ``pytest.skip``. On a developer's machine a missing requirement skips the test
with the reason and the fix. Under CI (``CI=true``), where ./scripts/test installs every package and
builds every guest, it fails the test instead: a green CI run cannot hide tests that never ran.

Only what the machine itself may lack stays a plain skip (an accessible /dev/kvm, say); such a skip
says why CI may lack it too.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

#: The marker :func:`needs` sets; tests/conftest.py registers it and checks it before each test.
MARKER = "needs"


def under_ci() -> bool:
    """Whether this run is CI's (``CI=true``), where nothing a test needs may be missing."""
    return os.environ.get("CI") == "true"


def missing(reason: str) -> NoReturn:
    """Skip with ``reason``, or under CI fail with it.

    Raises:
        pytest.fail.Exception: under CI.
        pytest.skip.Exception: otherwise (at module level too).
    """
    if under_ci():
        pytest.fail(
            f"{reason} [CI=true: a missing requirement fails the run instead of skipping it]", pytrace=False
        )
    pytest.skip(reason, allow_module_level=True)


def need(condition: object, reason: str) -> None:
    """Go on when ``condition`` holds; otherwise skip with ``reason`` (fail under CI).

    ``reason`` names what is missing and how to get it, e.g.
    ``"mosquitto is not installed (apt-get install -y mosquitto)"``.

    Raises:
        pytest.fail.Exception: under CI, when ``condition`` is false.
        pytest.skip.Exception: otherwise, when ``condition`` is false.
    """
    if not condition:
        missing(reason)


def need_module(name: str, reason: str) -> ModuleType:
    """Import ``name`` like ``pytest.importorskip``, but failing under CI when it is not installed.

    Raises:
        pytest.fail.Exception: under CI, when the import fails.
        pytest.skip.Exception: otherwise, when the import fails.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{reason} (import {name}: {exc})")


def needs(condition: object, reason: str) -> pytest.MarkDecorator:
    """A marker form of :func:`need`, for a test or a module's ``pytestmark``: checked before the test."""
    return getattr(pytest.mark, MARKER)(bool(condition), reason=reason)


def check_marks(item: pytest.Item) -> None:
    """Apply every :func:`needs` marker of ``item`` (called from tests/conftest.py before each test).

    Raises:
        pytest.fail.Exception: under CI, when a marker's condition is false.
        pytest.skip.Exception: otherwise, when a marker's condition is false.
    """
    for mark in item.iter_markers(MARKER):
        need(mark.args[0], mark.kwargs["reason"])
