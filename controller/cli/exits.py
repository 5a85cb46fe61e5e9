"""The CLI's exit statuses, and ``CliError``: a failure phrased for the person at the terminal.

The controller's own refusals arrive as :class:`controller.client.ApiError` (the same errors a
script gets) and are printed as they are; ``CliError`` is for what the CLI itself refuses (a
missing argument, a bad ``--label``).
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3
#: After Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to print for the operator as it is; ``exit_code`` is the process's exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code
