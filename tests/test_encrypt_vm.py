"""``spank-sif encrypt`` images on a kernel with dm-crypt (the VM harness): laid out as Apptainer's
build path lays out an encrypted image of the same inputs (the reference images: cryptsetup
luksFormat on a loop device, the squashfs written through dm-crypt, the SIF assembled by the
reference library), opened by the real cryptsetup and kernel, and by the node engine."""
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import reftools
from engine_helpers import USER, ensure_users, leftovers, world_dir
from spank_sif import builder, keys, lifecycle, luks2, sif
from spank_sif.config import SiteConfig
from spank_sif.userfiles import User

pytestmark = pytest.mark.vm

FAST = builder.Kdf("argon2id", 32768, 4, 1)  # tests/reftools.py FAST_PBKDF, as the reference images have


@pytest.fixture(scope="module")
def wd(ref_images):
    """World-readable inputs made of the reference images' own ingredients: plain SIFs with the same
    objects the reference encrypted images carry (passphrase images: definition file and labels JSON;
    PEM images: definition file)."""
    ensure_users()
    d = world_dir("sif-vm-encrypt-")
    r = ref_images
    reftools.sifref_build(d / "plain-pass.sif", r.squashfs, fs="squashfs", deffile=r.file("deffile"),
                          json={"inspect-metadata.json": r.file("labels.json")})
    reftools.sifref_build(d / "plain-pem.sif", r.squashfs, fs="squashfs", deffile=r.file("deffile"))
    shutil.copy(r.pem_private, d / "rsa2048.pem")  # the job's user reads it on the node
    (d / "rsa2048.pem").chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _encrypt(ref_images, wd: Path, mode: str, sector_size: int, kdf: builder.Kdf) -> Path:
    out = wd / f"enc-{mode}-{sector_size}-{kdf.memory_kib}.sif"
    key = ({"passphrase": ref_images.pass_file.read_bytes()} if mode == "pass" else
           {"public_key": builder.load_public_key(ref_images.pem_public.read_bytes(), "rsa2048.pub.pem")})
    builder.build_encrypted_image(str(wd / f"plain-{mode}.sif"), str(out), kdf=kdf, sector_size=sector_size,
                                  force=True, **key)
    out.chmod(0o644)
    return out


def _layout(path: Path, tmp: Path) -> dict:
    """What must be equal between two images: header and descriptor fields but times, the image ID
    and the wrapped key; LUKS2 binary headers and JSON metadata (cryptsetup's own dump) but UUIDs,
    salts and digests."""
    fd = os.open(path, os.O_RDONLY)
    try:
        image = sif.read_sif(fd)
        part = image.primary_partition()
        volume = luks2.read_luks2(fd, part.offset, part.size)
        binary = [os.pread(fd, 4096, part.offset + at) for at in (0, volume.header_size)]
    finally:
        os.close(fd)
    header = image.header._replace(id=b"", created_at=0, modified_at=0)
    descriptors = [d._replace(created_at=0, modified_at=0) for d in image.descriptors]
    objects = {d.id: (b"" if d.type in (sif.DataType.PARTITION, sif.DataType.CRYPTO_MESSAGE) else
                      path.read_bytes()[d.offset:d.end]) for d in image.descriptors}
    partition = tmp / f"{path.name}.luks"
    with open(path, "rb") as f:
        f.seek(part.offset)
        partition.write_bytes(f.read(LUKS_HEADER_REGION))
        partition.open("ab").truncate(part.size)
    metadata = json.loads(reftools.run("cryptsetup", "luksDump", "--dump-json-metadata", "--disable-locks",
                                       partition).stdout)
    partition.unlink()
    for slot in metadata["keyslots"].values():
        del slot["kdf"]["salt"]
    for digest in metadata["digests"].values():
        del digest["salt"], digest["digest"]
    # binary header: magic, version, size, sequence id, label, checksum algorithm, (salt, uuid: random),
    # subsystem, offset; the checksum covers the random parts
    fixed = [(b[0:72], b[72:104], b[208:256], b[256:264]) for b in binary]
    return {"header": header, "descriptors": descriptors, "objects": objects, "luks2": metadata,
            "binary": fixed, "segment": volume.segment}


LUKS_HEADER_REGION = builder.LUKS_DATA_OFFSET


def _open_with_the_engine(ref_images, image: Path, mode: str, tmp_path: Path) -> None:
    config = SiteConfig(state_dir=str(tmp_path / "state"))
    env = ({"APPTAINER_ENCRYPTION_PASSPHRASE": ref_images.pass_file.read_text()} if mode == "pass"
           else {"APPTAINER_ENCRYPTION_PEM_PATH": str(image.parent / "rsa2048.pem")})
    target = tmp_path / "mnt"
    target.mkdir(exist_ok=True)
    unlocked = lifecycle.unlock(str(image), User.from_name(USER), env, "cli", config)
    try:
        assert unlocked.encrypted
        lifecycle.mount(unlocked, str(target), private=False)
        assert (target / "hello.txt").read_bytes() == ref_images.hello
        blob = hashlib.sha256((target / ref_images.blob_path).read_bytes()).hexdigest()
        assert blob == ref_images.blob_sha256
    finally:
        lifecycle.release(unlocked, config)
    assert leftovers(image, tmp_path / "state", target) == []


def _open_with_cryptsetup(ref_images, image: Path, mode: str, tmp_path: Path) -> None:
    """As Apptainer opens it: a read-only loop device over the partition, cryptsetup open with the
    key on stdin, a squashfs mount."""
    fd = os.open(image, os.O_RDONLY)
    try:
        sif_image = sif.read_sif(fd)
        part = sif_image.primary_partition()
        if mode == "pass":
            key = ref_images.pass_file.read_bytes()
        else:  # Apptainer's --pem-path: unwrap the image's 64-byte key with the private key
            message = sif_image.read_object(fd, sif_image.crypto_messages(part)[0], 1 << 16)
            private = keys.load_private_key(ref_images.pem_private.read_bytes(), "rsa2048.pem")
            with keys.unwrap_key(private, message) as unwrapped:
                key = bytes(unwrapped.value)
    finally:
        os.close(fd)
    loop = reftools.run("losetup", "-f", "--show", "-r", "-o", part.offset, "--sizelimit", part.size,
                        image).stdout.decode().strip()
    name, target = f"encrypt-test-{os.getpid()}", tmp_path / "cs-mnt"
    target.mkdir(exist_ok=True)
    try:
        reftools.run("cryptsetup", "open", "--type", "luks2", "--key-file", "-", loop, name, input=key)
        try:
            reftools.run("mount", "-t", "squashfs", "-o", "ro,nosuid,nodev", f"/dev/mapper/{name}", target)
            try:
                assert (target / "hello.txt").read_bytes() == ref_images.hello
            finally:
                reftools.run("umount", target)
        finally:
            reftools.run("cryptsetup", "close", name)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.mark.parametrize("mode, sector_size", [("pass", 512), ("pass", 4096), ("pem", 512), ("pem", 4096)])
def test_layout_is_apptainers_and_it_opens(ref_images, wd, tmp_path, mode, sector_size):
    ours = _encrypt(ref_images, wd, mode, sector_size, FAST)
    theirs = ref_images.encrypted(mode, sector_size)
    mine, reference = _layout(ours, tmp_path), _layout(theirs, tmp_path)
    for part in mine:
        assert mine[part] == reference[part], part
    if mode == "pem":
        assert mine["descriptors"][-1].size == reference["descriptors"][-1].size == 400
    _open_with_cryptsetup(ref_images, ours, mode, tmp_path)
    _open_with_the_engine(ref_images, ours, mode, tmp_path)


def test_layout_matches_apptainers_default_build(ref_images, wd, tmp_path):
    """The realistic reference (cryptsetup's defaults on a loop device, as Apptainer leaves them):
    the same layout once encrypt is given the KDF cost cryptsetup's benchmark chose there. Only the
    digest's iteration count differs: cryptsetup benchmarks it too, encrypt uses its minimum."""
    reference = _layout(ref_images.enc_pass, tmp_path)
    [slot] = reference["luks2"]["keyslots"].values()
    kdf = builder.make_kdf(slot["kdf"]["type"], slot["kdf"]["memory"], slot["kdf"]["time"], slot["kdf"]["cpus"])
    mine = _layout(_encrypt(ref_images, wd, "pass", reference["segment"].sector_size, kdf), tmp_path)
    for layout in (mine, reference):
        for digest in layout["luks2"]["digests"].values():
            del digest["iterations"]
    for part in mine:
        assert mine[part] == reference[part], part
