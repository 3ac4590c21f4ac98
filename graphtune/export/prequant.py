"""Speculative quantization of a checkpoint's matrices while the export captures its graph.

A first ``graphtune export`` spends most of its time on one core: importing torch and
transformers and tracing two decoder layers are Python work under one lock, while the second core
idles. The quantization that follows is the opposite: C over the checkpoint's bytes, with the lock
released. So the CLI starts a :class:`Prequantizer` before it imports anything heavy: one thread
reads the ``*.safetensors`` files through ``mmap`` (their header is parsed here, no torch) and
quantizes every 2-D tensor to the file type's default block type with graphtune's C quantizers,
largest first, while the main thread captures and analyses the graph.

Why this is exact: every ggml block type quantizes a row on its own (blocks never straddle rows),
so the bytes of a tensor whose export fix-up only reorders whole rows (Llama's q/k permutation) are
those of the checkpoint's tensor, reordered by row. The writer uses a speculated tensor only when
the plan gives it that same type and the family's transform is proven to be a row gather
(:meth:`graphtune.export.families.GGUFFamily.transform_row_gather`); everything else is produced
as before. The speculation stops as soon as the writer starts (the tensor in flight is dropped at
its next chunk), and holds at most ``max_bytes`` of results.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import queue
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gguf
from graphtune.export import _cquants, fileio

logger = logging.getLogger("graphtune.export")

# safetensors dtype -> the C quantizers' source type, and its element size
_SRC_TYPES = {"F32": _cquants.SRC_F32, "F16": _cquants.SRC_F16, "BF16": _cquants.SRC_BF16}
_ELEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# ggml block types the C quantizers implement: id -> (elements per block, bytes per block)
_BLOCKS = {t: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)] for t in _cquants.C_TYPES}
_CHUNK_BLOCKS = 1 << 20  # per C call (32 M elements of Q8_0); the stop flag is read between calls


def enabled() -> bool:
    """Off with ``GRAPHTUNE_EXPORT_PREQUANT=0`` or ``GRAPHTUNE_QUANT_BACKEND=torch``; needs a
    little-endian host (the C quantizers read the files' little-endian values as they are)."""
    if os.environ.get("GRAPHTUNE_EXPORT_PREQUANT", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if os.environ.get("GRAPHTUNE_QUANT_BACKEND", "auto").strip().lower() == "torch":
        return False
    return sys.byteorder == "little"


@dataclass(frozen=True)
class _Entry:
    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the data in the file
    nbytes: int


def read_safetensors_header(path: Path) -> list[_Entry]:
    """The tensors of one ``.safetensors`` file (8-byte little-endian header size, JSON header,
    then the data), without reading the data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path}: header size {n} exceeds the file")
        header = json.loads(f.read(n))
    base = 8 + n
    out = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = (int(x) for x in info["data_offsets"])
        if not 0 <= begin <= end <= size - base:
            raise ValueError(f"{path}: {key}'s data offsets {begin}..{end} are outside the file")
        out.append(_Entry(path, key, str(info["dtype"]), tuple(int(s) for s in info["shape"]), base + begin, end - begin))
    return out


@dataclass(frozen=True)
class Slot:
    """Where a speculated tensor sits in the data section of the file being written."""

    key: str                # checkpoint name
    qtype: int              # ggml type id
    shape: tuple[int, int]  # the checkpoint tensor's shape
    nbytes: int             # its quantized bytes
    offset: int             # from the start of the data section


class Prequantizer:
    """Quantizes the 2-D tensors of the checkpoint in ``directory`` to ggml type ``qtype`` (an id the
    C quantizers implement: Q8_0, Q4_K, Q5_K, Q6_K) on a background thread, largest first (a
    second one writes them into the output file).

    ``start()`` begins. Results are kept in memory (at most ``max_bytes``). ``begin_file(out)`` creates the
    temporary file next to ``out`` and the thread also writes every finished tensor into its
    :class:`Slot` (the slots, in ``slots`` order, become the first tensors of the data section), so
    the disk works while the graph is captured. ``stop()`` ends the speculation; ``take`` hands out a finished tensor's bytes, ``on_disk``
    says whether its slot holds them; ``claim()`` gives the file to the writer, ``close()`` removes
    it if nobody claimed it.
    """

    def __init__(self, directory: str | os.PathLike, qtype: int, *, max_bytes: int | None = None,
                 alignment: int = 32):
        self.qtype = int(qtype)
        if self.qtype not in _BLOCKS:
            raise ValueError(f"no C quantizer for ggml type {qtype}")
        block, size = _BLOCKS[self.qtype]
        self.max_bytes = _default_budget() if max_bytes is None else int(max_bytes)
        entries = [e for f in sorted(Path(directory).glob("*.safetensors")) for e in read_safetensors_header(f)]
        self._todo = sorted(
            (e for e in entries
             if e.dtype in _SRC_TYPES and len(e.shape) == 2 and e.shape[0] > 0 and e.shape[1] % block == 0
             and e.nbytes == e.shape[0] * e.shape[1] * _ELEM_BYTES[e.dtype]),
            key=lambda e: -e.nbytes)
        self.slots: list[Slot] = []
        pos = 0
        for e in self._todo:
            n = _quantized_nbytes(e.shape, self.qtype)
            self.slots.append(Slot(e.key, self.qtype, (e.shape[0], e.shape[1]), n, pos))
            pos += -(-n // alignment) * alignment
        self.slots_nbytes = pos
        self._done: dict[str, np.ndarray] = {}
        self._on_disk: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._file_ready = threading.Event()
        self._threads = [threading.Thread(target=self._quantize_all, name="graphtune-prequant", daemon=True),
                         threading.Thread(target=self._write_all, name="graphtune-prewrite", daemon=True)]
        self._finished: queue.SimpleQueue = queue.SimpleQueue()  # slots quantized, for the writer thread
        self._switch: float | None = None
        self.held_bytes = 0
        self.error: str | None = None
        self.tmp: Path | None = None
        self.fd: int | None = None
        self._file = None
        self._claimed = False

    def start(self) -> Prequantizer:
        # the threads release the GIL for every C call and write, and need it back after each;
        # the main thread captures the graph in Python meanwhile and would keep them waiting up to
        # the switch interval (5 ms) every time
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, 0.0005))
        for t in self._threads:
            t.start()
        return self

    def begin_file(self, out: str | os.PathLike) -> None:
        """Create the output's temporary file, sized for the slots at offset 0; finished tensors go
        into their slots from now on. The writer later inserts the header in front of them
        (``fileio.insert_range``), which moves the slots without copying them."""
        if self._stop.is_set() or self.tmp is not None or not self.slots:
            return
        tmp, fd = fileio.create_tmp(Path(out))
        try:
            os.ftruncate(fd, self.slots_nbytes)
            self._file = fileio.TensorFile(tmp, fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self.tmp, self.fd = tmp, fd
        self._file_ready.set()

    def stop(self) -> None:
        """No new work; the tensor being quantized is dropped at its next chunk, the one being
        written finishes. Waits for both threads."""
        self._stop.set()
        self._finished.put(None)
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join()
        if self._switch is not None:
            sys.setswitchinterval(self._switch)
            self._switch = None

    def wait(self) -> None:
        """Until every tensor is quantized (and, with a file, written); does not stop anything."""
        for t in self._threads:
            if t.is_alive():
                t.join()

    def take(self, key: str, qtype: int) -> np.ndarray | None:
        """The finished bytes of checkpoint tensor ``key`` as ``qtype`` (each handed out once), or None."""
        self.stop()
        if int(qtype) != self.qtype:
            return None
        with self._lock:
            return self._done.pop(key, None)

    def finished(self) -> list[str]:
        """The checkpoint names whose bytes are ready (and not yet handed out)."""
        with self._lock:
            return list(self._done)

    def on_disk(self, key: str) -> bool:
        """True when ``key``'s slot in the file holds its (checkpoint row order) bytes."""
        self.stop()
        return key in self._on_disk

    def claim(self) -> tuple[Path, int] | None:
        """The temporary file and its descriptor, now the caller's (None: no file was begun)."""
        self.stop()
        if self.tmp is None or self._claimed:
            return None
        self._claimed = True
        self._file.close()
        return self.tmp, self.fd

    def discard_file(self) -> None:
        """Remove the temporary file unless it was claimed (the in-memory results stay)."""
        self.stop()
        if self.tmp is not None and not self._claimed:
            self._claimed = True
            self._on_disk.clear()
            self._file.close()
            os.close(self.fd)
            self.tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop, drop the results, and remove the temporary file unless it was claimed."""
        self.discard_file()
        with self._lock:
            self._done.clear()
            self.held_bytes = 0

    def _quantize_all(self) -> None:
        _yield_cpu()
        try:
            lib = _cquants.library()
            if lib is None:
                self.error = f"C quantizers unavailable: {_cquants.unavailable_reason()}"
                return
            maps: dict[Path, mmap.mmap] = {}
            try:
                for e, slot in zip(self._todo, self.slots):
                    if self._stop.is_set():
                        break
                    if self.held_bytes + slot.nbytes > self.max_bytes:
                        continue
                    if e.file not in maps:
                        with open(e.file, "rb") as f:
                            maps[e.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    arr = self._quantize(lib, maps[e.file], e, slot)
                    if arr is not None:
                        with self._lock:
                            self._done[e.key] = arr
                            self.held_bytes += arr.nbytes
                        self._finished.put(slot)
            finally:
                for m in maps.values():
                    try:
                        m.close()
                    except BufferError:  # pragma: no cover - a view is still alive; the GC closes it
                        pass
        except Exception as e:  # noqa: BLE001 - speculation only: the writer does the work instead
            self.error = f"{type(e).__name__}: {e}"
            logger.info("export pre-quantization stopped: %s", self.error)
        finally:
            self._finished.put(None)

    def _write_all(self) -> None:
        """Each finished tensor into its slot, while the quantizer goes on with the next."""
        _yield_cpu()
        try:
            while True:
                slot = self._finished.get()
                if slot is None or self._stop.is_set():
                    return
                if not self._file_ready.is_set():
                    continue
                with self._lock:
                    arr = self._done.get(slot.key)
                if arr is None:
                    continue
                # the array's memory is laid out like its pages in the file (see _quantize)
                self._file.write(arr, slot.offset, direct=True)
                self._on_disk.add(slot.key)
        except Exception as e:  # noqa: BLE001 - speculation only
            self.error = f"{type(e).__name__}: {e}"
            logger.info("export pre-writing stopped: %s", self.error)

    def _quantize(self, lib, mm: mmap.mmap, e: _Entry, slot: Slot) -> np.ndarray | None:
        block, size = _BLOCKS[self.qtype]
        rows, cols = e.shape
        n_blocks = rows * cols // block
        src_view = np.frombuffer(mm, dtype=np.uint8, count=e.nbytes, offset=e.start)
        # page-aligned where the slot's file pages begin: the writer sends it with O_DIRECT as it is
        head = slot.offset % fileio.PAGE
        buf = mmap.mmap(-1, -(-(head + slot.nbytes) // fileio.PAGE) * fileio.PAGE)
        out = np.frombuffer(buf, np.uint8, count=slot.nbytes, offset=head)
        src, dst = src_view.ctypes.data, out.ctypes.data
        try:
            for first in range(0, n_blocks, _CHUNK_BLOCKS):
                if self._stop.is_set():
                    return None
                n = min(_CHUNK_BLOCKS, n_blocks - first)
                # the C function indexes the source by block: src + first*block elements
                if _cquants.quantize_blocks(lib, self.qtype, src, _SRC_TYPES[e.dtype], dst + first * size, first, n) != -1:
                    return None  # non-finite values: the writer reports them
        finally:
            del src_view
        return out.reshape(rows, cols // block * size)


def _yield_cpu() -> None:
    """This thread at a lower scheduling priority (Linux: nice is per thread): the speculation
    should take the cores the capture leaves idle, not time from the capture itself."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or not permitted
        pass


def _quantized_nbytes(shape: tuple[int, ...], qtype: int) -> int:
    block, size = _BLOCKS[qtype]
    return shape[0] * shape[1] // block * size


def _default_budget() -> int:
    """A quarter of the available memory, at most 8 GiB (2 GiB where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(8 << 30, int(line.split()[1]) * 1024 // 4)
    except OSError:
        pass
    return 2 << 30


def start_for(directory: str | os.PathLike, file_type_name: str, out: str | os.PathLike | None = None) -> Prequantizer | None:
    """A started :class:`Prequantizer` for exporting ``directory`` as ``file_type_name`` (writing its
    slots into a temporary file next to ``out`` when given), or None where it cannot help
    (disabled, a type without C quantizers, no readable safetensors)."""
    if not enabled():
        return None
    from graphtune.export import recipes

    qtype = int(recipes.file_type(file_type_name).default_type)
    if qtype not in _BLOCKS:
        return None
    try:
        pre = Prequantizer(directory, qtype)
    except (OSError, ValueError) as e:
        logger.info("export pre-quantization not started: %s", e)
        return None
    if not pre.slots:
        return None
    if out is not None:
        try:
            pre.begin_file(out)
        except OSError as e:
            logger.info("export pre-quantization keeps its results in memory: %s", e)
    return pre.start()
