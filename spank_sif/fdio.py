"""Positional reads from a descriptor someone else opened (an image opened as the job's user).

One rule for every parser of hostile files: read exactly what was asked for, or fail with an
``ImageError`` that says what could not be read and where the file ended. Short reads are legal
(the kernel may return less than asked), so keep reading until the length or the end of the file.
"""
import os

from spank_sif.errors import ImageError

CHUNK = 1 << 24  # one pread at most: bounds a single allocation whatever a header claims


def read_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    """``length`` bytes at ``offset``; ``what`` names them in messages ("image.sif: the header")."""
    chunks, done = [], 0
    while done < length:
        try:
            chunk = os.pread(fd, min(length - done, CHUNK), offset + done)
        except OSError as exc:
            raise ImageError(f"cannot read {what}: {exc.strerror}") from exc
        if not chunk:
            raise ImageError(f"{what} [{offset}, {offset + length}) is cut short at byte {offset + done}: "
                             "the file is truncated or changed while being read")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)
