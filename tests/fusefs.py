"""A minimal read-only FUSE file system serving one file, for tests (root: it mounts with mount(2)).

It reports whatever owner and mode it is told, as any FUSE server may: what it serves is decided
by a user-space process, which is what the kernel_mount policy must not trust.

    with FuseFile(mountpoint, data, uid=0, mode=0o644) as path:   # path = mountpoint/app.sif
        ...
"""
import ctypes
import errno
import os
import struct
import threading

IN_HEADER = struct.Struct("=IIQQIIIHH")        # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("=IiQ")             # len, error, unique
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")      # ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev blksize flags
LOOKUP, FORGET, GETATTR, OPEN, READ, STATFS, RELEASE, FLUSH, INIT, OPENDIR, RELEASEDIR, DESTROY, \
    BATCH_FORGET = 1, 2, 3, 14, 15, 17, 18, 25, 26, 27, 29, 38, 42
NAME = "app.sif"
MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2


class FuseFile:
    def __init__(self, mountpoint, data: bytes, uid: int = 0, mode: int = 0o644):
        self.mountpoint, self.data, self.uid, self.mode = str(mountpoint), data, uid, mode
        self.fd, self.thread = -1, None

    def __enter__(self) -> str:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if libc.mount(b"spank-sif-test", self.mountpoint.encode(), b"fuse", MS_NOSUID | MS_NODEV, options):
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, os.strerror(err))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return os.path.join(self.mountpoint, NAME)

    def __exit__(self, *exc):
        ctypes.CDLL(None).umount2(self.mountpoint.encode(), MNT_DETACH)
        os.close(self.fd)
        self.thread.join(10)

    def _attr(self, node: int) -> bytes:
        if node == 1:
            return ATTR.pack(1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
        return ATTR.pack(2, len(self.data), (len(self.data) + 511) // 512, 0, 0, 0, 0, 0, 0,
                         0o100000 | self.mode, 1, self.uid, 0, 0, 4096, 0)

    def _answer(self, opcode: int, node: int, body: bytes):
        """(error, payload) for a request; None for requests that get no reply."""
        if opcode in (FORGET, BATCH_FORGET):
            return None
        if opcode == INIT:
            major, minor, readahead, flags = struct.unpack_from("=IIII", body)
            return 0, struct.pack("=IIIIHHIIHHI7I", 7, min(minor, 31), readahead, 0, 16, 12, 131072, 1,
                                  32, 0, 0, *[0] * 7)
        if opcode == LOOKUP:
            if body.rstrip(b"\0").decode() != NAME or node != 1:
                return -errno.ENOENT, b""
            return 0, struct.pack("=QQQQII", 2, 0, 3600, 3600, 0, 0) + self._attr(2)
        if opcode == GETATTR:
            return 0, struct.pack("=QII", 3600, 0, 0) + self._attr(node)
        if opcode in (OPEN, OPENDIR):
            return 0, struct.pack("=QII", 0, 0, 0)
        if opcode == READ:
            _, offset, size = struct.unpack_from("=QQI", body)
            return 0, self.data[offset:offset + size]
        if opcode == STATFS:
            return 0, struct.pack("=QQQQQIIII6I", 0, 0, 0, 0, 0, 4096, 255, 4096, 0, *[0] * 6)
        if opcode in (RELEASE, RELEASEDIR, FLUSH, DESTROY):
            return 0, b""
        return -errno.ENOSYS, b""

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self.fd, 135168)
            except OSError:  # ENODEV: unmounted
                return
            _, opcode, unique, node, *_ = IN_HEADER.unpack_from(request)
            answer = self._answer(opcode, node, request[IN_HEADER.size:])
            if answer is None:
                continue
            error, payload = answer
            try:
                os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload)
            except OSError:  # the request was interrupted meanwhile
                continue
