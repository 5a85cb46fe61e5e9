"""Text from a peer or a user, made safe to put on one line of a log or a terminal.

A host's event reason, an engine's error or a VM's label is whatever its sender wrote. Written
as is, a newline starts a forged log line, a carriage return overwrites the line on a terminal,
ESC starts an ANSI sequence that colours, moves or clears it, and a bidi override reorders what the
reader sees. :func:`printable` writes every such character as a visible escape instead, so the text
shows on one line as what it is. Store and transmit the original; escape where it is shown.
"""

from __future__ import annotations

import unicodedata
from typing import Final

_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

#: Unicode categories escaped: controls (C0, DEL, C1), format characters (bidi embeddings,
#: overrides and isolates, zero-width characters), line and paragraph separators (U+2028, U+2029),
#: surrogates (undecodable bytes) and unassigned code points.
_ESCAPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"})


def printable(text: str) -> str:
    r"""``text`` with every control, format and separator character as a visible escape.

    ``\n``, ``\r`` and ``\t`` keep their usual spelling; others read ``\x1b``, ``\u202e`` or
    ``\U000e0001``. The result holds none of them, so it is one line and cannot steer a terminal,
    and applying the function again changes nothing.
    """
    if text.isprintable():
        return text
    return "".join(_escape(ch) for ch in text)


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    if unicodedata.category(ch) not in _ESCAPED_CATEGORIES:
        return ch
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
