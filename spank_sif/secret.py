"""Secret: key material in a buffer that can be wiped.

Its own module because every layer holds secrets (the key variables, the unwrapped PEM key, LUKS2
volume keys), and the format layer must not import the key-source layer (which knows the site's
key variables) just to hold one.
"""


class Secret:
    """Owns secret bytes in a bytearray; ``wipe()`` (or leaving the ``with`` block) zeroes them.

    Python cannot zero the immutable copies libraries make on the way (cryptography's integers,
    its own buffers): this limits the damage, it does not prevent copies. Where a key passes
    through such a library the work is done in a child process that exits
    (``keys.unwrap_in_child``), and slurmstepd holds keys inside ``Undumpable``."""

    __slots__ = ("_buf", "_wiped")

    def __init__(self, data=b""):
        # Adopt a bytearray as is (no second copy to forget); copy anything else.
        self._buf = data if isinstance(data, bytearray) else bytearray(data)
        self._wiped = False

    @property
    def value(self) -> bytearray:
        if self._wiped:
            raise ValueError("secret already wiped")
        return self._buf

    def wipe(self) -> None:
        wipe(self._buf)
        self._wiped = True

    def __len__(self):
        return len(self._buf)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.wipe()

    def __del__(self):
        self.wipe()

    def __repr__(self):
        return f"<Secret {len(self._buf)} bytes{' wiped' if self._wiped else ''}>"

    __str__ = __repr__

    def __reduce__(self):  # never pickled into a file or another process by accident
        raise TypeError("a Secret cannot be pickled")


def buffer(key) -> bytes | bytearray | memoryview:
    """The bytes of ``key``, a Secret or a bytes-like object (without copying a Secret)."""
    return key.value if isinstance(key, Secret) else key


def wipe(data: bytearray) -> None:
    """Zero a bytearray in place (a buffer that held key material on its way somewhere). Through a
    memoryview: that works while the buffer is exported (cffi, another view), a slice assignment
    on the bytearray itself would not."""
    with memoryview(data) as view:
        view[:] = bytes(len(data))


def wipe_bytes(data: bytes) -> None:
    """Zero an immutable ``bytes`` that a library handed back holding key material (a decrypted RSA
    block, a DER-encoded private key), once it is no longer used.

    Python offers no way to do this; the object's own buffer is overwritten in place through the
    pointer ctypes gives for it. Only for objects the caller alone holds: never one that may be
    shared (CPython shares the empty and the one-byte objects, so those are left alone; they hold
    no key anyway)."""
    if type(data) is not bytes or len(data) < 2:
        return
    import ctypes  # only where a key is unwrapped
    ctypes.memset(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p), 0, len(data))


PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4


class Undumpable:
    """``with Undumpable():`` this process writes no core dump while the block runs (and only
    processes with CAP_SYS_PTRACE may read its memory or ptrace it): for the time it holds a key.

    Python leaves copies of a key where no ``wipe`` reaches (the immutable objects libraries make
    on the way, freed memory not yet reused); a core dump of slurmstepd would write them to disk.
    The previous setting comes back afterwards: slurmstepd wants its core dumps for later, and the
    flag also decides who owns the process's /proc files. (A setting of 2, "dump readable by root
    only", cannot be set back through prctl; the process then stays at 0, the safer side.)"""

    __slots__ = ("_previous",)

    def __enter__(self):
        self._previous = make_undumpable()
        return self

    def __exit__(self, *exc):
        if self._previous in (0, 1):
            _prctl(PR_SET_DUMPABLE, self._previous)


def make_undumpable() -> int:
    """Make this process not dumpable (for good, unless set back); the previous setting."""
    previous = _prctl(PR_GET_DUMPABLE, 0)
    if _prctl(PR_SET_DUMPABLE, 0) != 0:
        raise OSError("prctl(PR_SET_DUMPABLE, 0) failed")
    return previous


def dumpable() -> int:
    """This process's dumpable setting, as the kernel has it (0, 1 or 2)."""
    return _prctl(PR_GET_DUMPABLE, 0)


def _prctl(option: int, value: int) -> int:
    import ctypes  # only where a key is handled
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0))
