"""``fleetvisor vm import-check DIR|FILE...``: would these libvirt domain XML files import?

It needs no controller: it runs the importer (:func:`protocols.domxml.spec_from_xml`) on each file
and prints, per file, ``imported`` with what the VM would be, or ``refused`` with every problem and
its fix, or ``crashed`` (a defect of the importer: the traceback's last line, to report). A
directory is searched for ``*.xml`` files, recursively, in name order. The last line counts them:
``domxml_files=N imported=I refused=R crashed=C``. Exit status: 0 when every file imports, 1 when
any is refused or crashed, 2 when a path cannot be read.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from controller.cli.exits import CliError
from controller.cli.render import gib
from protocols.text import printable


def files_of(paths: list[str]) -> list[pathlib.Path]:
    """The XML files ``paths`` name; raises ``CliError`` for a path that does not exist."""
    found: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.xml") if p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise CliError(
                f"import-check: {raw!r} is not a file or a directory; give XML files or a folder of them", 2
            )
    return found


def cmd_vm_import_check(_client: object, args: argparse.Namespace) -> int:
    """``vm import-check``: import each file locally and report; changes nothing anywhere."""
    from protocols import domxml  # only this command and --xml need it

    counts = {"imported": 0, "refused": 0, "crashed": 0}
    files = files_of(args.paths)
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            counts["refused"] += 1
            print(printable(f"refused  {path}: cannot read it as text ({exc})"))
            continue
        try:
            spec = domxml.spec_from_xml(text)
        except domxml.DomainXmlError as exc:
            counts["refused"] += 1
            print(printable(f"refused  {path}: {len(exc.problems)} problem(s)"))
            if not args.quiet:
                for problem in exc.problems:
                    print(printable(f"    - {problem}"))
            continue
        except Exception as exc:  # noqa: BLE001 (a defect of the importer: counted and shown, never hidden)
            counts["crashed"] += 1
            print(printable(f"crashed  {path}: {type(exc).__name__}: {exc}"), file=sys.stderr)
            continue
        counts["imported"] += 1
        disks = len(spec.disks)
        print(printable(f"imported {path}: vm {spec.name} ({spec.vcpus} vCPU, {gib(spec.memory_mib)}, "
                        f"{disks} disk{'s' if disks != 1 else ''}, {spec.arch})"))  # fmt: skip
    print(
        f"domxml_files={len(files)} imported={counts['imported']} refused={counts['refused']} "
        f"crashed={counts['crashed']}"
    )
    return 0 if counts["imported"] == len(files) else 1
