"""Composition root (work in progress)."""


def main() -> None:
    raise SystemExit("fleetvisor: not wired yet")
