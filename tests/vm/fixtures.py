"""Reference SIF images made inside the VM the way Apptainer makes them, cached across test sessions.

The recipe (``build`` and the functions it calls) makes a small root file system, squashes it and
encrypts it as Apptainer's builder does: the real ``cryptsetup luksFormat`` on a loop device over a
volume of the squashfs's size + 16 MiB, the squashfs written through dm-crypt, the SIF image and the
wrapped PEM key made by the reference tool ``sifref`` (tests/reference/). The realistic set keeps
cryptsetup's default KDF, as Apptainer's builder leaves it; cheap-KDF twins with 512- and 4096-byte
sectors spare most tests Argon2 under emulation. The result is copied to the host cache
(``.cache/vm-fixtures/<hash of the recipes>/``, writable from the VM) and reused while the recipes
are unchanged; each session gets a private copy on a tmpfs. docs/testing.md lists the set.
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
from .capability import load_modules

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
        default-KDF image (cryptsetup's defaults, as Apptainer leaves them)."""
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
    """Changes whenever a recipe changes: the functions below that make images, the reference tools'
    sources, reftools' cheap KDF (not the rest of this module: copying images is no recipe)."""
    h = hashlib.sha256(reftools.reference_digest().encode())
    for function in RECIPE:
        h.update(inspect.getsource(function).encode())
    h.update(repr((RECIPE_CONSTANTS, reftools.FAST_PBKDF)).encode())
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


PASSPHRASE = b"correct horse battery staple"
DEFFILE = b"Bootstrap: scratch\n%files\n hello.txt\n"
LABELS = b'{"org.label-schema.schema-version":"1.0"}\n'
BUSYBOX_COMMANDS = ("sh", "cat", "ls", "id", "echo", "head", "sha256sum", "stat", "wc", "true", "false",
                    "sleep")


def build(out: Path) -> None:
    """Needs root and dm-crypt (the VM). The reference tools must already be built (on the host)."""
    _, sifref = reftools.reftools()
    load_modules()
    out.mkdir(parents=True, exist_ok=True)
    make_rootfs(out / "rootfs", out / "blob.sha256")
    run("mksquashfs", out / "rootfs", out / "rootfs.sqfs", "-noappend", "-quiet", "-all-root")
    (out / "deffile").write_bytes(DEFFILE)
    (out / "labels.json").write_bytes(LABELS)
    (out / "pass.txt").write_bytes(PASSPHRASE)
    run(sifref, "genkey", "-priv", out / "rsa2048.pem", "-pub", out / "rsa2048.pub.pem", "-bits", 2048)
    run(sifref, "randkey", "-o", out / "pem.key")  # PEM mode: 64 random bytes are the LUKS passphrase
    run(sifref, "build", "-o", out / "plain.sif", "-part", out / "rootfs.sqfs", "-fs", "squashfs",
        "-deffile", out / "deffile")
    for mode in MODES:
        build_encrypted(out, sifref, mode, f"enc-{mode}", [])  # cryptsetup's defaults, as Apptainer's
        for sector_size in SECTOR_SIZES:
            build_encrypted(out, sifref, mode, f"fast-{mode}-{sector_size}",
                            [*reftools.FAST_PBKDF, "--sector-size", str(sector_size)])
    (out / MANIFEST).write_text(json.dumps({"key": cache_key(), "images": sorted(
        p.name for p in out.glob("*.sif"))}, indent=1))


def make_rootfs(root: Path, blob_digest: Path) -> None:
    """A tree that runs commands (busybox) and gives tests something to check: /hello.txt, a 3 MB
    random blob (its SHA-256 in ``blob_digest``), a setuid copy of busybox, /etc/os-release."""
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "etc", "opt/app", "proc", "dev", "sys", "tmp", "home"):
        (root / d).mkdir(parents=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy(busybox, root / "bin" / "busybox")
    for command in BUSYBOX_COMMANDS:
        (root / "bin" / command).symlink_to("busybox")
    shutil.copy(busybox, root / "bin" / "suid-busybox")
    (root / "bin" / "suid-busybox").chmod(0o4755)
    (root / "hello.txt").write_bytes(RefImages.hello)
    blob = os.urandom(3_000_000)
    (root / RefImages.blob_path).write_bytes(blob)
    blob_digest.write_text(hashlib.sha256(blob).hexdigest() + "\n")
    (root / "etc" / "os-release").write_text('NAME="sif reference"\n')


def build_encrypted(out: Path, sifref: Path, mode: str, name: str, luks_format_args: list[str]) -> None:
    """``<name>.sif``: the squashfs in an Apptainer-style LUKS2 volume, with the passphrase (and a JSON
    object, as builds from a definition file carry) or the PEM key wrapped in a crypto message."""
    key = out / ("pass.txt" if mode == "pass" else "pem.key")
    volume = out / f"{name}.luks"
    apptainer_volume(out / "rootfs.sqfs", volume, key, luks_format_args)
    extra = (["-json", f"inspect-metadata.json={out / 'labels.json'}"] if mode == "pass"
             else ["-pem-pub", out / "rsa2048.pub.pem", "-key", key])
    run(sifref, "build", "-o", out / f"{name}.sif", "-part", volume, "-fs", "encrypted", "-deffile",
        out / "deffile", *extra)
    volume.unlink()


def apptainer_volume(payload: Path, volume: Path, key: Path, luks_format_args: list[str]) -> None:
    """What Apptainer's builder does: a file of the payload's size + 16 MiB (the LUKS2 header and
    keyslots) on a loop device, ``cryptsetup luksFormat`` on it with no options but ``luks_format_args``,
    then the payload written through the opened dm-crypt mapping, so the data segment is exactly it."""
    with open(volume, "wb") as f:
        f.truncate(payload.stat().st_size + 16 * 1024 * 1024)
    loop = run("losetup", "--find", "--show", volume).stdout.strip()
    try:
        run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *luks_format_args,
            "--key-file", key, loop)
        mapping = f"ref-{os.getpid()}-{volume.stem}"
        run("cryptsetup", "open", "--type", "luks2", "--key-file", key, loop, mapping)
        try:
            with open(payload, "rb") as src, open(f"/dev/mapper/{mapping}", "r+b") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        finally:
            run("cryptsetup", "close", mapping)
    finally:
        run("losetup", "--detach", loop)


RECIPE = (build, make_rootfs, build_encrypted, apptainer_volume)
RECIPE_CONSTANTS = (PASSPHRASE, DEFFILE, LABELS, BUSYBOX_COMMANDS, RefImages.hello, RefImages.blob_path,
                    MODES, SECTOR_SIZES)


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
