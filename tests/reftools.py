"""Reference tools used as test oracles, built on demand and cached.

- ``siftool`` and ``sifref``: the reference SIF implementation (sylabs/sif, Debian's
  golang-github-sylabs-sif-dev), built offline from ``tests/reference/`` (see docs/testing.md).
- the real ``cryptsetup`` for LUKS2 volumes (``luksFormat`` and offline ``reencrypt --encrypt``
  work on plain files, without device-mapper).
"""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SPANK_SIF_TEST_CACHE", REPO / ".cache"))
REFERENCE = REPO / "tests" / "reference"
SIF_TEST_IMAGES = Path("/usr/share/gocode/src/github.com/sylabs/sif/test/images")

# Cheap KDF parameters so that tests which do not study the KDF itself stay fast.
FAST_PBKDF = ["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768",
              "--pbkdf-parallel", "1"]


def reference_digest() -> str:
    """Changes whenever what builds the reference tools changes (Go sources, go.mod, build.sh)."""
    h = hashlib.sha256()
    for path in sorted(REFERENCE.rglob("*")):
        if path.suffix in (".go", ".mod", ".sh"):
            h.update(f"{path.relative_to(REFERENCE)}\0{path.stat().st_size}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def reftools() -> tuple[Path, Path]:
    """Return the paths of (siftool, sifref), building them once into the cache."""
    out = CACHE / "reftools"
    siftool, sifref = out / "siftool", out / "sifref"
    stamp, digest = out / "built-from", reference_digest()
    if not (siftool.exists() and sifref.exists() and stamp.exists() and stamp.read_text() == digest):
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GOCACHE=str(CACHE / "gocache"), HOME=str(CACHE))
        subprocess.run(["bash", str(REFERENCE / "build.sh"), str(out)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        stamp.write_text(digest)
    return siftool, sifref


def run(*argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    return subprocess.run([str(a) for a in argv], **kw)


def make_squashfs(tree: Path, out: Path, files: dict[str, bytes] | None = None) -> Path:
    """Squash ``tree`` (created with ``files`` if given) into ``out`` with mksquashfs."""
    for name, data in (files or {}).items():
        p = tree / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    run("mksquashfs", tree, out, "-noappend", "-quiet", "-all-root")
    return out


def luks_format(path: Path, key: bytes, size: int, *extra: str, fast: bool = True) -> Path:
    """An empty LUKS2 volume of ``size`` bytes made by the real ``cryptsetup luksFormat``."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    keyfile = path.with_suffix(".keyfile")
    keyfile.write_bytes(key)
    try:
        run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *(FAST_PBKDF if fast else []),
            *extra, "--key-file", keyfile, path)
    finally:
        keyfile.unlink()
    return path


def luks_encrypt_payload(payload: Path, out: Path, key: bytes, *extra: str, fast: bool = True) -> Path:
    """A LUKS2 volume whose data segment holds ``payload``, encrypted by the real cryptsetup with
    offline ``reencrypt --encrypt`` (no device-mapper needed), laid out as Apptainer's builder lays it
    out: 16 MiB of header and keyslots, then exactly the payload's size of data."""
    size = payload.stat().st_size
    shutil.copyfile(payload, out)
    with open(out, "r+b") as f:
        f.truncate(size + 32 * 1024 * 1024)
    keyfile = out.with_suffix(".keyfile")
    keyfile.write_bytes(key)
    try:
        # Reducing by 32 MiB puts the data segment at 16 MiB; the extra 16 MiB at the tail is scratch
        # space for the reencryption, cut off afterwards (the segment is "dynamic": to the device end).
        run("cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "--batch-mode",
            *(FAST_PBKDF if fast else []), *extra, "--reduce-device-size", "32M", "--key-file", keyfile, out)
    finally:
        keyfile.unlink()
    with open(out, "r+b") as f:
        f.truncate(size + 16 * 1024 * 1024)
    return out


def volume_key(volume: Path, key: bytes) -> bytes:
    """The volume key as ``cryptsetup luksDump --dump-volume-key`` reports it (the truth)."""
    keyfile = volume.with_suffix(".dumpkey")
    keyfile.write_bytes(key)
    try:
        out = run("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyfile,
                  volume).stdout.decode()
    finally:
        keyfile.unlink()
    hexdigits = "".join(out.split("MK dump:", 1)[1].split())
    return bytes.fromhex(hexdigits)


def sifref_build(out: Path, part: Path, fs: str = "encrypted", deffile: Path | None = None,
                 pem_pub: Path | None = None, key: Path | None = None, json: dict[str, Path] | None = None,
                 parttype: int = 2, arch: str = "amd64", image_id: str | None = None,
                 created_at: int | None = None) -> Path:
    """An image laid out the way Apptainer's builder lays out (encrypted) images, by the reference library.
    ``image_id`` and ``created_at`` (Unix seconds) fix what would otherwise differ from build to build."""
    _, sifref = reftools()
    argv = [sifref, "build", "-o", out, "-part", part, "-fs", fs, "-parttype", str(parttype), "-arch", arch]
    if image_id:
        argv += ["-id", image_id]
    if created_at is not None:
        argv += ["-time", str(created_at)]
    if deffile:
        argv += ["-deffile", deffile]
    for name, path in (json or {}).items():
        argv += ["-json", f"{name}={path}"]
    if pem_pub:
        argv += ["-pem-pub", pem_pub, "-key", key]
    run(*argv)
    return out
