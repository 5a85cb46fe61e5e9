"""hv.engines builds the qemu engine by name, lazily, with its options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hv.engines import ENGINES, create_driver
from hv.qemu.driver import QemuDriver


def test_choosing_an_engine_does_not_import_the_qemu_engine_until_asked() -> None:
    """Importing hv.engines (and building a sim driver) leaves hv.qemu unimported."""
    code = (
        "import sys, hv.engines as e; e.create_driver('sim', host_id='h1', state_dir=None); "
        "print('hv.qemu' in sys.modules, 'qemu.qmp' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["False", "False"]


def test_create_driver_builds_a_qemu_driver_with_its_options(tmp_path: Path) -> None:
    """'qemu' is an engine; host id, state dir and options (image_dirs, accel) reach QemuDriver."""
    assert "qemu" in ENGINES
    driver = create_driver(
        "qemu", host_id="h9", state_dir=tmp_path, image_dirs=[tmp_path / "img"], accel="tcg"
    )
    assert isinstance(driver, QemuDriver) and driver.name == "qemu"
    assert (driver.host_id, driver.state_dir, driver.accel_mode) == ("h9", tmp_path, "tcg")
    assert driver.image_dirs == [tmp_path / "img"]
    default = create_driver("qemu", host_id="h9", state_dir=tmp_path)
    assert isinstance(default, QemuDriver) and default.image_dirs == [tmp_path / "images"]


def test_bad_qemu_options_are_refused_with_the_fix(tmp_path: Path) -> None:
    """No state dir, or an unknown accel: ValueError that says what to pass."""
    with pytest.raises(ValueError, match=r"needs a state directory.*--state-dir"):
        create_driver("qemu", host_id="h9", state_dir=None)
    with pytest.raises(ValueError, match="accel must be 'auto', 'kvm' or 'tcg'"):
        create_driver("qemu", host_id="h9", state_dir=tmp_path, accel="hvf")
