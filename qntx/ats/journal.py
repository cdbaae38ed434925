"""The attestation journal: one durable, sequential write per group commit.

Owns the file ``<store>/journal`` and nothing else. The ATS actor acknowledges an
attestation once its group is here and synced; the store's indexes are written
behind it, in bigger LMDB transactions, and the journal is replayed into them on
open, so a crash at any instant loses nothing acknowledged.

Why a file and not another LMDB transaction: one synced LMDB commit writes the
dirty pages of every B-tree it touched and then its meta page, two syncs; a write
into a file whose blocks already exist is one ``fdatasync`` of one or two pages
(``bin/bench ats`` prints both rates). The file is opened ``O_DSYNC``, so the
write is the sync. The file is zero-filled ahead of the writes,
so a sync never has to record a new file size or block allocation as well.

Layout: entries one after the other from offset 0, each a header
(magic, first sequence number, record count, body length, CRC-32 of header and
body) and a body of length-prefixed MessagePack records. Reading stops at the first
entry that is torn, has a bad checksum or does not continue the sequence, so a
half-written last group (never acknowledged) is ignored. Once every entry is in
the indexes (a synced LMDB commit), writing starts again at offset 0; entries left
further on from an earlier pass carry lower sequence numbers and end the read.

One process writes the journal: it holds an exclusive ``flock`` on it for as long
as it has it open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from qntx.errors import Unavailable

_MAGIC = b"QJ01"
_HEADER = struct.Struct(">4sQII")  # magic, first seq, count, body length
_CRC = struct.Struct(">I")
_LEN = struct.Struct(">I")
ENTRY_OVERHEAD = _HEADER.size + _CRC.size
INITIAL_BYTES = 1 << 20
_ZEROS = bytes(1 << 20)


class Journal:
    """An open journal file; ``append`` is durable when it returns (if ``sync``)."""

    def __init__(self, path: Path, *, sync: bool = True, wait: bool = False):
        """Open (creating) and lock the journal. Raises ``Unavailable`` when another
        process holds it, unless ``wait``."""
        self.path = path
        self._sync = sync
        # O_DSYNC: each write is durable when it returns, one syscall instead of two.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_DSYNC if sync else 0)
        self._fd = os.open(path, flags, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self._fd)
            raise Unavailable(f"the attestation journal {path} is in use by another process") from None
        self._size = os.fstat(self._fd).st_size
        self._offset = 0  # where the next entry goes; set past the valid entries by read_all
        if self._size < INITIAL_BYTES:
            try:
                self._fill(INITIAL_BYTES)
            except BaseException:  # (a full disk) no half-open journal keeps the lock
                self.close()
                raise

    def read_all(self) -> Iterator[tuple[int, list[bytes]]]:
        """Every valid entry in order, as (first seq, record blobs); afterwards appends
        go right behind the last of them."""
        data = _read_whole(self._fd, self._size)
        offset, expected = 0, None
        while offset + ENTRY_OVERHEAD <= len(data):
            magic, first, count, length = _HEADER.unpack_from(data, offset)
            end = offset + _HEADER.size + length
            if magic != _MAGIC or end + _CRC.size > len(data) or (expected is not None and first != expected):
                break
            (crc,) = _CRC.unpack_from(data, end)
            if crc != zlib.crc32(data[offset:end]):
                break
            blobs, at = [], offset + _HEADER.size
            for _ in range(count):
                (size,) = _LEN.unpack_from(data, at)
                blobs.append(data[at + _LEN.size : at + _LEN.size + size])
                at += _LEN.size + size
            yield first, blobs
            offset, expected = end + _CRC.size, first + count
        self._offset = offset

    def append(self, first_seq: int, blobs: list[bytes]) -> None:
        """Write one entry behind the last and sync it. The caller makes room first
        (``fits``/``rewind``/``grow``)."""
        parts = []
        for blob in blobs:
            parts += (_LEN.pack(len(blob)), blob)
        body = b"".join(parts)
        head = _HEADER.pack(_MAGIC, first_seq, len(blobs), len(body))
        crc = zlib.crc32(body, zlib.crc32(head))
        entry = b"".join((head, body, _CRC.pack(crc)))
        if self._offset + len(entry) > self._size:
            raise ValueError("journal entry does not fit; make room first")
        view = memoryview(entry)
        at = self._offset
        try:
            while view:
                written = os.pwrite(self._fd, view, at)
                view, at = view[written:], at + written
        except OSError as exc:  # nothing acknowledged: the entry ends the journal unread
            raise Unavailable(f"{self.path}: write failed: {exc}") from None
        self._offset = at

    @staticmethod
    def entry_size(blobs: list[bytes]) -> int:
        return ENTRY_OVERHEAD + sum(_LEN.size + len(b) for b in blobs)

    def fits(self, size: int) -> bool:
        return self._offset + size <= self._size

    @property
    def size(self) -> int:
        return self._size

    @property
    def empty(self) -> bool:
        return self._offset == 0

    def rewind(self) -> None:
        """Write from offset 0 again: only once every entry is safely in the indexes."""
        self._offset = 0

    def grow(self, size: int) -> None:
        """Make room for an entry of ``size`` bytes at the current offset."""
        want = self._size
        while self._offset + size > want:
            want *= 2
        self._fill(want)

    def _fill(self, size: int) -> None:
        """Zero-fill the file up to ``size`` bytes and sync it, size and all."""
        at = self._size
        try:
            while at < size:
                at += os.pwrite(self._fd, _ZEROS[: size - at], at)
            os.fsync(self._fd)
        except OSError as exc:
            os.ftruncate(self._fd, self._size)  # give back what the failed fill took
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Unavailable(f"disk full: no room to grow the journal {self.path}") from None
            raise Unavailable(f"{self.path}: write failed: {exc}") from None
        self._size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1


def _read_whole(fd: int, size: int) -> bytes:
    parts, at = [], 0
    while at < size:
        chunk = os.pread(fd, size - at, at)
        if not chunk:
            break
        parts.append(chunk)
        at += len(chunk)
    return b"".join(parts)
