"""Whole tensors written at their offsets in a pre-sized file: positional writes from several
threads, ``O_DIRECT`` for the large ones where the filesystem allows it. No torch: the export's
background pre-quantizer writes through this too (``graphtune.export.prequant``)."""

from __future__ import annotations

import errno
import os
import sys
import threading
import uuid
from pathlib import Path

import numpy as np


_FALLOC_FL_INSERT_RANGE = 0x20


def insert_range(fd: int, offset: int, length: int) -> None:
    """Insert ``length`` zero bytes at ``offset`` of the open file, moving what follows without
    copying it (Linux ``fallocate(FALLOC_FL_INSERT_RANGE)``: ext4, xfs; both numbers multiples of
    the filesystem block, ``offset`` inside the file). OSError where that is not available."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        raise OSError(errno.EOPNOTSUPP, "fallocate(FALLOC_FL_INSERT_RANGE) is Linux only")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    if fallocate(fd, _FALLOC_FL_INSERT_RANGE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(FALLOC_FL_INSERT_RANGE): {os.strerror(err)}")


def create_tmp(path: Path) -> tuple[Path, int]:
    """A new temporary file next to ``path`` (its folder created), to be renamed over it when
    complete, and its read-write descriptor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)


def pwrite(fd: int, data, offset: int) -> None:
    """All of ``data`` at ``offset`` (positional: writer threads never share a file position)."""
    view = memoryview(data).cast("B")
    while len(view):
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, view, offset)
        else:  # pragma: no cover - Windows
            with SEEK_LOCK:
                os.lseek(fd, offset, os.SEEK_SET)
                n = os.write(fd, view)
        view = view[n:]
        offset += n


SEEK_LOCK = threading.Lock()
FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None) if hasattr(os, "posix_fadvise") else None
PAGE = 4096
DIRECT_MIN = 1 << 20  # tensors from this size on go through O_DIRECT where available


class TensorFile:
    """Whole tensors written at their offsets into the pre-sized temporary file.

    Where the platform and the filesystem allow ``O_DIRECT``, a large tensor is quantized into a
    buffer laid out like its pages in the file, and its page-aligned middle goes to the disk from
    there (no copy into the page cache, nothing left for the final fsync to write back); its first
    and last partial pages, small tensors, and everything elsewhere go through ordinary ``pwrite``
    (then ``posix_fadvise(DONTNEED)`` starts their writeback at once).
    """

    def __init__(self, path: Path, fd: int):
        self.fd = fd
        self.direct_fd: int | None = None
        if hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self.direct_fd = None
        self._local = threading.local()

    def close(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None

    def buffer(self, offset: int, nbytes: int) -> np.ndarray | None:
        """A reusable (per thread) uint8 buffer for a tensor of ``nbytes`` at ``offset`` whose file
        page boundaries are memory page boundaries; None where O_DIRECT is not used."""
        if self.direct_fd is None or nbytes < DIRECT_MIN:
            return None
        head = offset % PAGE
        need = -(-(head + nbytes) // PAGE) * PAGE
        mm = getattr(self._local, "mm", None)
        if mm is None or len(mm) < need:
            import mmap

            self._local.mm = mm = mmap.mmap(-1, need)  # anonymous: page-aligned
        return np.frombuffer(mm, np.uint8, count=nbytes, offset=head)

    def write(self, data: np.ndarray, offset: int, direct: bool) -> None:
        data = memoryview(np.ascontiguousarray(data)).cast("B")
        end = offset + len(data)
        a, b = -(-offset // PAGE) * PAGE, end // PAGE * PAGE
        if direct and self.direct_fd is not None and b > a:
            pwrite(self.fd, data[:a - offset], offset)
            try:
                pwrite(self.direct_fd, data[a - offset:b - offset], a)
            except OSError:  # the filesystem refuses after all: buffered from now on
                self.direct_fd = None
                pwrite(self.fd, data[a - offset:b - offset], a)
            pwrite(self.fd, data[b - offset:], b)
            return
        pwrite(self.fd, data, offset)
        if FADV_DONTNEED is not None and len(data) >= DIRECT_MIN:
            # start writing this tensor to disk now, overlapped with the next ones, instead of
            # all of it in the final fsync (the pages then leave the page cache)
            os.posix_fadvise(self.fd, offset, len(data), FADV_DONTNEED)

    def put(self, arr: np.ndarray, offset: int) -> None:
        """An array already made elsewhere at ``offset``: copied into the aligned buffer and written
        with ``O_DIRECT`` when large, else written as it is."""
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        buf = self.buffer(offset, flat.nbytes)
        if buf is None:
            self.write(flat, offset, direct=False)
            return
        np.copyto(buf, flat)
        self.write(buf, offset, direct=True)
