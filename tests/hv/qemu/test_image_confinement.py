"""Image confinement beyond symlinks: hard links are refused, swaps during the check are caught, and
a disk without an overlay (often a shared image) is opened read-only by a real QEMU unless the spec
marks it writable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hv.qemu.errors import InvalidSpec
from hv.qemu.image_policy import ImagePolicy
from protocols.vmspec import DiskSpec
from tests.hv.qemu.conftest import MakeDriver
from tests.support.needs import needs
from tests.support.qemu import Guests, tiny_spec, wait_for_text

pytestmark = needs(shutil.which("qemu-img"), "qemu-img is not installed (apt-get install -y qemu-utils)")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=30)


def raw_image(path: Path, size: int = 4 << 20) -> None:
    with path.open("wb") as f:
        f.truncate(size)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    return directory


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    return directory


@pytest.fixture
def policy(images: Path) -> ImagePolicy:
    return ImagePolicy([images], qemu_img="qemu-img")


def test_a_hard_link_to_a_file_outside_is_refused_with_the_fix(
    policy: ImagePolicy, images: Path, outside: Path
) -> None:
    """images/base.raw hard-linked to outside/secret: refused, naming the path, the reason and the fix."""
    secret = outside / "secret"
    secret.write_bytes(b"not for guests")
    os.link(secret, images / "base.raw")
    assert (images / "base.raw").stat().st_ino == secret.stat().st_ino, "a real hard link, same filesystem"
    with pytest.raises(InvalidSpec) as refused:
        policy.confine("web-1", "disk vda source", str(images / "base.raw"))
    text = str(refused.value)
    assert "'web-1'" in text and str(images / "base.raw") in text and "2 hard links" in text
    assert "copy the image instead of hard-linking it" in text
    assert refused.value.code == "invalid_request"


def test_a_file_hard_linked_twice_inside_is_refused_too_and_a_copy_is_accepted(
    policy: ImagePolicy, images: Path
) -> None:
    """A second link cannot be told from one to outside; after a copy (one link each) both names pass."""
    (images / "a.raw").write_bytes(b"image")
    os.link(images / "a.raw", images / "b.raw")
    for name in ("a.raw", "b.raw"):
        with pytest.raises(InvalidSpec, match="hard links"):
            policy.confine("web-1", "disk vda source", str(images / name))
    (images / "b.raw").unlink()
    shutil.copyfile(images / "a.raw", images / "b.raw")
    for name in ("a.raw", "b.raw"):
        assert policy.confine("web-1", "disk vda source", str(images / name)) == images / name


async def test_a_backing_file_that_is_a_hard_link_is_refused(
    policy: ImagePolicy, images: Path, outside: Path
) -> None:
    """The chain walk checks every layer the same way: a hard-linked base under a clean top is refused."""
    raw_image(outside / "base.raw")
    os.link(outside / "base.raw", images / "base.raw")
    top = images / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(images / "base.raw"), str(top))
    with pytest.raises(InvalidSpec, match=r"backing file .*base.raw has 2 hard links"):
        await policy.disk_chain("web-1", "disk vda source", str(top), "qcow2")


def test_a_name_swapped_for_a_symlink_after_resolving_is_caught(
    policy: ImagePolicy, images: Path, outside: Path
) -> None:
    """The file is opened without following symlinks: a name turned into a symlink after realpath is refused.

    The swap is made between the two steps by hand, standing in for a racing writer.
    """
    (outside / "secret").write_bytes(b"secret")
    image = images / "a.raw"
    image.symlink_to(outside / "secret")
    with pytest.raises(InvalidSpec, match="changed while it was checked"):
        policy._check_file("web-1", "boot.kernel", str(image), image)


async def test_the_engine_refuses_a_hard_linked_kernel_at_define(
    make_driver: MakeDriver, guests: Guests, images: Path, outside: Path
) -> None:
    """QemuDriver.define through its own image policy: a kernel hard-linked from outside never reaches QEMU."""
    shutil.copyfile(guests.tiny, outside / "tiny.elf")
    os.link(outside / "tiny.elf", images / "tiny.elf")
    driver = await make_driver(image_dirs=[images])
    with pytest.raises(InvalidSpec, match="copy the image instead of hard-linking it"):
        await driver.define(tiny_spec("hl-1", guests, kernel=images / "tiny.elf"))
    assert await driver.list() == []


def _access_modes(pid: int, image: Path) -> set[str]:
    """How QEMU process ``pid`` holds ``image`` open: 'r' and/or 'rw', from /proc/PID/fdinfo."""
    modes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(image):
                continue
            flags = next(
                line
                for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                if line.startswith("flags:")
            )
        except FileNotFoundError:
            continue
        modes.add("rw" if int(flags.split()[1], 8) & os.O_ACCMODE == os.O_RDWR else "r")
    return modes


@pytest.mark.parametrize(("writable", "read_only", "modes"), [(False, True, {"r"}), (True, False, {"rw"})])
async def test_qemu_opens_a_disk_without_an_overlay_read_only_unless_writable(
    make_driver: MakeDriver, guests: Guests, images: Path, writable: bool, read_only: bool, modes: set[str]
) -> None:
    """A shared raw image with overlay=False: QMP's query-block says ro, and QEMU holds only a read-only fd."""
    image = images / "shared.raw"
    raw_image(image)
    driver = await make_driver(image_dirs=[guests.dir, images])
    disk = DiskSpec(target="vda", source=str(image), format="raw", overlay=False, writable=writable)
    await driver.define(tiny_spec("shared-1", guests, disks=[disk]))
    await driver.start("shared-1")
    await wait_for_text(driver.serial_log_path("shared-1"), "READY", 30)
    qemu = driver._table.vms["shared-1"].qemu
    assert qemu is not None and qemu.qmp is not None
    blocks = await qemu.qmp.execute("query-block")
    assert isinstance(blocks, list)
    [block] = [b for b in blocks if b.get("qdev") == "disk-vda"]
    assert block["inserted"]["ro"] is read_only and block["inserted"]["file"] == str(image)
    pid = driver.qemu_pid("shared-1")
    assert pid is not None
    assert _access_modes(pid, image) == modes
    await driver.destroy("shared-1")
