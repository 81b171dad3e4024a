"""What every target shares: the verdict on one input, and a scratch file to hand parsers an fd."""
import os

from spank_sif.errors import SifError


class Finding(AssertionError):
    """An invariant of the code under test does not hold (raised, so the fuzzer reports it)."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Finding(what)


def outcome(call) -> str:
    """Run ``call()``: "ok", or the name of the SifError subclass it raised. A SifError must be a
    subclass (errors are typed) with a one-line message; any other exception propagates."""
    try:
        call()
    except SifError as err:
        check(type(err) is not SifError, f"bare SifError raised: {err}")
        message = str(err)
        check(bool(message) and "\n" not in message, f"{type(err).__name__} without a one-line message")
        return type(err).__name__
    return "ok"


_scratch = None


def scratch_file(data: bytes, size: int | None = None) -> int:
    """A file descriptor (one memfd, reused) holding ``data``, extended with a hole to ``size``."""
    global _scratch
    if _scratch is None:
        _scratch = os.memfd_create("spank-sif-fuzz", os.MFD_CLOEXEC)
    os.ftruncate(_scratch, 0)
    os.ftruncate(_scratch, max(len(data), size or 0))
    view = memoryview(data)
    while view:
        view = view[os.pwrite(_scratch, view, len(data) - len(view)):]
    return _scratch
