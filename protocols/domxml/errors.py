"""The one error of domain XML import and export.

Both :mod:`protocols.domxml.reader` and :mod:`protocols.domxml.writer` raise it, so it lives apart
from either. It imports nothing of ours; protocols modules import nothing outside protocols.
"""

from __future__ import annotations

from collections.abc import Sequence


class DomainXmlError(ValueError):
    """A domain XML document Fleetvisor cannot import, or a spec it cannot export faithfully.

    ``problems`` lists each problem on its own, as ``"<where>: <reason>; <fix>"``; the message
    lists them all.
    """

    def __init__(self, heading: str, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        if len(self.problems) == 1:
            message = f"{heading}: {self.problems[0]}"
        else:
            listed = "\n".join(f"  - {problem}" for problem in self.problems)
            message = f"{heading} ({len(self.problems)} problems):\n{listed}"
        super().__init__(message)
