"""Secret: key material in a buffer that can be wiped.

Its own module because every layer holds secrets (the key variables, the unwrapped PEM key, LUKS2
volume keys), and the format layer must not import the key-source layer (which knows the site's
key variables) just to hold one.
"""


class Secret:
    """Owns secret bytes in a bytearray; ``wipe()`` (or leaving the ``with`` block) zeroes them.

    Python cannot zero the immutable copies libraries make on the way (environment strings, a
    file's bytes, OpenSSL's objects): this limits the damage, it does not prevent copies."""

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
        self._buf[:] = bytes(len(self._buf))  # same-length slice assignment zeroes in place
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
