"""Reference SIF images made inside the VM the way Apptainer makes them, cached across test sessions.

``shared/tools/make-fixtures.sh`` builds the realistic set (cryptsetup's default KDF, as Apptainer's
builder leaves it); this module adds cheap-KDF twins with 512- and 4096-byte sectors, so that most
tests do not pay for Argon2 under emulation. The result is copied to the host cache
(``.cache/vm-fixtures/<hash of the recipes>/``, writable from the VM) and reused while the recipes
are unchanged; each session gets a private copy on a tmpfs.
"""
import hashlib
import inspect
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import reftools

MAKE_FIXTURES = reftools.SHARED / "tools" / "make-fixtures.sh"
MANIFEST = "ref-images.json"  # written last: its presence means the set is complete
SECTOR_SIZES = (512, 4096)
MODES = ("pass", "pem")


@dataclass(frozen=True)
class RefImages:
    """One complete set of reference images in ``dir`` (see docs/testing.md)."""
    dir: Path

    def file(self, name: str) -> Path:
        return self.dir / name

    plain = property(lambda self: self.file("plain.sif"))          # squashfs partition, no encryption
    enc_pass = property(lambda self: self.file("enc-pass.sif"))    # passphrase mode, default KDF
    enc_pem = property(lambda self: self.file("enc-pem.sif"))      # PEM mode (RSA-OAEP), default KDF
    pass_file = property(lambda self: self.file("pass.txt"))       # the passphrase (no newline)
    pem_private = property(lambda self: self.file("rsa2048.pem"))  # PKCS#1 private key
    pem_public = property(lambda self: self.file("rsa2048.pub.pem"))
    pem_key = property(lambda self: self.file("pem.key"))          # the raw LUKS key wrapped in PEM images
    squashfs = property(lambda self: self.file("rootfs.sqfs"))     # the partition every image carries
    rootfs = property(lambda self: self.file("rootfs"))            # the tree squashed into it
    hello = b"SPANK-SIF-REFERENCE-OK\n"                            # content of /hello.txt in every image
    blob_path = "opt/app/blob.bin"                                 # 3 MB of random data in every image

    @property
    def blob_sha256(self) -> str:
        return self.file("blob.sha256").read_text().strip()

    def encrypted(self, mode: str, sector_size: int | None = 4096) -> Path:
        """A cheap-KDF image (``mode`` "pass" or "pem") with the given sector size; ``None``: the
        default-KDF image as make-fixtures.sh builds it."""
        if mode not in MODES or sector_size not in (*SECTOR_SIZES, None):
            raise ValueError(f"no reference image for mode={mode!r} sector_size={sector_size!r}")
        return self.file(f"enc-{mode}.sif" if sector_size is None else f"fast-{mode}-{sector_size}.sif")

    def key_file(self, mode: str) -> Path:
        """What a user would hold: the passphrase file or the PEM private key."""
        return {"pass": self.pass_file, "pem": self.pem_private}[mode]

    fast_pass_4k = property(lambda self: self.encrypted("pass", 4096))
    fast_pem_4k = property(lambda self: self.encrypted("pem", 4096))
    fast_pass_512 = property(lambda self: self.encrypted("pass", 512))
    fast_pem_512 = property(lambda self: self.encrypted("pem", 512))


def cache_key() -> str:
    """Changes whenever a recipe changes: make-fixtures.sh, the build functions below, the reference
    SIF library, reftools' cheap KDF (not the rest of this module: copying images is no recipe)."""
    h = hashlib.sha256()
    for recipe in (MAKE_FIXTURES, reftools.SHARED / "tools" / "sifref" / "main.go"):
        h.update(recipe.read_bytes())
    for function in (build, build_fast):
        h.update(inspect.getsource(function).encode())
    h.update(repr(reftools.FAST_PBKDF).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return reftools.CACHE / "vm-fixtures"


def prepare_cache() -> Path:
    """On the host, before booting: the cache directory exists (to be shared writable) and holds only
    the current set, so stale sets do not pile up."""
    root, key = cache_root(), cache_key()
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name != key and not entry.name.startswith(f"{key}.tmp"):
            shutil.rmtree(entry, ignore_errors=True)
    return root


def ref_images(work: Path) -> RefImages:
    """A private copy of the current set under ``work`` (a tmpfs in the VM), built and cached if needed.
    Copying the whole set (130 MB) from the cache over 9p takes about 8 s in the guest."""
    key = cache_key()
    cached, dest = cache_root() / key, work / key
    if not (dest / MANIFEST).exists():
        if (cached / MANIFEST).exists():
            shutil.copytree(cached, dest, symlinks=True)
        else:
            build(dest)
            store(dest, cached)
    return RefImages(dest)


def build(out: Path) -> None:
    """Needs root and dm-crypt (the VM). The reference tools must already be built (on the host)."""
    _, sifref = reftools.reftools()
    run("bash", MAKE_FIXTURES, out, sifref)
    for mode in MODES:
        for sector_size in SECTOR_SIZES:
            build_fast(out, mode, sector_size, sifref)
    (out / MANIFEST).write_text(json.dumps({"key": cache_key(), "images": sorted(
        p.name for p in out.glob("*.sif"))}, indent=1))


def build_fast(out: Path, mode: str, sector_size: int, sifref: Path) -> None:
    """Same recipe as make-fixtures.sh's ``luks`` (Apptainer's: volume = squashfs + 16 MiB, formatted
    on a loop device, payload written through dm-crypt), with a cheap KDF and a chosen sector size."""
    key = out / ("pass.txt" if mode == "pass" else "pem.key")
    volume = out / f"fast-{mode}-{sector_size}.luks"
    with open(volume, "wb") as f:
        f.truncate((out / "rootfs.sqfs").stat().st_size + 16 * 1024 * 1024)
    loop = run("losetup", "-f", "--show", volume).stdout.strip()
    try:
        run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *reftools.FAST_PBKDF,
            "--sector-size", sector_size, "--key-file", key, loop)
        name = f"ref-fast-{os.getpid()}-{mode}-{sector_size}"
        run("cryptsetup", "open", "--type", "luks2", "--key-file", key, loop, name)
        try:
            run("dd", f"if={out / 'rootfs.sqfs'}", f"of=/dev/mapper/{name}", "bs=1M", "status=none", "conv=fsync")
        finally:
            run("cryptsetup", "close", name)
    finally:
        run("losetup", "-d", loop)
    extra = (["-json", f"inspect-metadata.json={out / 'labels.json'}"] if mode == "pass"
             else ["-pem-pub", out / "rsa2048.pub.pem", "-key", key])
    run(sifref, "build", "-o", out / f"fast-{mode}-{sector_size}.sif", "-part", volume, "-fs", "encrypted",
        "-deffile", out / "deffile", *extra)
    volume.unlink()


def store(built: Path, cached: Path) -> None:
    """Copy a fresh set to the cache if it is writable (atomically: concurrent sessions may race)."""
    if not os.access(cached.parent, os.W_OK):
        return
    tmp = cached.parent / f"{cached.name}.tmp{os.getpid()}"
    try:
        shutil.copytree(built, tmp, symlinks=True)
        tmp.rename(cached)
    except OSError:
        pass  # another session stored it first, or the cache is not writable after all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(*argv) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc
