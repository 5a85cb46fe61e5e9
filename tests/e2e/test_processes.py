"""End to end with real processes: a controller and agents started with the ``fleetvisor`` CLI.

Every process is started by the test and stopped by PID when it ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx

from tests.support import free_port
from tests.support.processes import ROOT, run_cli, start_process_fleet, wait_for


def test_controller_and_two_agent_processes_create_a_vm_then_lose_a_host_to_kill_9(
    mosquitto, procs, tmp_path
):
    """Create a VM through the CLI, then kill -9 an agent: its host goes offline (Last Will)."""
    fleet = start_process_fleet(
        procs, mosquitto.url, tmp_path, hosts=("h1", "h2"), agent_args=("--memory-mib", "8192")
    )
    url, agents, everyone = fleet.url, fleet.agents, fleet.all

    def hosts() -> dict[str, bool]:
        return {h["host_id"]: h["online"] for h in fleet.hosts()}

    created = run_cli(url, "vm", "create", "web-1", "--vcpus", "2", "--memory", "1024", "--json")
    assert created.returncode == 0, created.stderr
    result = json.loads(created.stdout)
    assert result["operation"]["state"] == "succeeded"
    host = result["vm"]["host_id"]
    listed = json.loads(run_cli(url, "vm", "list", "--json").stdout)
    assert [(v["name"], v["state"], v["host_id"]) for v in listed] == [("web-1", "running", host)]
    table = run_cli(url, "host", "list").stdout
    assert "h1" in table and "online" in table
    assert (
        json.loads(run_cli(url, "vm", "list", "-l", f"host={host},state=running", "--json").stdout)[0]["name"]
        == "web-1"
    )
    assert json.loads(run_cli(url, "vm", "list", "--selector", "state=stopped", "--json").stdout) == []
    assert [
        h["host_id"] for h in json.loads(run_cli(url, "host", "list", "-l", f"name={host}", "--json").stdout)
    ] == [host]
    bad = run_cli(url, "vm", "list", "-l", "state=")
    assert bad.returncode != 0 and "at character 7" in bad.stderr and "^" in bad.stderr, bad.stderr

    victim = agents[host].popen
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(5)
    # How soon the Last Will lands is bench/ha's number (detect_s, measured from the kill); the bound
    # here only stops a hung run, ten times the 3 s this test once asserted, so load cannot flake it.
    wait_for(lambda: hosts()[host] is False, 30.0, f"{host} offline", everyone)
    shown = httpx.get(f"{url}/api/v1/hosts/{host}", timeout=2).json()
    assert "connection lost" in shown["state_reason"]
    vm = httpx.get(f"{url}/api/v1/vms/web-1", timeout=2).json()
    assert vm["host_online"] is False, "the VM view says its host is unreachable"
    events = httpx.get(f"{url}/api/v1/events", params={"limit": 1000}, timeout=2).json()
    assert any(e["type"] == "host.offline" and e["host_id"] == host for e in events)


def test_cli_errors_are_clear_and_exit_non_zero(tmp_path):
    """The CLI explains an unreachable controller and invalid specs, with distinct exit codes."""
    url = f"http://127.0.0.1:{free_port()}"
    unreachable = run_cli(url, "vm", "list")
    assert unreachable.returncode == 3
    assert "cannot reach the controller" in unreachable.stderr and "FLEETVISOR_URL" in unreachable.stderr
    bad = run_cli(url, "vm", "create", "ok-name", "--vcpus", "0")
    assert bad.returncode == 1 and "vcpus" in bad.stderr
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: from-file\nvcpus: 2\nmemroy_mib: 512\n")
    typo = run_cli(url, "vm", "create", "-f", str(spec))
    assert typo.returncode == 1 and "memroy_mib" in typo.stderr


def test_demo_runs_on_embedded_defaults_and_prints_its_summary_line(tmp_path):
    """`fleetvisor demo --for N` needs no outside service and ends with the summary line."""
    port = free_port()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetvisor",
            "demo",
            "--for",
            "2",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "demo: 4 hosts, 12 VMs running (sim)"
    assert "Traceback" not in done.stderr


def test_vm_create_from_libvirt_xml_and_dumpxml_round_trip(mosquitto, procs, tmp_path):
    """`vm create --xml` imports a libvirt domain, `vm dumpxml` exports it, and re-import gives the same spec."""
    from protocols import domxml

    url = start_process_fleet(procs, mosquitto.url, tmp_path).url
    sample = ROOT / "tests/protocols/domxml_samples/good_direct_kernel_boot.xml"
    created = run_cli(url, "vm", "create", "--xml", str(sample), "--json")
    assert created.returncode == 0, created.stderr
    name = json.loads(created.stdout)["vm"]["name"]
    exported = run_cli(url, "vm", "dumpxml", name)
    assert exported.returncode == 0, exported.stderr
    assert domxml.spec_from_xml(exported.stdout) == domxml.spec_from_xml(sample.read_text())
    refused = run_cli(
        url, "vm", "create", "--xml", str(ROOT / "tests/protocols/domxml_samples/bad_hostdev.xml")
    )
    assert refused.returncode == 1 and "/domain/devices/hostdev" in refused.stderr


def test_cli_batch_with_anti_affinity_explain_and_dry_run(mosquitto, procs, tmp_path):
    """`vm create --count 3 --group web --anti-affinity` spreads; --dry-run and --explain print the why."""
    url = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1", "h2", "h3")).url
    batch = run_cli(
        url, "vm", "create", "web", "--count", "3", "--group", "web", "--anti-affinity", "--memory", "256"
    )
    assert batch.returncode == 0, batch.stderr
    assert sorted(line.split()[1] for line in batch.stdout.splitlines()[1:]) == ["h1", "h2", "h3"]
    dry = run_cli(url, "vm", "create", "db", "--memory", "1024", "--dry-run")
    assert dry.returncode == 0 and "would go to" in dry.stdout and "3 of 3 hosts qualify" in dry.stdout
    assert "db" not in run_cli(url, "vm", "list").stdout
    explained = run_cli(url, "vm", "create", "db", "--memory", "1024", "--explain", "--avoid-host", "h1")
    assert explained.returncode == 0, explained.stderr
    assert "best candidates" in explained.stdout and "1." in explained.stdout
    assert "on h1" not in explained.stdout
    refused = run_cli(url, "vm", "create", "big", "--memory", "999999", "--dry-run")
    assert refused.returncode == 1 and "no host can take vm 'big'" in refused.stderr


def test_demo_with_real_qemu_guests_prints_its_summary_and_cleans_up(tmp_path):
    """`fleetvisor demo --hv qemu --for N`: 2 hosts, 4 tiny guests running, and no QEMU left afterwards."""
    import re

    from tests.support.qemu import require_guests

    require_guests()  # the demo itself reads the tiny guest from .cache/guests (fleetvisor._demo_guest)
    done = subprocess.run(
        [sys.executable, "-m", "fleetvisor", "demo", "--hv", "qemu", "--for", "2", "--port", str(free_port()),
         "--state-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.fullmatch(
        r"demo: 2 hosts, 4 VMs running \(qemu/(tcg|kvm)\)", done.stdout.strip().splitlines()[-1]
    )
    for pid_file in tmp_path.rglob("qemu.pid"):
        pid = int(pid_file.read_text().split()[0])
        assert not os.path.exists(f"/proc/{pid}"), f"QEMU {pid} outlived the demo"


def test_cli_migrate_shows_progress_predicts_with_dry_run_and_evacuate_reports(mosquitto, procs, tmp_path):
    """`vm migrate --dry-run` predicts; `vm migrate` draws progress and reports; `host evacuate` lists each VM."""
    url = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1", "h2")).url
    created = run_cli(url, "vm", "create", "mover", "--memory", "1024", "--start-on", "h1")
    assert created.returncode == 0, created.stderr
    dry = run_cli(url, "vm", "migrate", "mover", "--to", "h2", "--dry-run", "--bandwidth", "200")
    assert dry.returncode == 0, dry.stderr
    assert "h1 -> h2" in dry.stdout and "pre-copy converges" in dry.stdout and "predicted:" in dry.stdout
    moved = run_cli(url, "vm", "migrate", "mover", "--to", "h2", "--bandwidth", "200")
    assert moved.returncode == 0, moved.stderr
    assert "mover: h1 -> h2 in" in moved.stdout and "migrate vm mover: done" in moved.stdout
    bars = [line for line in moved.stderr.splitlines() if "MiB left" in line]
    assert bars and "[" in bars[-1] and "#" in bars[-1], moved.stderr  # the progress bar, line by line
    assert json.loads(run_cli(url, "vm", "show", "mover", "--json").stdout)["host_id"] == "h2"
    nothing = run_cli(url, "vm", "migrate-cancel", "mover")
    assert nothing.returncode == 1 and "is not migrating; nothing to cancel" in nothing.stderr
    evacuated = run_cli(url, "host", "evacuate", "h2")
    assert evacuated.returncode == 0, evacuated.stderr
    assert "mover: moved to h1" in evacuated.stdout and "evacuate host h2: done" in evacuated.stdout


def test_op_commands_list_show_wait_and_cancel_through_therun_cli(mosquitto, procs, tmp_path):
    """`op list` filters, `op show` reads as times, `op wait` ends, `op cancel` refuses what ended."""
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1",))
    url = fleet.url
    for name in ("a", "b"):
        assert run_cli(url, "vm", "create", name, "--memory", "128").returncode == 0
    listed = run_cli(url, "op", "list", "--vm", "a")
    assert listed.returncode == 0, listed.stderr
    rows = [
        line.split() for line in listed.stdout.splitlines()[1:] if line.strip() and not line.startswith("-")
    ]
    assert [(r[1], r[2], r[4]) for r in rows] == [("create", "a", "succeeded")], listed.stdout
    every = json.loads(run_cli(url, "op", "list", "--limit", "1", "--all", "--json").stdout)
    assert sorted(o["vm"] for o in every) == ["a", "b"]
    op_id = rows[0][0]
    shown = run_cli(url, "op", "show", op_id)
    assert "created_at: 20" in shown.stdout and " ago)" in shown.stdout, shown.stdout
    waited = run_cli(url, "op", "wait", op_id)
    assert waited.returncode == 0 and "done" in waited.stdout, waited.stdout + waited.stderr
    cancelled = run_cli(url, "op", "cancel", op_id)
    assert cancelled.returncode == 1 and "already succeeded; there is nothing to cancel" in cancelled.stderr
    bad = run_cli(url, "op", "list", "--kind", "explode")
    assert bad.returncode == 1 and "kind 'explode' is not one of" in bad.stderr
