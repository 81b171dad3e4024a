"""``spank-sif encrypt`` run as an ordinary user (``nobody``), checked with the real cryptsetup and
the reference SIF implementation: the images list as encrypted, cryptsetup accepts their header
and its own userspace decryption gives back the squashfs, verify-key opens them; every bad input
and fault ends in one line, a nonzero exit and nothing left behind. The kernel side (dm-crypt,
the node engine, Apptainer's own layout) is tests/test_encrypt_vm.py."""
import os
import pty
import pwd
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import reftools
from spank_sif import builder, keys, luks2, sif
from spank_sif.config import SiteConfig

REPO = Path(__file__).resolve().parent.parent
CHEAP_KDF = ("--kdf-memory", "32M", "--kdf-time", "4")   # as tests/reftools.py FAST_PBKDF
PASSPHRASE = b"correct horse battery staple"
DEFFILE = b"Bootstrap: scratch\n%files\n    hello.txt /hello.txt\n"
LABELS = b'{"org.label-schema.schema-version":"1.0"}\n'
HELLO = b"hello from an encrypted image\n"


def _others_can_run(python: str) -> bool:
    path = Path(python)
    dirs = list(path.parents) + list(path.resolve().parents)
    return all(os.stat(d).st_mode & 0o001 for d in dirs) and os.stat(path).st_mode & 0o005 == 0o005


@pytest.fixture(scope="module", autouse=True)
def _can_switch_user():
    if os.geteuid() != 0:
        pytest.skip("needs root to run encrypt as another user")
    if not _others_can_run(sys.executable):
        pytest.skip("this Python is not usable by other users; scripts/test.sh runs the world-readable one")


@pytest.fixture
def work():
    """A directory owned by nobody, where nobody's encrypt runs and writes."""
    path = Path(tempfile.mkdtemp(prefix="spank-sif-encrypt-"))
    path.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    (path / "tmp").mkdir()  # the child's TMPDIR: the scratch header must not outlive it
    os.chown(path / "tmp", nobody.pw_uid, nobody.pw_gid)
    (path / "defaults.yaml").write_text("{}\n")  # the site configuration: all defaults, whatever this host has
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def give(work: Path, name: str, data: bytes, mode: int = 0o644) -> Path:
    """A file in ``work`` that nobody owns."""
    path = work / name
    path.write_bytes(data)
    path.chmod(mode)
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return path


def as_nobody(work: Path, *argv, input: bytes | None = None, preexec_fn=None, popen=False, **kw):
    """``spank-sif ARGV`` as nobody (no groups, no privileges) in ``work``."""
    nobody = pwd.getpwnam("nobody")
    command = ["setpriv", "--reuid", str(nobody.pw_uid), "--regid", str(nobody.pw_gid), "--clear-groups",
               sys.executable, "-m", "spank_sif", *map(str, argv)]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(work / "tmp"),
           "HOME": str(work), "SPANK_SIF_CONFIG": str(work / "defaults.yaml"), "LANG": "C.UTF-8"}
    env.update(kw.pop("env", {}))
    if popen:
        return subprocess.Popen(command, cwd=work, env=env, preexec_fn=preexec_fn, **kw)
    return subprocess.run(command, cwd=work, env=env, input=input, capture_output=True, preexec_fn=preexec_fn,
                          timeout=300, **kw)


def one_line_error(done) -> str:
    err = done.stderr.decode()
    assert done.returncode not in (0, 1), (done.returncode, err)   # 1 would be a bug (a traceback)
    assert err.count("\n") == 1 and err.startswith("spank-sif: ") and "Traceback" not in err, err
    return err


def leftovers(work: Path, *expected: str) -> list:
    """What is in ``work`` besides the inputs (and the empty TMPDIR)."""
    found = sorted(p.name for p in work.iterdir() if p.name not in (*expected, "tmp", "defaults.yaml"))
    return found + [f"tmp/{p.name}" for p in (work / "tmp").iterdir()]


# ---------------------------------------------------------------------------------------------
# Inputs


@pytest.fixture(scope="module")
def squashfs(tmp_path_factory) -> bytes:
    """A squashfs larger than one encryption chunk (the data is encrypted in several steps)."""
    d = tmp_path_factory.mktemp("rootfs")
    files = {"hello.txt": HELLO, "opt/blob.bin": os.urandom(builder.CHUNK + 1_000_000)}
    return reftools.make_squashfs(d / "tree", d / "rootfs.sqfs", files).read_bytes()


@pytest.fixture(scope="module")
def plain_sif(tmp_path_factory, squashfs) -> bytes:
    """A plain image as Apptainer builds it (definition file, labels JSON, squashfs), made by the
    reference SIF library."""
    d = tmp_path_factory.mktemp("plain")
    (d / "rootfs.sqfs").write_bytes(squashfs)
    (d / "deffile").write_bytes(DEFFILE)
    (d / "labels.json").write_bytes(LABELS)
    return reftools.sifref_build(d / "plain.sif", d / "rootfs.sqfs", fs="squashfs", deffile=d / "deffile",
                                 json={"inspect-metadata.json": d / "labels.json"}).read_bytes()


@pytest.fixture(scope="module")
def rsa_pair():
    return keys.generate_key_pair(2048)


# ---------------------------------------------------------------------------------------------
# Oracles


def read_image(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        image = sif.read_sif(fd)
        part = image.primary_partition()
        messages = [image.read_object(fd, m, 1 << 16) for m in image.crypto_messages(part)]
        objects = {d.id: image.read_object(fd, d, 1 << 20) for d in image.descriptors if d.id != part.id
                   and d.size < 1 << 20}
    finally:
        os.close(fd)
    return image, part, messages, objects


def partition_file(image_path: Path, part, dest: Path) -> Path:
    with open(image_path, "rb") as f:
        f.seek(part.offset)
        dest.write_bytes(f.read(part.size))
    return dest


def luks_dump(volume: Path) -> str:
    return reftools.run("cryptsetup", "luksDump", "--disable-locks", volume).stdout.decode()


def cryptsetup_decrypt(volume: Path, luks_key: bytes, tmp: Path) -> bytes:
    """The data segment as the real cryptsetup decrypts it, in userspace: the volume key from
    ``luksDump --dump-volume-key``, a detached header for it over the data alone (cryptsetup only
    decrypts detached-header devices offline), then ``reencrypt --decrypt``."""
    volume_key = reftools.volume_key(volume, luks_key)
    fd = os.open(volume, os.O_RDONLY)
    try:
        segment = luks2.read_luks2(fd).segment
    finally:
        os.close(fd)
    data = tmp / "data.bin"
    with open(volume, "rb") as f:
        f.seek(segment.offset)
        data.write_bytes(f.read())
    (tmp / "vk").write_bytes(volume_key)
    (tmp / "pw").write_bytes(b"x")
    reftools.run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--disable-locks", "--header",
                 tmp / "hdr", "--offset", "0", "--sector-size", segment.sector_size, "--key-size", 512,
                 "--volume-key-file", tmp / "vk", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", 1000,
                 "--key-file", tmp / "pw", data)
    reftools.run("cryptsetup", "reencrypt", "--decrypt", "--batch-mode", "--disable-locks",
                 "--force-offline-reencrypt", "--header", tmp / "hdr", "--key-file", tmp / "pw", data)
    for name in ("vk", "pw", "hdr"):
        (tmp / name).unlink()
    return data.read_bytes()


def check_encrypted(image_path: Path, luks_key: bytes, squashfs: bytes, tmp: Path, sector_size: int) -> str:
    """Everything a reader other than spank-sif sees; returns cryptsetup's luksDump."""
    siftool, _ = reftools.reftools()
    listing = reftools.run(siftool, "list", image_path).stdout.decode()
    assert "FS (Encrypted squashfs/*System/amd64)" in listing, listing
    image, part, _, _ = read_image(image_path)
    # Apptainer's layout: 16 MiB of LUKS2 header, then exactly the squashfs (whole sectors).
    assert part.size == 16 * 2**20 + len(squashfs) and len(squashfs) % sector_size == 0
    volume = partition_file(image_path, part, tmp / "partition.luks")
    dump = luks_dump(volume)
    assert f"sector: {sector_size} [bytes]" in dump and "offset: 16777216 [bytes]" in dump, dump
    assert "cipher: aes-xts-plain64" in dump and "Key:        512 bits" in dump, dump
    reftools.run("cryptsetup", "open", "--test-passphrase", "--disable-locks", "--key-file", "-", volume,
                 input=luks_key)
    assert cryptsetup_decrypt(volume, luks_key, tmp) == squashfs
    volume.unlink()
    return dump


# ---------------------------------------------------------------------------------------------
# Images that open


@pytest.mark.parametrize("mode, sector_size", [("pass", 4096), ("pem", 4096), ("pass", 512), ("pem", 512)])
def test_encrypt_as_nobody_opens_everywhere(work, tmp_path, plain_sif, squashfs, rsa_pair, mode, sector_size):
    private, public = rsa_pair
    plain = give(work, "plain.sif", plain_sif)
    key_args = (["--passphrase-file", give(work, "pass.txt", PASSPHRASE, 0o600)] if mode == "pass"
                else ["--pem-path", give(work, "key.pub.pem", public)])
    done = as_nobody(work, "encrypt", plain, "enc.sif", *key_args, *CHEAP_KDF, "--sector-size", sector_size)
    assert done.returncode == 0 and not done.stderr, done.stderr
    out = work / "enc.sif"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_uid == pwd.getpwnam("nobody").pw_uid and out.stat().st_mode & 0o777 == 0o755 & ~umask
    image, part, messages, objects = read_image(out)
    # Kept objects, as Apptainer writes an encrypted image of this input.
    types = [(d.id, d.type, d.group, d.link) for d in image.descriptors]
    expected = [(1, sif.DataType.DEFFILE, 1, 0), (2, sif.DataType.GENERIC_JSON, 1, 0), (3, sif.DataType.PARTITION, 1, 0)]
    if mode == "pem":
        expected.append((4, sif.DataType.CRYPTO_MESSAGE, 1, 3))
    assert types == expected
    assert objects[1] == DEFFILE and objects[2] == LABELS and image.descriptors[1].name == "inspect-metadata.json"
    if mode == "pem":
        siftool, _ = reftools.reftools()
        assert "Cryptographic Message (PEM/RSA-OAEP)" in reftools.run(siftool, "list", out).stdout.decode()
        assert len(messages) == 1 and image.descriptors[3].is_pem_rsa_oaep
        with keys.unwrap_key(keys.load_private_key(private, "test"), messages[0]) as unwrapped:
            luks_key = bytes(unwrapped.value)
        assert len(luks_key) == 64 and any(luks_key)
    else:
        assert messages == []
        luks_key = PASSPHRASE
    dump = check_encrypted(out, luks_key, squashfs, tmp_path, sector_size)
    assert "PBKDF:      argon2id" in dump and "Memory:     32768" in dump and "Time cost:  4" in dump
    # verify-key, as nobody, with what the user holds.
    key = give(work, "key.pem", private, 0o600) if mode == "pem" else work / "pass.txt"
    opened = as_nobody(work, "verify-key", out, "--pem-path" if mode == "pem" else "--passphrase-file", key)
    assert opened.returncode == 0 and "opens keyslot 0" in opened.stdout.decode(), opened.stderr


def test_bare_squashfs_gets_apptainers_layout(work, tmp_path, squashfs):
    give(work, "rootfs.sqfs", squashfs)
    give(work, "pass.txt", PASSPHRASE)
    done = as_nobody(work, "encrypt", "rootfs.sqfs", "enc.sif", "--passphrase-file", "pass.txt", *CHEAP_KDF)
    assert done.returncode == 0, done.stderr
    image, part, _, _ = read_image(work / "enc.sif")
    assert [(d.id, d.type, d.group, d.link) for d in image.descriptors] == [(1, sif.DataType.PARTITION, 1, 0)]
    assert (part.offset, part.part_type, part.arch, image.header.arch) == (32768, sif.PartType.PRIMSYS, "amd64", "amd64")
    check_encrypted(work / "enc.sif", PASSPHRASE, squashfs, tmp_path, 4096)


def test_other_objects_kept_signatures_dropped_links_renumbered(work, tmp_path, squashfs, rsa_pair):
    """A signed image with objects linked to each other: signatures and an old crypto message go
    (with a warning), everything else stays with its links pointing at the same objects."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "rootfs.sqfs").write_bytes(squashfs)
    S = sif.SifObject
    plain = sif.write_sif(d / "signed.sif", [
        S(sif.DataType.DEFFILE, DEFFILE),
        S(sif.DataType.SIGNATURE, b"-----BEGIN PGP SIGNATURE-----\n...", link=1, link_is_group=True,
          extra=bytes([1, 0, 0, 0]) + bytes(range(20))),
        S.partition(d / "rootfs.sqfs", sif.FsType.SQUASHFS, arch="arm64"),
        S(sif.DataType.GENERIC, b"generic data about the partition", link=3, name="about-root"),
        S(sif.DataType.LABELS, b'{"label": 1}', link=4, group=2),
        S(sif.DataType.SIGNATURE, b"-----BEGIN PGP SIGNATURE-----\n...", link=1, link_is_group=True),
    ])
    assert len(plain.descriptors) == 6
    give(work, "signed.sif", (d / "signed.sif").read_bytes())
    give(work, "key.pub.pem", rsa_pair[1])
    done = as_nobody(work, "encrypt", "signed.sif", "enc.sif", "--pem-path", "key.pub.pem", *CHEAP_KDF)
    assert done.returncode == 0, done.stderr
    warning = done.stderr.decode()
    assert warning.count("\n") == 1 and "warning" in warning and "signature id 2" in warning
    assert "signature id 6" in warning
    image, part, _, objects = read_image(work / "enc.sif")
    got = [(d.id, d.type, d.group, d.link, d.link_is_group, d.name) for d in image.descriptors]
    assert got == [(1, sif.DataType.DEFFILE, 1, 0, False, ""),
                   (2, sif.DataType.PARTITION, 1, 0, False, ""),
                   (3, sif.DataType.CRYPTO_MESSAGE, 1, 2, False, ""),
                   (4, sif.DataType.GENERIC, 1, 2, False, "about-root"),
                   (5, sif.DataType.LABELS, 2, 4, False, "")]
    assert objects[4] == b"generic data about the partition" and objects[5] == b'{"label": 1}'
    assert (part.fs_type, part.arch, image.header.arch) == (sif.FsType.ENCRYPTED_SQUASHFS, "arm64", "arm64")
    siftool, _ = reftools.reftools()
    listing = reftools.run(siftool, "list", work / "enc.sif").stdout.decode()
    assert "FS (Encrypted squashfs/*System/arm64)" in listing and "Cryptographic Message (PEM/RSA-OAEP)" in listing


def test_keygen_output_plugs_straight_in_and_spki_keys_work(work, tmp_path, squashfs):
    from cryptography.hazmat.primitives import serialization
    give(work, "rootfs.sqfs", squashfs)
    made = as_nobody(work, "keygen", "--private", "app.pem", "--public", "app.pub.pem", "--bits", "2048")
    assert made.returncode == 0, made.stderr
    public = keys.load_private_key((work / "app.pem").read_bytes(), "test").public_key()
    give(work, "app.spki.pem", public.public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    assert (work / "app.spki.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    for public_file, out in (("app.pub.pem", "pkcs1.sif"), ("app.spki.pem", "spki.sif")):
        done = as_nobody(work, "encrypt", "rootfs.sqfs", out, "--pem-path", public_file, *CHEAP_KDF)
        assert done.returncode == 0, done.stderr
        opened = as_nobody(work, "verify-key", out, "--pem-path", "app.pem")
        assert opened.returncode == 0, opened.stderr


def test_kdf_is_what_was_asked_not_benchmarked(work, tmp_path, squashfs):
    give(work, "rootfs.sqfs", squashfs)
    give(work, "pass.txt", PASSPHRASE)
    runs = {"default.sif": [], "argon.sif": ["--kdf-memory", "65536", "--kdf-time", "5", "--kdf-threads", "2"],
            "pbkdf2.sif": ["--kdf", "pbkdf2", "--kdf-time", "1234"]}
    for out, extra in runs.items():
        done = as_nobody(work, "encrypt", "rootfs.sqfs", out, "--passphrase-file", "pass.txt", *extra)
        assert done.returncode == 0, done.stderr
    volumes = {}
    for out in runs:
        _, part, _, _ = read_image(work / out)
        volume = partition_file(work / out, part, tmp_path / f"{out}.luks")
        fd = os.open(volume, os.O_RDONLY)
        try:
            volumes[out] = luks2.read_luks2(fd)
        finally:
            os.close(fd)
        assert "Keyslots:\n  0: luks2" in luks_dump(volume)
    default = volumes["default.sif"].keyslots[0].kdf
    assert default == luks2.KdfCost("argon2id", memory_kib=262144, time=4, threads=1) == builder.Kdf().cost
    assert default.memory_kib <= SiteConfig().kdf_max_memory_kib
    assert volumes["argon.sif"].keyslots[0].kdf == luks2.KdfCost("argon2id", memory_kib=65536, time=5, threads=2)
    assert volumes["pbkdf2.sif"].keyslots[0].kdf == luks2.KdfCost("pbkdf2", iterations=1234)
    assert volumes["pbkdf2.sif"].keyslots[0].kdf_hash == "sha256"


def test_help_shows_an_example():
    done = subprocess.run([sys.executable, "-m", "spank_sif", "encrypt", "--help"], capture_output=True, cwd=REPO)
    text = done.stdout.decode()
    assert done.returncode == 0
    assert "spank-sif encrypt app.sif app-enc.sif --pem-path ~/.keys/app.pub.pem" in text
    assert "spank-sif keygen --private ~/.keys/app.pem --public ~/.keys/app.pub.pem" in text
    listed = subprocess.run([sys.executable, "-m", "spank_sif", "--help"], capture_output=True, cwd=REPO)
    assert "encrypt" in listed.stdout.decode()


# ---------------------------------------------------------------------------------------------
# Passphrases on a terminal, and the progress bar


def on_terminal(work: Path, *argv, answers=(), timeout=120) -> tuple[int, str]:
    """Run ``spank-sif ARGV`` as nobody on a pseudo-terminal, typing ``answers`` at each prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: as_nobody's command line on the terminal
        nobody = pwd.getpwnam("nobody")
        os.chown(os.ttyname(0), nobody.pw_uid, nobody.pw_gid)
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(work / "tmp"),
               "SPANK_SIF_CONFIG": str(work / "defaults.yaml"), "TERM": "xterm"}
        os.chdir(work)
        os.execvpe("setpriv", ["setpriv", "--reuid", str(nobody.pw_uid), "--regid", str(nobody.pw_gid),
                               "--clear-groups", sys.executable, "-m", "spank_sif", *map(str, argv)], env)
    output, pending, deadline = b"", list(answers), time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            if pending and output.rstrip().endswith(b":"):
                os.write(fd, pending.pop(0) + b"\n")
                output += b"<typed>"
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_passphrase_typed_twice_without_echo(work, squashfs):
    give(work, "rootfs.sqfs", squashfs)
    rc, output = on_terminal(work, "encrypt", "rootfs.sqfs", "enc.sif", *CHEAP_KDF,
                             answers=[b"typed secret", b"typed secret"])
    assert rc == 0, output
    # asked twice, never echoed
    assert "Passphrase for the image:" in output and "The same passphrase again:" in output, output
    assert "typed secret" not in output
    give(work, "typed.txt", b"typed secret")
    assert as_nobody(work, "verify-key", "enc.sif", "--passphrase-file", "typed.txt").returncode == 0

    rc, output = on_terminal(work, "encrypt", "rootfs.sqfs", "other.sif", *CHEAP_KDF,
                             answers=[b"typed secret", b"typed secreT"])
    assert rc == 4 and "the two passphrases differ" in output, output
    assert leftovers(work, "rootfs.sqfs", "enc.sif", "typed.txt") == []


def test_progress_bar_on_a_terminal_only(work):
    # Not a real squashfs, but encrypt only checks the magic; sparse, so it costs no disk.
    big = work / "big.sqfs"
    with open(big, "wb") as f:
        f.write(b"hsqs")
        f.truncate(300 << 20)
    os.chown(big, pwd.getpwnam("nobody").pw_uid, -1)
    give(work, "pass.txt", PASSPHRASE)
    rc, output = on_terminal(work, "encrypt", "big.sqfs", "bar.sif", "--passphrase-file", "pass.txt", *CHEAP_KDF)
    assert rc == 0, output
    assert "encrypting [" in output and "100%" in output and "0.3/0.3 GiB" in output, output
    done = as_nobody(work, "encrypt", "big.sqfs", "nobar.sif", "--passphrase-file", "pass.txt", *CHEAP_KDF)
    assert done.returncode == 0 and done.stderr == b""


# ---------------------------------------------------------------------------------------------
# Bad input and faults: one line, nonzero exit, nothing left


def _gocryptfs_sif(path: Path, squashfs: bytes) -> bytes:
    path.with_suffix(".sqfs").write_bytes(squashfs)
    sif.write_sif(path, [sif.SifObject.partition(path.with_suffix(".sqfs"), sif.FsType.GOCRYPTFS_SQUASHFS)])
    return path.read_bytes()


def _ext3_sif(path: Path, squashfs: bytes) -> bytes:
    path.with_suffix(".img").write_bytes(squashfs)
    sif.write_sif(path, [sif.SifObject.partition(path.with_suffix(".img"), sif.FsType.EXT3)])
    return path.read_bytes()


def test_bad_inputs(work, tmp_path, squashfs, plain_sif):
    give(work, "pass.txt", PASSPHRASE)
    ok = as_nobody(work, "encrypt", give(work, "plain.sif", plain_sif), "enc.sif", "--passphrase-file",
                   "pass.txt", *CHEAP_KDF)
    assert ok.returncode == 0, ok.stderr
    luks = reftools.luks_format(tmp_path / "bare.luks", PASSPHRASE, 20 << 20)
    inputs = {
        "text.txt": (b"just some text\n", 3, "neither a SIF image nor a squashfs"),
        "empty.sif": (b"", 3, "neither a SIF image nor a squashfs"),
        "bare.luks": (luks.read_bytes(), 3, "already encrypted"),
        "gocryptfs.sif": (_gocryptfs_sif(tmp_path / "g.sif", squashfs), 3, "already encrypted"),
        "ext3.sif": (_ext3_sif(tmp_path / "e.sif", squashfs), 3, "squashfs"),
        "truncated.sif": (plain_sif[:3000], 3, "truncated"),
    }
    for name, (data, _, _) in inputs.items():
        give(work, name, data)
    (work / "adir").mkdir()
    inputs["adir"] = (None, 3, "not a regular file")
    inputs["enc.sif"] = (None, 3, "already encrypted (encrypted-squashfs")
    inputs["missing.sif"] = (None, 3, "cannot open it: No such file")
    for name, (_, code, words) in inputs.items():
        done = as_nobody(work, "encrypt", name, "out.sif", "--passphrase-file", "pass.txt", *CHEAP_KDF)
        err = one_line_error(done)
        assert done.returncode == code and words in err, (name, err)
    assert leftovers(work, "pass.txt", "plain.sif", "enc.sif", "adir", *inputs) == []


def test_out_exists_refused_unless_force(work, squashfs):
    give(work, "rootfs.sqfs", squashfs)
    give(work, "pass.txt", PASSPHRASE)
    give(work, "enc.sif", b"precious")
    done = as_nobody(work, "encrypt", "rootfs.sqfs", "enc.sif", "--passphrase-file", "pass.txt", *CHEAP_KDF)
    assert done.returncode == 64 and "already exists; use --force" in one_line_error(done)
    assert (work / "enc.sif").read_bytes() == b"precious"
    for out, words in (("nowhere/enc.sif", "does not exist"), ("/enc.sif", "cannot create files in /"),
                       ("tmp", "is a directory")):
        done = as_nobody(work, "encrypt", "rootfs.sqfs", out, "--passphrase-file", "pass.txt", *CHEAP_KDF)
        assert done.returncode == 64 and words in one_line_error(done), (out, done.stderr)
    done = as_nobody(work, "encrypt", "rootfs.sqfs", "enc.sif", "--passphrase-file", "pass.txt", *CHEAP_KDF,
                     "--force")
    assert done.returncode == 0, done.stderr
    assert as_nobody(work, "verify-key", "enc.sif", "--passphrase-file", "pass.txt").returncode == 0
    # In place: IN replaced by its encrypted self.
    done = as_nobody(work, "encrypt", "rootfs.sqfs", "rootfs.sqfs", "--passphrase-file", "pass.txt",
                     *CHEAP_KDF, "--force")
    assert done.returncode == 0, done.stderr
    assert as_nobody(work, "verify-key", "rootfs.sqfs", "--passphrase-file", "pass.txt").returncode == 0
    assert leftovers(work, "rootfs.sqfs", "pass.txt", "enc.sif") == []


def test_bad_keys(work, tmp_path, squashfs):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    give(work, "rootfs.sqfs", squashfs)
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    rsa_private, _ = keys.generate_key_pair(2048)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    cases = {
        "ec.pub.pem": (ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(pem, spki), "not an RSA key"),
        "ed.pub.pem": (ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(pem, spki), "not an RSA key"),
        "private.pem": (rsa_private, "holds a private key"),
        "weak.pub.pem": (weak.public_bytes(pem, serialization.PublicFormat.PKCS1), "1024-bit RSA key is too weak"),
        "ssh.pub": (b"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== user@host\n", "ssh-keygen -e -m pem"),
        "garbage.pem": (b"-----BEGIN RSA PUBLIC KEY-----\nnot base64\n-----END RSA PUBLIC KEY-----\n",
                        "not a PEM public key"),
    }
    for name, (data, words) in cases.items():
        give(work, name, data)
        done = as_nobody(work, "encrypt", "rootfs.sqfs", "out.sif", "--pem-path", name, *CHEAP_KDF)
        assert done.returncode == 4 and words in one_line_error(done), (name, done.stderr)
    done = as_nobody(work, "encrypt", "rootfs.sqfs", "out.sif", "--pem-path", "none.pem")
    assert done.returncode == 4 and "cannot read it" in one_line_error(done)
    give(work, "empty.txt", b"")
    done = as_nobody(work, "encrypt", "rootfs.sqfs", "out.sif", "--passphrase-file", "empty.txt")
    assert done.returncode == 4 and "is empty" in one_line_error(done)
    done = as_nobody(work, "encrypt", "rootfs.sqfs", "out.sif", stdin=subprocess.DEVNULL)
    assert done.returncode == 64 and "no key" in one_line_error(done)
    assert leftovers(work, "rootfs.sqfs", "empty.txt", *cases) == []


def test_kdf_choices_checked(work, squashfs):
    give(work, "rootfs.sqfs", squashfs)
    give(work, "pass.txt", PASSPHRASE)
    give(work, "site.yaml", b"kdf_max_memory_kib: 65536\n")
    base = ("encrypt", "rootfs.sqfs", "out.sif", "--passphrase-file", "pass.txt")
    cases = [
        (["--kdf-memory", "128M", "--config", "site.yaml"], 5, "above the site's cap of 65536 KiB"),
        (["--kdf-memory", "5G"], 64, "--kdf-memory 5242880 KiB"),
        (["--kdf-memory", "lots"], 64, "not a size"),
        (["--kdf-time", "2"], 64, "Argon2 needs 4 passes"),
        (["--kdf-threads", "9"], 64, "choose 1 to 4"),
        (["--kdf", "pbkdf2", "--kdf-time", "10"], 64, "PBKDF2 needs 1000"),
        (["--kdf", "pbkdf2", "--kdf-memory", "64M"], 64, "apply to Argon2 only"),
        (["--kdf", "scrypt"], 64, "invalid choice"),
        (["--sector-size", "1024"], 64, "invalid choice"),
    ]
    for extra, code, words in cases:
        done = as_nobody(work, *base, *extra)
        err = done.stderr.decode()
        assert done.returncode == code and words in err and "Traceback" not in err, (extra, err)
    if (os.cpu_count() or 1) < 4:  # cryptsetup 2.6 stores no more Argon2 threads than the host has CPUs
        done = as_nobody(work, *base, *CHEAP_KDF, "--kdf-threads", "4")
        assert done.returncode == 7 and f"use --kdf-threads {os.cpu_count()}" in one_line_error(done), done.stderr
        assert not (work / "out.sif").exists()
    assert leftovers(work, "rootfs.sqfs", "pass.txt", "site.yaml", "out.sif") == []


def test_full_disk_leaves_nothing(work, squashfs):
    """OUT's file system too small: refused before any work. A write failing half-way (here: the
    file-size limit, which fails writes as a full disk does): nothing left either."""
    give(work, "rootfs.sqfs", squashfs)
    give(work, "pass.txt", PASSPHRASE)
    small = work / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0777", "spank-sif-test", small], check=True)
    try:
        done = as_nobody(work, "encrypt", "rootfs.sqfs", small / "enc.sif", "--passphrase-file", "pass.txt",
                         *CHEAP_KDF)
        assert done.returncode == 7 and "not enough space" in one_line_error(done)
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", small], check=True)

    def limit_file_size():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (18 << 20, 18 << 20))
    done = as_nobody(work, "encrypt", "rootfs.sqfs", "enc.sif", "--passphrase-file", "pass.txt", *CHEAP_KDF,
                     preexec_fn=limit_file_size)
    assert done.returncode == 7 and "cannot write the image: File too large" in one_line_error(done)
    assert leftovers(work, "rootfs.sqfs", "pass.txt", "small") == []


@pytest.mark.parametrize("signum, when", [(signal.SIGINT, "data"), (signal.SIGTERM, "data"),
                                          (signal.SIGINT, "kdf")])
def test_interrupted_run_leaves_nothing(work, signum, when):
    big = work / "big.sqfs"
    with open(big, "wb") as f:  # sparse, starts like a squashfs: enough for encrypt, costs no disk
        f.write(b"hsqs")
        f.truncate(2 << 30)
    os.chown(big, pwd.getpwnam("nobody").pw_uid, -1)
    give(work, "pass.txt", PASSPHRASE)
    kdf = CHEAP_KDF if when == "data" else ("--kdf-memory", "1G")
    # As from a terminal: a test run started in the background (`pytest ... &` in a script) hands its
    # children SIGINT ignored, and Python then leaves it ignored, as programs should.
    proc = as_nobody(work, "encrypt", "big.sqfs", "enc.sif", "--passphrase-file", "pass.txt", *kdf,
                     popen=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        # the data stage has begun once the temporary OUT exists; the KDF stage once the scratch does
        started = list(work.glob(".enc.sif.*.part")) if when == "data" else list((work / "tmp").glob("*/*"))
        if started:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.3)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.decode() == "spank-sif: interrupted; enc.sif was not written\n"
    assert leftovers(work, "big.sqfs", "pass.txt") == []
    assert subprocess.run(["pgrep", "-f", str(work)], capture_output=True).returncode == 1  # no cryptsetup left
