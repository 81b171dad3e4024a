"""libcryptsetup in-process (cffi, ABI mode: no compiler needed on the nodes): a LUKS2 header that
the library loaded from this process's own snapshot, the costs it will run, key checks, activation.

What is checked is exactly what runs. The parts of the volume libcryptsetup reads to choose a
header copy (``luks2.header_ranges``) are copied, from the descriptor the user opened, into a memfd
of the volume's size (the rest left as holes) that only this process holds. libcryptsetup loads it
as a detached header, so it settles disagreeing header copies itself, exactly as it would on the
file, and then says what it will run: ``crypt_dump_json`` (the metadata of the copy it chose) and
``crypt_keyslot_get_pbkdf`` (each keyslot's KDF). That view is validated (``luks2.validate``) and
held against the site's caps (``luks2.affordable_keyslots``) before any derivation; the key
material of the keyslots allowed to run is copied in and the snapshot sealed. Key checks and
activation then use this same loaded header (the loop device is only the data device), so nothing
the user does to the file afterwards changes what runs.

Reading the user's file may be slow (a stalling file system): it all happens when a ``Header`` is
made, before any lock. The same code serves verify-key, as the user: loading a memfd needs no
privilege, and metadata locking (files under /run/cryptsetup, root's) is off, as it is pointless
on a snapshot nobody else can reach.
"""
import contextlib
import errno
import fcntl
import json
import os

from spank_sif import luks2
from spank_sif.errors import ImageError, SifError, SystemSetupError, UnsupportedImageError
from spank_sif.fdio import read_exact
from spank_sif.secret import Secret, buffer

LIBRARY = "libcryptsetup.so.12"
CRYPT_ACTIVATE_READONLY = 1 << 0
CRYPT_LOG_ERROR = 1
# Header copies (at most 8 MiB) plus the key material of every keyslot: a volume needing more is
# not one cryptsetup made.
SNAPSHOT_MAX = 32 << 20
_SEALS = ("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE")

_CDEF = """
struct crypt_device;
struct crypt_pbkdf_type {
    const char *type; const char *hash; uint32_t time_ms; uint32_t iterations;
    uint32_t max_memory_kb; uint32_t parallel_threads; uint32_t flags;
};
int crypt_init(struct crypt_device **cd, const char *device);
int crypt_load(struct crypt_device *cd, const char *requested_type, void *params);
int crypt_dump_json(struct crypt_device *cd, const char **json, uint32_t flags);
int crypt_keyslot_get_pbkdf(struct crypt_device *cd, int keyslot, struct crypt_pbkdf_type *pbkdf);
int crypt_volume_key_get(struct crypt_device *cd, int keyslot, char *volume_key, size_t *volume_key_size,
                         const char *passphrase, size_t passphrase_size);
int crypt_set_data_device(struct crypt_device *cd, const char *device);
int crypt_activate_by_volume_key(struct crypt_device *cd, const char *name, const char *volume_key,
                                 size_t volume_key_size, uint32_t flags);
int crypt_deactivate_by_name(struct crypt_device *cd, const char *name, uint32_t flags);
int crypt_metadata_locking(struct crypt_device *cd, int enable);
void crypt_free(struct crypt_device *cd);
void crypt_set_log_callback(struct crypt_device *cd,
                            void (*log)(int level, const char *msg, void *usrptr), void *usrptr);
"""


def open_library(path: str = LIBRARY):
    """``(ffi, lib)`` for the libcryptsetup at ``path`` (OSError or ImportError if it cannot be
    loaded). Functions resolve on first use: ``spank-sif doctor`` checks each one."""
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(path)


class _Library:
    """libcryptsetup loaded and set up once per process (None if it cannot be loaded), with one
    log callback that keeps the library's error messages for ours (and off any stderr)."""

    loaded = None
    tried = False
    messages: list = []

    @classmethod
    def get(cls):
        if not cls.tried:
            cls.tried = True
            try:
                ffi, lib = open_library()
            except (OSError, ImportError):
                return None

            @ffi.callback("void(int, const char *, void *)")
            def keep(level, msg, _usrptr):
                if level == CRYPT_LOG_ERROR and msg != ffi.NULL:
                    del cls.messages[:-7]
                    cls.messages.append(ffi.string(msg).decode(errors="replace").strip())

            lib.crypt_set_log_callback(ffi.NULL, keep, ffi.NULL)
            lib.crypt_metadata_locking(ffi.NULL, 0)
            cls.loaded = (ffi, lib, keep)
        return cls.loaded and cls.loaded[:2]


def library():
    """``(ffi, lib)``, or SystemSetupError naming the package to install."""
    loaded = _Library.get()
    if loaded is None:
        raise SystemSetupError(f"libcryptsetup ({LIBRARY}) cannot be loaded on this machine: ask your admin "
                               "to install cryptsetup's library (Debian: libcryptsetup12)")
    return loaded


def _last_message(rc: int, path: str) -> str:
    """libcryptsetup's last error message (the snapshot's /proc path left out), else strerror."""
    text = _Library.messages[-1] if _Library.messages else os.strerror(-rc)
    return text.replace(f"Device {path} ", "The header ").replace(path, "the header")


def operation_error(err: int, detail: str, what: str) -> SifError:
    """A failed libcryptsetup call (``err`` an errno) as the error a person should see."""
    if err == errno.ENOMEM:
        return SystemSetupError(f"not enough memory on this node to {what} ({detail}): ask your admin "
                                "(kdf_max_parallel, kdf_max_memory_kib) or use a node with more memory")
    if err in (errno.EINVAL, errno.ENOTSUP, errno.ENOENT):
        return UnsupportedImageError(f"libcryptsetup cannot {what}: {detail}")
    if err == errno.EEXIST:
        return SystemSetupError(f"a device-mapper device of that name already exists: {detail}")
    return SystemSetupError(f"libcryptsetup cannot {what}: {detail}")


class Header:
    """The LUKS2 header of the volume of ``size`` bytes at ``offset`` in ``fd``, as libcryptsetup
    loaded it from a private snapshot; refused (PolicyError) if no keyslot fits ``caps``.

    ``volume`` is libcryptsetup's view (the copy it chose), validated; ``allowed`` the keyslots
    that may run, in its order. ``unlock`` checks a passphrase, ``activate`` maps the volume.
    Close it (or use ``with``): it holds the library's device and the snapshot."""

    def __init__(self, fd: int, offset: int, size: int, caps: luks2.KdfCaps = luks2.NO_CAPS):
        self.caps, self._cd = caps, None
        self._memfd = os.memfd_create("spank-sif-luks2-header", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.path = f"/proc/self/fd/{self._memfd}"
        self._copied = 0
        try:
            self._size(size)
            for start, length in luks2.header_ranges(fd, offset, size):
                self._copy(fd, offset, start, length, "header")
            self._load()
            self.volume = self._view(offset, size)
            self.allowed = luks2.affordable_keyslots(self.volume, caps)
            for keyslot in self.allowed:
                start, length = luks2.keyslot_material(keyslot)
                self._copy(fd, offset, start, min(length, size - start), f"keyslot {keyslot.id} area")
            fcntl.fcntl(self._memfd, fcntl.F_ADD_SEALS,
                        sum(getattr(fcntl, seal) for seal in _SEALS))
        except BaseException:
            self.close()
            raise

    def _size(self, size: int) -> None:
        """The snapshot is as large as the volume, as the file would be (libcryptsetup checks the
        size against the metadata); all but the copied parts are holes, which take no memory."""
        try:
            os.ftruncate(self._memfd, max(size, 0))
        except OSError as exc:  # a file size limit (ulimit -f) counts holes too
            raise SystemSetupError(f"cannot make a {size}-byte copy of the image's LUKS2 header in memory: "
                                   f"{exc.strerror} (is a file size limit set, ulimit -f?)") from exc

    def _copy(self, fd: int, offset: int, start: int, length: int, what: str) -> None:
        self._copied += length
        if self._copied > SNAPSHOT_MAX:
            raise ImageError(f"the LUKS2 header and keyslots need more than {SNAPSHOT_MAX} bytes: not a "
                             "volume cryptsetup makes")
        data = read_exact(fd, length, offset + start, f"the LUKS2 {what}")
        view = memoryview(data)
        while view:
            view = view[os.pwrite(self._memfd, view, start + len(data) - len(view)):]

    def _load(self) -> None:
        ffi, lib = library()
        cd = ffi.new("struct crypt_device **")
        _Library.messages.clear()
        rc = lib.crypt_init(cd, self.path.encode())
        if rc < 0:
            raise SystemSetupError(f"libcryptsetup cannot open its copy of the header: {os.strerror(-rc)}")
        self._cd = cd[0]
        rc = lib.crypt_load(self._cd, b"LUKS2", ffi.NULL)
        if rc < 0:
            # Our own reader usually says better what is wrong (checksums, sizes, JSON).
            luks2.read_luks2(self._memfd, 0, os.fstat(self._memfd).st_size)
            raise UnsupportedImageError("libcryptsetup refuses the image's LUKS2 header: "
                                        f"{_last_message(rc, self.path)}")

    def _view(self, offset: int, size: int) -> luks2.Luks2Volume:
        """What libcryptsetup will run: the metadata of the copy it chose, validated, and every
        candidate keyslot's KDF as the library reads it."""
        ffi, lib = library()
        text = ffi.new("const char **")
        rc = lib.crypt_dump_json(self._cd, text, 0)
        if rc < 0:
            raise SystemSetupError(f"libcryptsetup cannot show the header it loaded: {os.strerror(-rc)}")
        try:
            metadata = json.loads(ffi.string(text[0]).decode())
        except ValueError:  # bytes that are not UTF-8 JSON: no copy spank-sif reads can match them
            metadata = None
        chosen = [c for c in luks2.header_copies(self._memfd, 0, size) if c[2] == metadata]
        if not chosen:
            raise ImageError("the LUKS2 header copy libcryptsetup uses does not read the same to spank-sif: "
                             "refusing an ambiguous header")
        name, fields, _ = chosen[0]
        volume = luks2.validate(fields, metadata, name, offset, size)
        pbkdf = ffi.new("struct crypt_pbkdf_type *")
        for keyslot in luks2.keyslot_order(volume):
            rc = lib.crypt_keyslot_get_pbkdf(self._cd, keyslot.id, pbkdf)
            kind = ffi.string(pbkdf.type).decode() if rc >= 0 and pbkdf.type != ffi.NULL else ""
            runs = (luks2.KdfCost(kind, iterations=pbkdf.iterations) if kind == "pbkdf2" else
                    luks2.KdfCost(kind, memory_kib=pbkdf.max_memory_kb, time=pbkdf.iterations,
                                  threads=pbkdf.parallel_threads))
            if runs != keyslot.kdf:
                raise ImageError(f"libcryptsetup would run keyslot {keyslot.id}'s key derivation as "
                                 f"{runs.describe() if kind else 'unknown'}, its metadata says "
                                 f"{keyslot.kdf.describe()}: refusing an ambiguous header")
        return volume

    def unlock(self, passphrase, guard=None) -> tuple:
        """``(keyslot id, volume key Secret)`` for the first allowed keyslot ``passphrase``
        (bytes-like or Secret) opens; each derivation runs inside ``guard(keyslot)`` if given.
        Raises ``luks2.no_keyslot_opened``'s error if none does."""
        for keyslot in self.allowed:
            with guard(keyslot) if guard else contextlib.nullcontext():
                volume_key = self._volume_key(keyslot, passphrase)
            if volume_key is not None:
                return keyslot.id, volume_key
        raise luks2.no_keyslot_opened(self.volume, self.caps)

    def _volume_key(self, keyslot: luks2.Keyslot, passphrase) -> Secret | None:
        """The key derivation, the keyslot's material and the digest check, in the library."""
        ffi, lib = library()
        secret = buffer(passphrase)
        volume_key = Secret(bytearray(keyslot.key_size))
        size = ffi.new("size_t *", keyslot.key_size)
        _Library.messages.clear()
        rc = lib.crypt_volume_key_get(self._cd, keyslot.id, ffi.from_buffer(volume_key.value, require_writable=True),
                                      size, ffi.from_buffer("char[]", secret), len(secret))
        if rc >= 0 and size[0] == keyslot.key_size:
            return volume_key
        volume_key.wipe()
        if rc in (-errno.EPERM, -errno.ENOENT):
            return None  # a wrong key for this keyslot: libcryptsetup tries the next one too
        raise operation_error(-rc if rc < 0 else errno.EINVAL, _last_message(rc, self.path),
                              f"open keyslot {keyslot.id}")

    def activate(self, data_device: str, name: str, volume_key) -> None:
        """Map the volume read-only as ``name``, with ``data_device`` holding its data (the header
        stays this snapshot)."""
        ffi, lib = library()
        _Library.messages.clear()
        rc = lib.crypt_set_data_device(self._cd, data_device.encode())
        if rc >= 0:
            key = buffer(volume_key)
            rc = lib.crypt_activate_by_volume_key(self._cd, name.encode(), ffi.from_buffer("char[]", key),
                                                  len(key), CRYPT_ACTIVATE_READONLY)
        if rc < 0:
            raise operation_error(-rc, _last_message(rc, self.path), "activate the image's LUKS2 volume")

    def close(self) -> None:
        if self._cd is not None:
            library()[1].crypt_free(self._cd)
            self._cd = None
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def deactivate(name: str, flags: int) -> int:
    """``crypt_deactivate_by_name``: 0, or the errno."""
    ffi, lib = library()
    rc = lib.crypt_deactivate_by_name(ffi.NULL, name.encode(), flags)
    return -rc if rc < 0 else 0
