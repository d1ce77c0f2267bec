"""TFRecord files without TensorFlow: the converter's workers write their slices themselves.

A TFRecord file is a sequence of framed records: the length (uint64, little endian), its
masked CRC-32C, the bytes, their masked CRC-32C (TensorFlow's ``record_writer.cc``). The
checksums come from ``google-crc32c`` (Google's C implementation); only the framing, a few
lines, is ours. Uncompressed output is byte for byte what ``tf.io.TFRecordWriter`` writes
(a test compares them). Compressed output (``GZIP``) is one gzip member per piece:
concatenated members are one valid gzip file, which ``tf.data.TFRecordDataset(...,
compression_type="GZIP")`` reads through (also tested), so pieces compressed in separate
processes can be joined into a shard without decompressing them.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import google_crc32c

COMPRESSIONS = ("", "GZIP")
_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def write(records, target, compression: str = "") -> None:
    """Writes `records` (bytes), framed, to the open binary file `target`: a piece of a
    TFRecord file that others can be appended to (`append_file`); for ``GZIP`` one gzip
    member. Streamed: no copy of a record is made (1.5 MB a slice; joining copies cost
    more than the checksums)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression:
        # Level 6 is zlib's default, as TensorFlow's writer uses. No file name and mtime 0
        # in the header: a piece is the same bytes wherever and whenever it is written.
        with gzip.GzipFile("", "wb", 6, fileobj=target, mtime=0) as member:
            write(records, member)
        return
    for record in records:
        length = struct.pack("<Q", len(record))
        target.write(length)
        target.write(struct.pack("<I", masked_crc(length)))
        target.write(record)
        target.write(struct.pack("<I", masked_crc(record)))


def append_file(source: Path, target) -> None:
    """Appends the file `source` (pieces from `write`) to `target`, a binary file opened unbuffered
    (``buffering=0``): in the kernel (sendfile) where it can, without copying it through
    Python."""
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        sent = 0
        try:
            while sent < size:
                n = os.sendfile(target.fileno(), f.fileno(), sent, size - sent)
                if n == 0:
                    break
                sent += n
        except OSError:  # no file-to-file sendfile here: copy what is left
            pass
        if sent < size:
            f.seek(sent)
            shutil.copyfileobj(f, target, 1 << 22)
