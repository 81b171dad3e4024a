"""spank_sif.spank, the seam to Slurm, on its own: what it does with the buffers Slurm fills and
with the text it hands to Slurm's log and the user's terminal."""
import subprocess

import cffi
import pytest

from spank_sif import spank
from test_plugin_build import PYTHON

KEY = b"-----BEGIN RSA PRIVATE KEY-----" + b"K" * (200 * 1024)  # more than the first buffer holds


class SlurmsGetenv:
    """spank_getenv as Slurm 22.05 has it: strlcpy into the caller's buffer, so a value that does
    not fit leaves its beginning there (ESPANK_NOSPACE). Keeps every buffer it was given."""

    ESPANK_SUCCESS, ESPANK_ENV_NOEXIST, ESPANK_NOSPACE = 0, 3004, 3005

    def __init__(self, ffi, env):
        self.ffi, self.env, self.buffers = ffi, env, []

    def shim_getenv(self, sp, name, buf, size):
        self.buffers.append((buf, size))  # the cdata keeps the caller's bytearray alive
        value = self.env.get(name.decode())
        if value is None:
            return self.ESPANK_ENV_NOEXIST
        kept = value[:size - 1]
        self.ffi.memmove(buf, kept + b"\0", len(kept) + 1)
        return self.ESPANK_NOSPACE if len(value) >= size else self.ESPANK_SUCCESS


@pytest.fixture
def slurm(monkeypatch):
    ffi = cffi.FFI()
    lib = SlurmsGetenv(ffi, {"APPTAINER_ENCRYPTION_PEM_DATA": KEY, "PWD": b"/home/u"})
    monkeypatch.setattr(spank, "_ffi", lambda: ffi)
    monkeypatch.setattr(spank, "_lib", lambda: lib)
    return lib


def test_a_key_variable_comes_as_a_secret_and_leaves_no_buffer_behind(slurm):
    """The value lands in a Secret; every buffer Slurm wrote into, the one abandoned because the
    value did not fit included, is zero afterwards."""
    with spank.getenv_secret(None, "APPTAINER_ENCRYPTION_PEM_DATA") as secret:
        assert bytes(secret.value) == KEY
    assert len(slurm.buffers) == 2  # 64 KiB: too small; 256 KiB
    for buf, size in slurm.buffers:
        assert slurm.ffi.buffer(buf, size)[:] == bytes(size)
    assert spank.getenv_secret(None, "NOT_SET") is None


def test_getenv_still_gives_strings_for_ordinary_variables(slurm):
    assert spank.getenv(None, "PWD") == "/home/u"
    assert all(slurm.ffi.buffer(buf, size)[:] == bytes(size) for buf, size in slurm.buffers)


def test_every_line_leaving_for_slurm_or_the_user_is_printable():
    """Through the real compiled shim (outside Slurm it prints what Slurm would get): a newline
    cannot forge a second line, an escape sequence cannot reach a terminal."""
    code = ("from spank_sif import spank\n"
            "spank.log('error', 'image /a\\nfake line\\x1b[31m')\n"
            "spank.tell_user('told \\x07\\u202e')\n"
            "spank.log_private('private \\x1b]0;title\\x07')\n")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert proc.stderr.splitlines() == ["sif-image: image /a\\x0afake line\\x1b[31m",
                                        "sif-image: told \\x07\\u202e",
                                        "sif-image: private \\x1b]0;title\\x07"]
