"""Page files on SSD: one file per page, a header with a CRC32 checked on every read, and crash-safe writes
(write a temporary file, fsync, rename over the old one: a reader sees the old page or the new, never half)."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np

from hwmodel.errors import UserError

MAGIC = b"HPPAGE01"
HEADER = struct.Struct("<8sIQ")  # magic, crc32 of the payload, payload bytes


class CorruptPage(UserError):
    """A page file whose checksum does not match its bytes."""


def check_page_dir(path: Path, needed_bytes: float) -> None:
    """Refuse, before training, a page directory that cannot take `needed_bytes` of pages: not a folder,
    read-only, or without the free space."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--page-dir {path} is a file; give a folder for the page files")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--page-dir {path} is not writable ({exc.strerror}); give a writable folder") from None
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise UserError(
            f"--page-dir {path} has {free / 1e6:.1f} MB free, the page files need {needed_bytes / 1e6:.1f} MB"
        )


class PageStore:
    """Pages as files `<dir>/<name>.page`; counts the bytes it reads and writes."""

    def __init__(self, directory: Path, dtype: str = "float64"):
        self.directory = directory
        self.dtype = np.dtype(dtype)
        self.bytes_read = 0
        self.bytes_written = 0

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.page"

    def write(self, name: str, data: np.ndarray) -> None:
        payload = np.ascontiguousarray(data, dtype=self.dtype).tobytes()
        final = self.path(name)
        tmp = final.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, HEADER.pack(MAGIC, zlib.crc32(payload), len(payload)) + payload, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)  # atomic: the old page stays whole until the new one is
        self.bytes_written += len(payload)

    def read(self, name: str) -> np.ndarray:
        file = self.path(name)
        fd = os.open(file, os.O_RDONLY)
        try:
            head = os.pread(fd, HEADER.size, 0)
            if len(head) < HEADER.size:
                raise CorruptPage(f"page {name}: file {file} is truncated (no header)")
            magic, crc, length = HEADER.unpack(head)
            payload = os.pread(fd, length, HEADER.size)
        finally:
            os.close(fd)
        if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            raise CorruptPage(f"page {name}: checksum mismatch in {file}; the page file is corrupt, stopping")
        self.bytes_read += length
        return np.frombuffer(payload, dtype=self.dtype).copy()
