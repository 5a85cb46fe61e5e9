"""Which files a VM may make QEMU open: only images and kernels inside the allowed directories.

A VM spec names host paths (kernel, initrd, disk sources). A spec must never make QEMU read
anything else, so each path is resolved (``realpath``: every symlink followed, ``..`` removed) and
must land on a regular file inside one of the driver's image directories. A symlink inside an
image directory that points out of it is refused like the outside path itself. A hard link has no
such tell (its other name may be anywhere on the same filesystem), so a file with more than one
hard link is refused: copy the image instead. The file is then opened without following a symlink
and checked through that descriptor (type, links, and its real path from ``/proc/self/fd``), so a
name swapped during the check cannot pass for the file that was checked.

Disk images carry paths of their own: a qcow2 may name a backing file, and a backing file may
name another. :meth:`ImagePolicy.disk_chain` walks that chain one layer at a time with ``qemu-img
info`` *without* ``--backing-chain``, so no layer is ever opened before it has been checked: a
malicious image cannot make even ``qemu-img`` touch ``/etc/shadow`` or connect to an ``nbd://``
server. Every backing file must be a local file inside the image directories with its format
recorded (probing formats is unsafe), and external qcow2 data files are refused. The checked
chain is then given to QEMU layer by layer as explicit ``-blockdev`` nodes (see
:mod:`hv.qemu.command_line`), so QEMU follows no path stored in an image either.

What remains is a race: an operator with write access to an image directory could swap a file
between the check and QEMU opening it (the driver checks again right before each start). The
image directories are the trust boundary.

Imports: :mod:`hv.driver` and :mod:`hv.qemu.errors` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hv.driver import EngineError
from hv.qemu.errors import InvalidSpec

__all__ = ["MAX_CHAIN_DEPTH", "ImageLayer", "ImagePolicy"]

#: Longer backing chains than this are refused (and a loop is one).
MAX_CHAIN_DEPTH = 16

ImageFormat = Literal["qcow2", "raw"]


@dataclass(frozen=True, slots=True)
class ImageLayer:
    """One checked layer of a disk: a resolved path, its format and its size as the guest sees it."""

    path: Path
    format: ImageFormat
    virtual_size: int


class ImagePolicy:
    """Confines a VM's files to ``image_dirs``; uses ``qemu_img`` to read image headers.

    Raises (constructor):
        ValueError: no image directory was given.
    """

    def __init__(self, image_dirs: Sequence[Path], *, qemu_img: str, timeout_s: float = 10.0) -> None:
        if not image_dirs:
            raise ValueError("give the qemu engine at least one image directory (image_dirs)")
        self.image_dirs = tuple(Path(os.path.realpath(d)) for d in image_dirs)
        self.qemu_img = qemu_img
        self.timeout_s = timeout_s

    @property
    def dirs_text(self) -> str:
        """The image directories, for messages."""
        return ", ".join(str(d) for d in self.image_dirs)

    def inside(self, path: Path) -> bool:
        """Whether the resolved ``path`` lies inside one of the image directories."""
        return any(path.is_relative_to(d) for d in self.image_dirs)

    def confine(self, vm: str, what: str, path: str) -> Path:
        """The resolved ``path`` of ``what`` (e.g. ``kernel``), if it is a readable regular file
        inside the image directories.

        Raises:
            InvalidSpec: the path is relative, resolves outside the image directories (directly or
                through a symlink), does not exist, is not a regular file, is not readable, has
                more than one hard link, or changed while it was checked.
        """
        if not os.path.isabs(path):
            raise InvalidSpec(f"vm {vm!r}: {what} {path!r} is not an absolute path; give the full path")
        resolved = _resolve(path)
        if not self.inside(resolved):
            where = (
                f"{path} is"
                if str(resolved) == os.path.normpath(path)
                else f"{path} resolves (through a symlink) to {resolved}, which is"
            )
            raise InvalidSpec(
                f"vm {vm!r}: {what} {where} outside the image directories ({self.dirs_text}); "
                "QEMU may only read files there: copy the file into an image directory, or add its "
                "directory to the agent's image directories"
            )
        self._check_file(vm, what, path, resolved)
        return resolved

    def _check_file(self, vm: str, what: str, path: str, resolved: Path) -> None:
        """Check that ``resolved`` is a regular file with one link, through a descriptor of it.

        The name is looked at first (so no device or FIFO is ever opened), then opened without
        following a symlink; the opened file must be the one looked at (same device and inode) and
        its real path (``/proc/self/fd``) must still be ``resolved``, so a name swapped during the
        check is refused rather than passed.

        Raises:
            InvalidSpec: the file is missing, unreadable, not a regular file, was swapped while being
                checked, or has more than one hard link.
        """
        try:
            named = os.lstat(resolved)
            if stat.S_ISLNK(named.st_mode):
                raise _swapped(vm, what, path, resolved, "a symlink")
            if not stat.S_ISREG(named.st_mode):
                raise InvalidSpec(
                    f"vm {vm!r}: {what} {path} is not a regular file; give an image or kernel file, "
                    "not a directory or a device"
                )
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidSpec(
                f"vm {vm!r}: {what} {path} does not exist; check the path, or copy the file there first"
            ) from None
        except PermissionError:
            raise InvalidSpec(
                f"vm {vm!r}: {what} {path} is not readable by the agent; fix its permissions"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _swapped(vm, what, path, resolved, "a symlink") from None
            raise InvalidSpec(f"vm {vm!r}: {what} {path} cannot be read: {exc.strerror or exc}") from None
        try:
            opened = os.fstat(fd)
            real = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino) or Path(real) != resolved:
            raise _swapped(vm, what, path, resolved, real)
        if opened.st_nlink > 1:
            # A hard link leaves no trace of the file's other names: one of them may be outside
            # the image directories, a file QEMU must not read, and nothing here can tell.
            raise InvalidSpec(
                f"vm {vm!r}: {what} {path} has {opened.st_nlink} hard links, and a hard link can bring "
                f"a file from outside the image directories ({self.dirs_text}) inside; copy the "
                "image instead of hard-linking it (a symlink inside an image directory is fine)"
            )

    async def disk_chain(self, vm: str, what: str, source: str, fmt: ImageFormat) -> list[ImageLayer]:
        """The checked layers of a disk image, the named file first and its base last.

        Raises:
            InvalidSpec: a layer is outside the image directories, not a local file, of unknown
                format, uses an external data file, cannot be read as its format, or the chain is
                longer than :data:`MAX_CHAIN_DEPTH` or loops.
            EngineError: qemu-img could not be run or did not answer in time.
        """
        layers: list[ImageLayer] = []
        path = self.confine(vm, what, source)
        layer_format: ImageFormat = fmt
        seen: set[Path] = set()
        while True:
            if path in seen or len(layers) >= MAX_CHAIN_DEPTH:
                raise InvalidSpec(
                    f"vm {vm!r}: {what} {source} has a backing chain that loops or is deeper than "
                    f"{MAX_CHAIN_DEPTH} layers (at {path}); flatten it with qemu-img convert"
                )
            seen.add(path)
            info = await self.info(vm, what, path, layer_format)
            layers.append(ImageLayer(path=path, format=layer_format, virtual_size=int(info["virtual-size"])))
            data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
            if data_file:
                raise InvalidSpec(
                    f"vm {vm!r}: {what}: image {path} keeps its data in an external file ({data_file}), "
                    "which this engine does not allow; convert it to a self-contained qcow2 with "
                    "qemu-img convert"
                )
            backing = info.get("full-backing-filename") or info.get("backing-filename")
            if not backing:
                return layers
            backing_format = info.get("backing-filename-format")
            if not isinstance(backing, str) or not backing.startswith("/"):
                raise InvalidSpec(
                    f"vm {vm!r}: {what}: the backing file {backing!r} of {path} is not a local file; "
                    f"only files inside the image directories ({self.dirs_text}) may back a disk; "
                    "flatten the image with qemu-img convert"
                )
            resolved = _resolve(backing)
            if not self.inside(resolved):
                raise InvalidSpec(
                    f"vm {vm!r}: {what}: the backing file {backing} of {path} is outside the image "
                    f"directories ({self.dirs_text}); copy it into an image directory and rebase "
                    f"with: qemu-img rebase -u -F {backing_format or 'FORMAT'} -b NEW_PATH {path}"
                )
            if backing_format not in ("qcow2", "raw"):
                raise InvalidSpec(
                    f"vm {vm!r}: {what}: the backing file {backing} of {path} has "
                    f"{'no recorded format' if not backing_format else f'format {backing_format!r}'}; "
                    "formats are never probed (a raw file could pose as qcow2); record it with: "
                    f"qemu-img rebase -u -F qcow2 -b {backing} {path} (or -F raw)"
                )
            path = self.confine(vm, f"{what} backing file", str(resolved))
            layer_format = "qcow2" if backing_format == "qcow2" else "raw"

    async def info(self, vm: str, what: str, path: Path, fmt: ImageFormat) -> dict[str, Any]:
        """``qemu-img info`` of one file as ``fmt``, without opening its backing file.

        Raises:
            InvalidSpec: qemu-img cannot read the file as ``fmt``.
            EngineError: qemu-img could not be run or did not answer in time.
        """
        out, err, code = await self._run(
            "info", "-U", "-f", fmt, "--output=json", str(path), what=f"{what} {path}"
        )
        if code != 0:
            reason = err.strip().splitlines()[-1] if err.strip() else f"exit status {code}"
            raise InvalidSpec(
                f"vm {vm!r}: {what} {path} cannot be read as {fmt}: {reason}; check the disk's format field"
            )
        try:
            info = json.loads(out)
        except ValueError as exc:
            raise EngineError(f"qemu-img info {path} printed something other than JSON: {exc}") from exc
        if not isinstance(info, dict) or "virtual-size" not in info:
            raise EngineError(f"qemu-img info {path} gave no virtual size; check the qemu-utils installation")
        return info

    async def create_overlay(self, vm: str, overlay: Path, base: ImageLayer, size: int) -> None:
        """Create a qcow2 ``overlay`` on the checked layer ``base``, ``size`` bytes large.

        ``-u`` keeps qemu-img from opening the base again: it has been checked already.

        Raises:
            EngineError: qemu-img failed or did not answer in time.
        """
        args = ("create", "-q", "-f", "qcow2", "-F", base.format, "-b", str(base.path), "-u", str(overlay))
        _, err, code = await self._run(*args, str(size), what=f"overlay {overlay}")
        if code != 0:
            raise EngineError(
                f"vm {vm!r}: qemu-img could not create the overlay {overlay} on {base.path}: "
                f"{err.strip() or f'exit status {code}'}; check free space in the state directory"
            )

    async def _run(self, *args: str, what: str) -> tuple[str, str, int]:
        try:
            process = await asyncio.create_subprocess_exec(
                self.qemu_img,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise EngineError(
                f"could not run {self.qemu_img} for {what}: {exc.strerror or exc}; "
                "install it with: apt-get install -y qemu-utils"
            ) from exc
        try:
            out, err = await asyncio.wait_for(process.communicate(), self.timeout_s)
        except TimeoutError:
            raise EngineError(
                f"qemu-img did not finish with {what} within {self.timeout_s:g}s; "
                "is the file on a hung network share?"
            ) from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        return out.decode(errors="replace"), err.decode(errors="replace"), process.returncode or 0


def _swapped(vm: str, what: str, path: str, resolved: Path, found: str) -> InvalidSpec:
    return InvalidSpec(
        f"vm {vm!r}: {what} {path} changed while it was checked ({resolved} was replaced by "
        f"{found}); leave the image directory alone while VMs start, then try again"
    )


def _resolve(path: str) -> Path:
    """``path`` with every symlink followed and ``..`` removed."""
    return Path(os.path.realpath(path))
