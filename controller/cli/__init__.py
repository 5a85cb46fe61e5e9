"""The operator's side of the ``fleetvisor`` CLI: ``vm ...``, ``host ...`` and the rest, over the REST API.

It finds the controller with ``--url``, then ``FLEETVISOR_URL``, then ``http://127.0.0.1:8080``.
Output is a table for people and ``--json`` for scripts. Errors come from the controller already
phrased for people; the CLI prints them as they are and exits non-zero.

The package calls the controller only through the client library (:mod:`controller.client`): it
has no HTTP code of its own, and imports nothing else of ``controller`` (import-linter contracts).
Modules: ``exits`` (exit statuses, ``CliError``), ``render`` (tables and
shared output), one per command group (``hosts``, ``vms``, ``migrate``, ``power``, ``admin``),
``bulk`` (``-l SELECTOR`` on the lifecycle and host commands), ``rolling`` (``host
rolling-maintenance``, ``op continue``), ``spec`` (the ``vm create`` body) and ``parser`` (argparse
registration and running a command: Ctrl-C and a broken pipe end without a traceback).
This module re-exports what ``fleetvisor.py`` and the tests use.
"""

from __future__ import annotations

from controller.cli.exits import EXIT_FAILED, EXIT_UNREACHABLE, CliError
from controller.cli.parser import (
    OPERATOR_COMMANDS,
    add_global_flags,
    add_operator_commands,
    is_operator_command,
    operator_parser,
    run_operator_command,
)
from controller.cli.spec import build_spec

__all__ = [
    "EXIT_FAILED",
    "EXIT_UNREACHABLE",
    "OPERATOR_COMMANDS",
    "CliError",
    "add_global_flags",
    "add_operator_commands",
    "build_spec",
    "is_operator_command",
    "operator_parser",
    "run_operator_command",
]
