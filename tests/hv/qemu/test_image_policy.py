"""Path safety: a spec can make QEMU read only files inside the image directories, backing files included."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hv.qemu.errors import InvalidSpec
from hv.qemu.image_policy import ImagePolicy
from protocols.vmspec import BootSpec, DiskSpec, VmSpec
from tests.hv.qemu.conftest import MakeDriver
from tests.support.needs import needs
from tests.support.qemu import Guests

pytestmark = needs(shutil.which("qemu-img"), "qemu-img is not installed (apt-get install -y qemu-utils)")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=30)


def strip_backing_format(image: Path) -> None:
    """Turn the qcow2 "backing file format" header extension into an unknown one, which QEMU skips."""
    header = bytearray(image.read_bytes()[:65536])
    at = header.find(bytes.fromhex("e2792aca"))
    assert at > 0, "no backing format extension in the header"
    header[at : at + 4] = bytes.fromhex("0badf00d")
    with image.open("r+b") as f:
        f.write(header)


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


def test_a_file_inside_the_image_directory_is_accepted_as_its_real_path(
    policy: ImagePolicy, images: Path
) -> None:
    """A regular file inside is confined to its resolved path (symlinks inside the directory are fine)."""
    (images / "vmlinuz").write_bytes(b"kernel")
    (images / "current").symlink_to(images / "vmlinuz")
    assert policy.confine("web-1", "boot.kernel", str(images / "current")) == images / "vmlinuz"


def test_a_path_outside_the_image_directories_is_refused_with_the_fix(
    policy: ImagePolicy, outside: Path, images: Path
) -> None:
    """The error names the VM, the path, why, and what to do."""
    (outside / "vmlinuz").write_bytes(b"kernel")
    with pytest.raises(InvalidSpec) as refused:
        policy.confine("web-1", "boot.kernel", str(outside / "vmlinuz"))
    text = str(refused.value)
    assert "'web-1'" in text and str(outside / "vmlinuz") in text and str(images) in text
    assert "outside the image directories" in text and "copy the file into an image directory" in text
    assert refused.value.code == "invalid_request"


@pytest.mark.parametrize("trick", ["symlink", "dotdot", "symlinked-dir"])
def test_escapes_by_symlink_or_dotdot_are_refused(
    policy: ImagePolicy, images: Path, outside: Path, trick: str
) -> None:
    """A symlink (to a file or a directory) or ``..`` that leads out is refused like the outside path."""
    secret = outside / "secret"
    secret.write_bytes(b"secret")
    if trick == "symlink":
        (images / "evil.qcow2").symlink_to(secret)
        path = str(images / "evil.qcow2")
    elif trick == "dotdot":
        path = f"{images}/../outside/secret"
    else:
        (images / "sub").symlink_to(outside)
        path = str(images / "sub" / "secret")
    with pytest.raises(InvalidSpec, match="outside the image directories") as refused:
        policy.confine("web-1", "disk vda source", path)
    if trick != "dotdot":
        assert f"resolves (through a symlink) to {secret}" in str(refused.value)


def test_missing_files_directories_and_relative_paths_are_refused(policy: ImagePolicy, images: Path) -> None:
    """Each refusal says what is wrong with the path."""
    with pytest.raises(InvalidSpec, match="does not exist"):
        policy.confine("web-1", "boot.kernel", str(images / "nope"))
    (images / "dir").mkdir()
    with pytest.raises(InvalidSpec, match="not a regular file"):
        policy.confine("web-1", "boot.kernel", str(images / "dir"))
    with pytest.raises(InvalidSpec, match="not an absolute path"):
        policy.confine("web-1", "boot.kernel", "images/vmlinuz")


async def test_a_backing_chain_inside_the_directories_is_walked_layer_by_layer(
    policy: ImagePolicy, images: Path
) -> None:
    """top.qcow2 -> mid.qcow2 -> base.raw: three checked layers, top first, with formats and sizes."""
    qemu_img("create", "-q", "-f", "raw", str(images / "base.raw"), "16M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(images / "base.raw"), str(images / "mid.qcow2")
    )
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", str(images / "top.qcow2"))
    layers = await policy.disk_chain("web-1", "disk vda source", str(images / "top.qcow2"), "qcow2")
    assert [(layer.path.name, layer.format) for layer in layers] == [
        ("top.qcow2", "qcow2"), ("mid.qcow2", "qcow2"), ("base.raw", "raw"),
    ]  # fmt: skip
    assert all(layer.virtual_size == 16 << 20 for layer in layers)


async def test_a_backing_file_outside_the_directories_is_refused(
    policy: ImagePolicy, images: Path, outside: Path
) -> None:
    """A qcow2 inside whose backing file is outside: refused, naming both files and the rebase fix."""
    qemu_img("create", "-q", "-f", "raw", str(outside / "base.raw"), "16M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(outside / "base.raw"), str(images / "top.qcow2")
    )
    with pytest.raises(InvalidSpec) as refused:
        await policy.disk_chain("web-1", "disk vda source", str(images / "top.qcow2"), "qcow2")
    text = str(refused.value)
    assert str(outside / "base.raw") in text and str(images / "top.qcow2") in text
    assert "outside the image directories" in text and "qemu-img rebase" in text


async def test_a_backing_file_reached_through_a_symlink_out_is_refused(
    policy: ImagePolicy, images: Path, outside: Path
) -> None:
    """The backing path looks inside but is a symlink to a file outside: refused."""
    qemu_img("create", "-q", "-f", "raw", str(outside / "base.raw"), "16M")
    (images / "base.raw").symlink_to(outside / "base.raw")
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        str(images / "base.raw"),
        "-u",
        str(images / "top.qcow2"),
        "16M",
    )
    with pytest.raises(InvalidSpec, match="outside the image directories"):
        await policy.disk_chain("web-1", "disk vda source", str(images / "top.qcow2"), "qcow2")


async def test_backing_files_that_are_not_local_or_have_no_format_are_refused(
    policy: ImagePolicy, images: Path
) -> None:
    """An nbd:// backing file is never contacted; a backing file without a recorded format is not probed."""
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "nbd://127.0.0.1:1/x",
        "-u",
        str(images / "net.qcow2"),
        "16M",
    )
    with pytest.raises(InvalidSpec, match="not a local file"):
        await policy.disk_chain("web-1", "disk vda source", str(images / "net.qcow2"), "qcow2")
    qemu_img("create", "-q", "-f", "raw", str(images / "base.raw"), "16M")
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        str(images / "base.raw"),
        str(images / "nofmt.qcow2"),
    )
    strip_backing_format(images / "nofmt.qcow2")  # as old images are; today's qemu-img refuses to make one
    with pytest.raises(InvalidSpec, match="no recorded format"):
        await policy.disk_chain("web-1", "disk vda source", str(images / "nofmt.qcow2"), "qcow2")


async def test_a_file_that_is_not_in_the_format_the_spec_says_is_refused(
    policy: ImagePolicy, images: Path
) -> None:
    """format=qcow2 on a raw file: qemu-img's reason and a hint at the format field."""
    (images / "disk.raw").write_bytes(b"\0" * 65536)
    with pytest.raises(InvalidSpec, match=r"cannot be read as qcow2.*format field"):
        await policy.disk_chain("web-1", "disk vda source", str(images / "disk.raw"), "qcow2")


async def test_the_driver_refuses_such_specs_at_define_and_changes_nothing(
    make_driver: MakeDriver, guests: Guests, outside: Path
) -> None:
    """define() with a kernel outside the image dirs: InvalidSpec, no VM, no directory."""
    shutil.copy(guests.tiny, outside / "tiny.elf")
    driver = await make_driver()
    spec = VmSpec(name="escape", boot=BootSpec(kernel=str(outside / "tiny.elf")))
    with pytest.raises(InvalidSpec, match="outside the image directories"):
        await driver.define(spec)
    assert await driver.list() == []
    assert not (driver.vms_dir / "escape").exists()
    disk_spec = VmSpec(
        name="escape",
        boot=BootSpec(kernel=str(guests.tiny)),
        disks=[DiskSpec(target="vda", source="/etc/passwd", format="raw")],
    )
    with pytest.raises(InvalidSpec, match="/etc/passwd is outside"):
        await driver.define(disk_spec)
    assert os.listdir(driver.vms_dir) == []
