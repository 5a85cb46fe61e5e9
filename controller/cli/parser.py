"""The argparse registration of the operator commands, and the running of a parsed one.

``add_operator_commands`` adds ``vm``, ``host``, ``plan``, ``power``, ``op``, ``token``, ``audit`` and
``events`` to the top-level parser of ``fleetvisor.py``; each command sets ``handler`` to its
``cmd_*`` function. ``run_operator_command`` builds the :class:`controller.client.Client` and turns
an ``ApiError`` (the controller's refusal, as a script gets it) or a ``CliError`` into a message and
an exit code. It imports only ``controller.cli``, ``controller.client`` and ``protocols`` of ours.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Sequence
from typing import Any, TypeAlias

from controller.cli import admin, bulk, hosts, importcheck, migrate, power, rolling, vms
from controller.cli.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_UNREACHABLE, CliError
from controller.client import DEFAULT_URL, ApiError, Client, Unreachable

#: After the reader of stdout went away (128 + SIGPIPE), as shells report a tool killed by it.
EXIT_BROKEN_PIPE = 141

OPERATOR_COMMANDS: Sequence[str] = ("vm", "host", "op", "events", "token", "audit", "plan", "power")

#: The object ``add_subparsers`` returns (generic only for type checkers).
_SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


#: -l/--selector of the list commands (the grammar: docs/selectors.md).
_SELECTOR_HELP = (
    "only those that match: rack=3, tier!=db, gpu, !gpu, 'zone in (a,b)', state=running, host=h1, "
    "group=web; requirements separated by commas"
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=None, help=f"controller URL (env FLEETVISOR_URL, default {DEFAULT_URL})"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--token", default=None, help="API bearer token (env FLEETVISOR_TOKEN)")
    parser.add_argument(
        "--ca-file", default=None, help="CA certificate for an https:// controller (env FLEETVISOR_CA)"
    )


def _waiting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", action="store_true", help="return at once; the operation goes on")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the operation (default 120)"
    )


def _policy_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("migration policy")
    g.add_argument(
        "--bandwidth", type=float, default=1024.0, metavar="MIB_S", help="link share, MiB/s (default 1024)"
    )
    g.add_argument(
        "--max-downtime", type=int, default=300, metavar="MS", help="allowed downtime at first (default 300)"
    )
    g.add_argument(
        "--downtime-ceiling",
        type=int,
        default=None,
        metavar="MS",
        help="the most the downtime may be raised to (default 2000)",
    )
    g.add_argument("--no-auto-converge", action="store_true", help="never throttle the guest's vCPUs")
    g.add_argument("--xbzrle", action="store_true", help="send deltas of re-dirtied pages")
    g.add_argument("--multifd", type=int, default=0, metavar="N", help="send over N parallel channels")
    g.add_argument(
        "--postcopy",
        action="store_true",
        help="allow post-copy as the last resort. It always converges but CANNOT be rolled back: "
        "a network or host failure during post-copy loses the VM",
    )
    g.add_argument(
        "--copy-storage", action="store_true", help="copy local disks over NBD (else storage must be shared)"
    )


def _add_vm_create(vm: _SubParsers) -> None:
    p = vm.add_parser("create", help="create a VM: the controller places it, then it starts")
    p.add_argument("name", nargs="?", help="VM name (letters, digits, '.', '_', '-'; e.g. fedora-38)")
    p.add_argument("-f", "--file", help="spec file, YAML or JSON; flags override its fields")
    p.add_argument("--xml", metavar="FILE", help="libvirt domain XML to import; flags override its fields")
    p.add_argument("--vcpus", type=int)
    p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB")
    p.add_argument("--disk", type=int, metavar="GIB", help="disk in GiB")
    p.add_argument("--arch", help="guest architecture (default x86_64)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--no-start", action="store_true", help="define it but leave it stopped")
    p.add_argument("--ha", action="store_true", help="restart it elsewhere if its host fails (after fencing)")
    p.add_argument("--ha-priority", type=int, help="HA restart order, 0-1000, higher first")
    p.add_argument("--count", type=int, default=1, help="create N VMs named NAME-1..N, planned as a whole")
    p.add_argument("--group", help="server group the VM(s) join")
    p.add_argument(
        "--group-policy",
        choices=("anti-affinity", "affinity", "soft-anti-affinity", "soft-affinity"),
        help="how the group's members relate (default anti-affinity when --group is given)",
    )
    p.add_argument("--anti-affinity", dest="group_policy", action="store_const", const="anti-affinity")
    p.add_argument("--affinity", dest="group_policy", action="store_const", const="affinity")
    p.add_argument("--require", action="append", metavar="KEY=VALUE", help="host label the host must carry")
    p.add_argument(
        "--host",
        action="append",
        metavar="HOST",
        help="only these hosts may take it, now and at every later move (repeatable)",
    )
    p.add_argument(
        "--start-on",
        metavar="HOST",
        help="start it on this host; later moves may take it wherever its rules allow",
    )
    p.add_argument("--avoid-host", action="append", metavar="HOST", help="never these hosts (repeatable)")
    p.add_argument("--feature", action="append", metavar="FLAG", help="required host CPU feature, e.g. vmx")
    p.add_argument(
        "--policy", choices=("pack", "spread", "power-saving", "best-fit"), help="placement policy"
    )
    p.add_argument("--explain", action="store_true", help="show why the scheduler chose the host")
    p.add_argument("--dry-run", action="store_true", help="show where it would go, and why; create nothing")
    _common(p)
    _waiting(p)
    p.set_defaults(handler=vms.cmd_vm_create)


def _add_vm_lifecycle(vm: _SubParsers) -> None:
    p = vm.add_parser("list", help="list VMs")
    p.add_argument("--host", help="only VMs on this host")
    p.add_argument("-l", "--selector", default="", help=_SELECTOR_HELP)
    _common(p)
    p.set_defaults(handler=vms.cmd_vm_list)

    for name, handler, text in (
        ("show", vms.cmd_vm_show, "show one VM"),
        ("start", vms.cmd_vm_start, "start a stopped VM"),
        ("stop", vms.cmd_vm_stop, "stop a VM (ACPI shutdown; --force powers it off at once)"),
        ("pause", vms.cmd_vm_action("pause"), "pause a VM (its vCPUs stop; memory stays)"),
        ("resume", vms.cmd_vm_action("resume"), "resume a paused VM"),
        ("reboot", vms.cmd_vm_action("reboot"), "reset a running VM"),
        ("delete", vms.cmd_vm_delete, "delete a VM (stops it first)"),
    ):
        p = vm.add_parser(name, help=text)
        _common(p)
        if name == "show":
            p.add_argument("name")
        else:
            p.add_argument("name", nargs="?", default="")
            bulk.add_arguments(p)
            _waiting(p)
            handler = bulk.single_or_bulk(name, handler)
        if name == "stop":
            p.add_argument(
                "--force", action="store_true", help="power off at once instead of asking the guest"
            )
        p.set_defaults(handler=handler)


def _add_vm_migrate(vm: _SubParsers) -> None:
    p = vm.add_parser(
        "migrate",
        help="live-migrate a running VM to another host (waits with a progress bar)",
        description="Live-migrate a running VM. Pre-copy first; when the guest dirties memory faster "
        "than the link carries it, the allowed downtime is raised, then auto-converge throttles the "
        "guest, then (only with --postcopy) the migration switches to post-copy, else it aborts and "
        "the VM stays on its source. WARNING: post-copy cannot be rolled back; if the network or "
        "either host fails during post-copy, the VM is lost.",
    )
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--to", default=None, metavar="HOST", help="target host (default: the scheduler chooses)")
    bulk.add_arguments(p, max_parallel=2, dry_run=False)  # --dry-run is its own, below
    p.add_argument(
        "--dry-run", action="store_true", help="predict time, downtime and convergence; move nothing"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="override the VM's placement rules (group, labels, pins); needs --reason, which is recorded",
    )
    p.add_argument("--reason", default="", metavar="TEXT", help="why the rules are overridden (with --force)")
    _policy_args(p)
    _common(p)
    _waiting(p)
    p.set_defaults(handler=migrate.cmd_vm_migrate, timeout=3600.0)
    p = vm.add_parser("migrate-cancel", help="cancel a VM's migration before the switch-over")
    p.add_argument("name")
    _common(p)
    _waiting(p)
    p.set_defaults(handler=migrate.cmd_vm_migrate_cancel)


def _add_vm_commands(sub: _SubParsers) -> None:
    vm = sub.add_parser("vm", help="create, inspect and control VMs").add_subparsers(
        dest="action", required=True
    )
    _add_vm_create(vm)
    _add_vm_lifecycle(vm)
    _add_vm_migrate(vm)
    _add_label(vm, "vm", vms.cmd_vm_label, example="tier=web", max_parallel=10, dry_run=True)
    p = vm.add_parser(
        "import-check",
        help="would these libvirt domain XML files import? (no controller needed; changes nothing)",
    )
    p.add_argument("paths", nargs="+", metavar="DIR|FILE", help="XML files, or folders searched for *.xml")
    p.add_argument("-q", "--quiet", action="store_true", help="one line per file, without each problem")
    p.set_defaults(handler=importcheck.cmd_vm_import_check, url=None, token=None, ca_file=None)
    p = vm.add_parser("dumpxml", help="print a VM's spec as libvirt domain XML")
    p.add_argument("name")
    _common(p)
    p.set_defaults(handler=vms.cmd_vm_dumpxml)


def _add_label(
    sub: _SubParsers, what: str, handler: Any, *, example: str, max_parallel: int, dry_run: bool
) -> None:
    """``vm label`` or ``host label``: one by name, or every match of ``-l`` as one bulk action."""
    name = "NAME" if what == "vm" else "HOST"
    p = sub.add_parser(
        "label",
        help=f"set (KEY=VALUE) or remove (KEY-) labels of a {what}; -l SELECTOR for many",
        usage=f"fleetvisor {what} label ({name} | -l SELECTOR) KEY=VALUE|KEY- ... [options]",
    )
    p.add_argument("words", nargs="+", metavar=f"{name} KEY=VALUE|KEY-")
    p.add_argument("-l", "--selector", default="", help=f"every {what} that matches, e.g. {example}")
    p.add_argument(
        "--max-parallel", type=int, default=max_parallel,
        help=f"with -l: {what}s changed at once (default {max_parallel})",
    )  # fmt: skip
    if dry_run:
        p.add_argument(
            "--dry-run", action="store_true", help=f"with -l: list the {what}s it picks; change nothing"
        )
    _common(p)
    _waiting(p)
    p.set_defaults(handler=handler, timeout=600.0, stop_after=0, **({} if dry_run else {"dry_run": False}))


def _add_host_commands(sub: _SubParsers) -> None:
    host = sub.add_parser("host", help="inspect hosts").add_subparsers(dest="action", required=True)
    p = host.add_parser("list", help="list hosts with their capacity and load")
    p.add_argument("--pending", action="store_true", help="list the hosts waiting to be accepted instead")
    p.add_argument("-l", "--selector", default="", help=_SELECTOR_HELP)
    _common(p)
    p.set_defaults(handler=hosts.cmd_host_list)
    p = host.add_parser("show", help="show one host's capabilities and load")
    p.add_argument("host")
    _common(p)
    p.set_defaults(handler=hosts.cmd_host_show)
    p = host.add_parser(
        "maintenance",
        help="put a host in maintenance (no new placements) or take it out; -l SELECTOR for many",
        usage="fleetvisor host maintenance (HOST | -l SELECTOR) on|off [options]",
    )
    p.add_argument("words", nargs="+", metavar="HOST on|off")
    p.add_argument("-l", "--selector", default="", help="every host that matches, e.g. rack=3 (flags only)")
    p.add_argument("--max-parallel", type=int, default=5, help="with -l: hosts changed at once (default 5)")
    p.add_argument("--no-evacuate", action="store_true", help="with on: leave running VMs where they are")
    p.add_argument(
        "--force",
        action="store_true",
        help="with on: drain it even if it is the last host that can hold HA VMs",
    )
    _policy_args(p)
    _common(p)
    _waiting(p)
    p.set_defaults(handler=hosts.cmd_host_maintenance, timeout=3600.0)
    p = host.add_parser("evacuate", help="live-migrate every running VM off a host, in waves")
    p.add_argument("host")
    _policy_args(p)
    _common(p)
    _waiting(p)
    p.set_defaults(handler=migrate.cmd_host_evacuate, timeout=3600.0)
    p = rolling.add_arguments(host)
    _common(p)
    p.set_defaults(handler=rolling.cmd_host_rolling)
    p = host.add_parser(
        "confirm-down",
        help="tell the controller you made sure a host is off (admin): HA restarts its HA VMs elsewhere",
    )
    p.add_argument("host")
    _common(p)
    p.set_defaults(handler=hosts.cmd_host_confirm_down)
    p = host.add_parser(
        "forget", help="remove a host that is gone for good (or a pending one), and its VMs' records (admin)"
    )
    p.add_argument("host")
    _common(p)
    p.set_defaults(handler=hosts.cmd_host_forget)
    p = host.add_parser("accept", help="accept a pending host into the fleet (admin)")
    p.add_argument("host")
    _common(p)
    p.set_defaults(handler=hosts.cmd_host_accept)
    p = host.add_parser(
        "join-token", help="create a one-time token that enrols a new host (`agent --join-token`) (admin)"
    )
    p.add_argument("--host", default="", help="the host id it enrols (default: any new host id)")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds it stays valid (default 3600)")
    _common(p)
    p.set_defaults(handler=hosts.cmd_host_join_token)
    _add_host_selector_commands(host)


def _add_host_selector_commands(host: _SubParsers) -> None:
    """``host label`` and ``host power``: one host, or every host a selector picks (a bulk action)."""
    _add_label(host, "host", hosts.cmd_host_label, example="rack=3", max_parallel=5, dry_run=False)
    p = host.add_parser(
        "power",
        help="a host's power: status (and whether its wake path verifies), on, or off (standby; it must be empty)",
    )
    p.add_argument("words", nargs="+", metavar="HOST on|off|status")
    p.add_argument("-l", "--selector", default="", help="every host that matches, e.g. rack=3 (on or off)")
    p.add_argument("--max-parallel", type=int, default=2, help="with -l: hosts powered at once (default 2)")
    _common(p)
    _waiting(p)
    p.set_defaults(handler=power.cmd_host_power, timeout=1800.0, stop_after=0, dry_run=False)


def _add_power_commands(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "plan", help="the power manager's recommendation, each move and power action with its reason"
    )
    p.add_argument(
        "--apply", action="store_true", help="execute it once (automation levels manual and recommend)"
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait for --apply to finish (default 3600)"
    )
    _common(p)
    p.set_defaults(handler=power.cmd_plan)

    manager = sub.add_parser("power", help="the power manager: automation level and status").add_subparsers(
        dest="action", required=True
    )
    p = manager.add_parser("mode", help="switch the automation level: manual, recommend or auto")
    p.add_argument("mode", choices=("manual", "recommend", "auto"))
    _common(p)
    p.set_defaults(handler=power.cmd_power_mode)
    p = manager.add_parser("status", help="automation level, settings, and each host's power and energy")
    _common(p)
    p.set_defaults(handler=power.cmd_power_status)


def _add_admin_commands(sub: _SubParsers) -> None:
    op = sub.add_parser("op", help="list, show, wait for and cancel operations").add_subparsers(
        dest="action", required=True
    )
    p = op.add_parser("list", help="list operations, newest first")
    p.add_argument("--kind", help="create, start, stop, delete, migrate, evacuate, ...")
    p.add_argument("--state", choices=("running", "succeeded", "failed"))
    p.add_argument("--host", help="operations on this host")
    p.add_argument("--vm", help="operations on this VM")
    p.add_argument("--limit", type=int, default=50, help="operations per page (default 50, at most 1000)")
    p.add_argument("--all", action="store_true", help="every page, not only the newest")
    _common(p)
    p.set_defaults(handler=admin.cmd_op_list)
    p = op.add_parser("show", help="show an operation, with readable times")
    p.add_argument("op_id")
    _common(p)
    p.set_defaults(handler=admin.cmd_op_show)
    p = op.add_parser("wait", help="wait until an operation ends (exit 1 if it failed)")
    p.add_argument("op_id")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    _common(p)
    p.set_defaults(handler=admin.cmd_op_wait)
    p = op.add_parser(
        "continue", help="a rolling maintenance host's step is done (or, with --failed, failed)"
    )
    p.add_argument("op_id")
    p.add_argument("host")
    p.add_argument(
        "--failed", metavar="WHY", help="the step failed: the host stays in maintenance, the roll stops"
    )
    p.add_argument("--message", default="", help="what the step did (kept in the roll's progress)")
    _common(p)
    p.set_defaults(handler=rolling.cmd_op_continue)
    p = op.add_parser(
        "cancel",
        help="cancel a running live migration (pre-copy), evacuation, bulk action or rolling maintenance",
    )
    p.add_argument("op_id")
    _waiting(p)
    _common(p)
    p.set_defaults(handler=admin.cmd_op_cancel)

    token = sub.add_parser("token", help="manage API tokens (admin)").add_subparsers(
        dest="action", required=True
    )
    p = token.add_parser("create", help="create a token; it is printed once")
    p.add_argument("name")
    p.add_argument("--role", choices=("viewer", "operator", "admin"), default="viewer")
    _common(p)
    p.set_defaults(handler=admin.cmd_token_create)
    p = token.add_parser("list", help="list tokens (names and roles, never the secrets)")
    _common(p)
    p.set_defaults(handler=admin.cmd_token_list)
    p = token.add_parser("revoke", help="revoke a token")
    p.add_argument("name")
    _common(p)
    p.set_defaults(handler=admin.cmd_token_revoke)

    p = sub.add_parser("audit", help="the audit log of mutating API requests (admin)")
    p.add_argument("--since", type=int, default=0)
    _common(p)
    p.set_defaults(handler=admin.cmd_audit)

    p = sub.add_parser("events", help="print fleet events (-f to follow)")
    p.add_argument("--since", type=int, default=0, help="start after this event sequence number")
    p.add_argument("-f", "--follow", action="store_true")
    _common(p)
    p.set_defaults(handler=admin.cmd_events)


def add_global_flags(parser: argparse.ArgumentParser) -> None:
    """``-v`` and ``--version``, on the whole command line and on the operator commands' own."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; operator commands show each API request"
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")


class _Version(argparse.Action):
    """``--version``, read from the package metadata only when asked (importlib.metadata costs every
    other command about 20 ms).
    """

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        import importlib.metadata

        try:
            version = importlib.metadata.version("fleetvisor")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown (not installed: ./scripts/test or pip install -e .)"
        print(f"fleetvisor {version}")
        parser.exit()


def is_operator_command(argv: Sequence[str]) -> bool:
    """Whether ``argv`` runs an operator command (or only asks for the version): those need only
    :func:`operator_parser`, which loads no server code.
    """
    word = next((w for w in argv if not w.startswith("-")), None)
    return word in OPERATOR_COMMANDS or (word is None and "--version" in argv)


def operator_parser() -> argparse.ArgumentParser:
    """Only the operator commands, under the global flags: what ``fleetvisor vm list`` needs."""
    parser = argparse.ArgumentParser(prog="fleetvisor", description="Fleet manager for virtual machines.")
    add_global_flags(parser)
    add_operator_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def add_operator_commands(sub: _SubParsers) -> None:
    """Register ``vm``, ``host``, ``op``, ``events``, ``plan`` and ``power`` under the top-level parser."""
    _add_vm_commands(sub)
    _add_host_commands(sub)
    _add_power_commands(sub)
    _add_admin_commands(sub)


def run_operator_command(args: argparse.Namespace) -> int:
    """Run the parsed command's handler against the controller and return the exit code."""
    url = args.url or os.environ.get("FLEETVISOR_URL") or DEFAULT_URL
    ca_file = args.ca_file or os.environ.get("FLEETVISOR_CA")
    try:
        client = Client(
            url,
            token=args.token or os.environ.get("FLEETVISOR_TOKEN"),
            ca_file=ca_file,
            verbose=bool(getattr(args, "verbose", False)),
        )
    except (OSError, ssl.SSLError) as exc:
        print(f"fleetvisor: cannot load the CA certificate {ca_file!r}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        code: int = args.handler(client, args)
        return code
    except CliError as exc:
        print(f"fleetvisor: {exc}", file=sys.stderr)
        return exc.exit_code
    except ApiError as exc:
        print(f"fleetvisor: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE if isinstance(exc, Unreachable) else EXIT_FAILED
    except KeyboardInterrupt:
        print(
            "\nfleetvisor: interrupted; what the controller started goes on: see `fleetvisor op list --state "
            "running`, cancel with `fleetvisor op cancel ID`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (`| head`) went away: stop quietly, as Unix tools do, without a traceback at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        client.close()
