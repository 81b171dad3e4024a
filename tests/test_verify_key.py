"""``spank-sif verify-key`` and ``spank-sif keygen`` on images laid out the way Apptainer builds them
(reference builder ``sifref``, LUKS2 payloads encrypted by the real cryptsetup)."""
import os
import pwd
import shutil
import stat
import subprocess
import sys

import pytest

import luks_cases
import reftools
from spank_sif import keys, sif
from spank_sif.cli import main

PASSPHRASE = b"open sesame"
A, S = "APPTAINER_ENCRYPTION_", "SINGULARITY_ENCRYPTION_"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No key variables leak in from the test runner's environment, and the site configuration is
    the defaults (an empty file), whatever /etc/slurm holds on this machine."""
    for name in keys.DEFAULT_KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    defaults = tmp_path / "defaults.yaml"
    defaults.write_bytes(b"")
    monkeypatch.setenv("SPANK_SIF_CONFIG", str(defaults))


class Images:
    """Builds (once per module) the images of the matrix: keyslot kind x sector size x key mode."""

    def __init__(self, root):
        self.root = root
        self.payload = reftools.make_squashfs(root / "tree", root / "payload.sqfs", luks_cases.PAYLOAD_FILES)
        _, self.sifref = reftools.reftools()
        self.pairs = {}
        for bits in (1024, 2048):
            priv, pub = root / f"rsa{bits}.pem", root / f"rsa{bits}.pub"
            reftools.run(self.sifref, "genkey", "-priv", priv, "-pub", pub, "-bits", bits)
            self.pairs[bits] = (priv, pub)
        self.random_key = root / "luks.key"  # PEM mode: 64 random bytes are the LUKS passphrase
        reftools.run(self.sifref, "randkey", "-o", self.random_key)
        self.built = {}

    def get(self, kdf: str, sector_size: int, mode: str):
        """mode: "passphrase", "pem" (2048-bit key, one block) or "pem-chunked" (1024-bit, two)."""
        name = f"{kdf}-{sector_size}-{mode}"
        if name not in self.built:
            luks_key = PASSPHRASE if mode == "passphrase" else self.random_key.read_bytes()
            volume = self.root / f"{kdf}-{sector_size}-{'pass' if mode == 'passphrase' else 'pem'}.luks"
            if not volume.exists():
                reftools.luks_encrypt_payload(self.payload, volume, luks_key,
                                              *luks_cases.cryptsetup_args(kdf, sector_size), fast=False)
            pem = {} if mode == "passphrase" else {
                "pem_pub": self.pairs[1024 if mode == "pem-chunked" else 2048][1], "key": self.random_key}
            self.built[name] = reftools.sifref_build(self.root / f"{name}.sif", volume, **pem)
        return self.built[name]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return Images(tmp_path_factory.mktemp("verify"))


def verify(capsys, *argv):
    """(exit code, stdout, stderr) of ``spank-sif verify-key ARGV`` run in this process."""
    code = main(["verify-key", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _file(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


MATRIX = [(kdf, sector, mode) for kdf in luks_cases.KDFS for sector in luks_cases.SECTOR_SIZES
          for mode in ("passphrase", "pem", "pem-chunked")]


@pytest.mark.parametrize("kdf, sector_size, mode", MATRIX)
def test_right_key_opens_wrong_key_exits_2(images, capsys, monkeypatch, tmp_path, kdf, sector_size, mode):
    image = images.get(kdf, sector_size, mode)
    if mode == "passphrase":
        right_flag = ["--passphrase-file", _file(tmp_path, "pass", PASSPHRASE)]
        wrong_flag = ["--passphrase-file", _file(tmp_path, "wrong", PASSPHRASE + b"!")]
        right_env, wrong_env = {A + "PASSPHRASE": PASSPHRASE.decode()}, {A + "PASSPHRASE": "nope"}
    else:
        priv = images.pairs[1024 if mode == "pem-chunked" else 2048][0]
        other = images.pairs[2048 if mode == "pem-chunked" else 1024][0]
        right_flag, wrong_flag = ["--pem-path", priv], ["--pem-path", other]
        right_env, wrong_env = {A + "PEM_PATH": str(priv)}, {S + "PEM_DATA": other.read_text()}

    code, out, err = verify(capsys, image, *right_flag)
    assert (code, err) == (0, "") and out.endswith("opens keyslot 0\n")
    code, out, err = verify(capsys, image, *wrong_flag)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("spank-sif: ")

    for env, expected in ((right_env, 0), (wrong_env, 2)):
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            code, out, err = verify(capsys, image)
            assert code == expected, err
            assert "sesame" not in out + err and "PRIVATE" not in out + err


def test_exit_codes_end_to_end(images, tmp_path):
    """The installed entry point: one line on stderr, the documented code, never a traceback."""
    image = images.get("pbkdf2", 512, "passphrase")
    cases = [
        ([image, "--passphrase-file", _file(tmp_path, "p", PASSPHRASE)], {}, 0),
        ([image, "--passphrase-file", _file(tmp_path, "w", b"wrong")], {}, 2),
        ([image], {A + "PASSPHRASE": "wrong"}, 2),
        ([image], {}, 4),
        ([tmp_path / "p"], {A + "PASSPHRASE": "x"}, 3),  # not a SIF
        ([images.get("pbkdf2", 512, "pem"), "--pem-path", "/nonexistent.pem"], {}, 4),
        ([image, "--pem-path", "x", "--passphrase-file", "y"], {}, 64),
    ]
    env = {k: v for k, v in os.environ.items() if k not in keys.DEFAULT_KEY_VARIABLES}
    for argv, extra, expected in cases:
        run = subprocess.run([sys.executable, "-m", "spank_sif", "verify-key", *map(str, argv)],
                             env={**env, **extra}, capture_output=True, text=True, cwd=reftools.REPO)
        assert run.returncode == expected, (argv, run.stderr)
        assert "Traceback" not in run.stderr
        if expected not in (0, 64):
            assert run.stderr.count("\n") == 1 and run.stdout == ""


def test_hints_for_the_usual_mistakes(images, capsys, tmp_path):
    pem_image = images.get("pbkdf2", 512, "pem")
    code, _, err = verify(capsys, pem_image, "--passphrase-file", _file(tmp_path, "p", PASSPHRASE))
    assert code == 2 and "encrypted for a PEM key" in err
    code, _, err = verify(capsys, images.get("pbkdf2", 512, "passphrase"), "--passphrase-file",
                          _file(tmp_path, "nl", PASSPHRASE + b"\n"))
    assert code == 2 and "ends with a newline" in err
    code, _, err = verify(capsys, images.get("pbkdf2", 512, "passphrase"), "--pem-path", images.pairs[2048][0])
    assert code == 2 and "encrypted with a passphrase" in err


def test_bad_keys_exit_4(images, capsys, tmp_path):
    image = images.get("pbkdf2", 512, "pem")
    ssh = tmp_path / "id_rsa"
    reftools.run("ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", ssh)
    encrypted = tmp_path / "enc.pem"
    reftools.run("openssl", "genrsa", "-traditional", "-aes128", "-passout", "pass:pw", "-out", encrypted, "1024")
    for key, words in ((ssh, "ssh-keygen -p -m pem"), (encrypted, "openssl rsa"),
                       (_file(tmp_path, "junk", b"junk"), "not a PEM")):
        code, _, err = verify(capsys, image, "--pem-path", key)
        assert code == 4 and words in err and err.count("\n") == 1
    code, _, err = verify(capsys, image, "--passphrase-file", _file(tmp_path, "empty", b""))
    assert code == 4 and "empty" in err


def test_site_configuration_order_and_kdf_cap(images, capsys, monkeypatch, tmp_path):
    image = images.get("argon2id", 512, "passphrase")
    monkeypatch.setenv(A + "PASSPHRASE", "wrong")
    monkeypatch.setenv(S + "PASSPHRASE", PASSPHRASE.decode())
    assert verify(capsys, image)[0] == 2  # Apptainer's name first by default
    config = _file(tmp_path, "site.yaml", f"key_variables: [{S}PASSPHRASE, {A}PASSPHRASE]\n".encode())
    assert verify(capsys, image, "--config", config)[0] == 0
    capped = _file(tmp_path, "cap.yaml", b"kdf_max_memory_kib: 4096\n")
    monkeypatch.setenv("SPANK_SIF_CONFIG", str(capped))
    code, _, err = verify(capsys, image)
    assert code == 5 and "8192 KiB" in err and "4096 KiB" in err


def test_corrupt_luks_header_exits_3(images, capsys, tmp_path):
    image = images.get("pbkdf2", 512, "passphrase")
    bad = tmp_path / "bad.sif"
    data = bytearray(image.read_bytes())
    fd = os.open(image, os.O_RDONLY)
    try:
        part = sif.read_sif(fd).primary_partition()
    finally:
        os.close(fd)
    for copy in (0, 1):  # damage both header copies' JSON
        data[part.offset + copy * 16384 + 5000] ^= 1
    bad.write_bytes(data)
    code, _, err = verify(capsys, bad, "--passphrase-file", _file(tmp_path, "p", PASSPHRASE))
    assert code == 3 and "checksum mismatch" in err and err.startswith(f"spank-sif: {bad}: ")


def test_plain_and_gocryptfs_images(images, capsys, tmp_path):
    plain = reftools.sifref_build(tmp_path / "plain.sif", images.payload, fs="squashfs")
    code, out, _ = verify(capsys, plain)
    assert code == 0 and "nothing to unlock" in out
    gocrypt = tmp_path / "gocryptfs.sif"
    sif.write_sif(gocrypt, sif.apptainer_layout(images.payload, fs_type=sif.FsType.GOCRYPTFS_SQUASHFS))
    code, _, err = verify(capsys, gocrypt, "--passphrase-file", _file(tmp_path, "p", PASSPHRASE))
    assert code == 3 and "gocryptfs" in err


# ---------------------------------------------------------------------------------------------
# keygen


def keygen(capsys, *argv):
    code = main(["keygen", *map(str, argv)])
    return (code, *capsys.readouterr())


def test_keygen_pair_encrypts_an_image_verify_key_opens(images, capsys, tmp_path):
    private, public = tmp_path / "key.pem", tmp_path / "key.pub"
    old = os.umask(0)  # even with a permissive umask the private key is born 0600
    try:
        code, out, _ = keygen(capsys, "--private", private, "--public", public, "--bits", "2048")
    finally:
        os.umask(old)
    assert code == 0 and "0600" in out
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    volume = images.root / "pbkdf2-512-pem.luks"
    images.get("pbkdf2", 512, "pem")  # makes the volume keyed with the random key
    image = reftools.sifref_build(tmp_path / "mine.sif", volume, pem_pub=public, key=images.random_key)
    assert verify(capsys, image, "--pem-path", private)[0] == 0
    assert verify(capsys, image, "--pem-path", images.pairs[2048][0])[0] == 2


def test_keygen_refuses_to_overwrite_or_follow_links(capsys, tmp_path):
    existing = _file(tmp_path, "existing", b"keep me")
    code, _, err = keygen(capsys, "--private", existing, "--public", tmp_path / "new.pub", "--bits", "2048")
    assert code == 64 and "refusing to overwrite" in err and existing.read_bytes() == b"keep me"
    assert not (tmp_path / "new.pub").exists()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    code, _, err = keygen(capsys, "--private", link, "--public", tmp_path / "x.pub", "--bits", "2048")
    assert code == 64 and not (tmp_path / "target").exists()


@pytest.mark.parametrize("argv", [["--bits", "1024"], ["--bits", "2049"], ["--public", "same"]])
def test_keygen_usage_errors(capsys, tmp_path, argv):
    args = {"--private": str(tmp_path / "same"), "--public": str(tmp_path / "pub"), "--bits": "2048"}
    args.update(dict(zip(argv[::2], argv[1::2])))
    if args["--public"] == "same":
        args["--public"] = args["--private"]
    code, _, err = keygen(capsys, *[x for kv in args.items() for x in kv])
    assert code == 64 and err.count("\n") == 1
    assert not (tmp_path / "same").exists()


def test_right_key_but_no_squashfs_inside_exits_3(capsys, tmp_path):
    """A volume that was formatted but never filled (as a failed Apptainer copy can leave it)."""
    volume = reftools.luks_format(tmp_path / "empty.luks", PASSPHRASE, 17 << 20, *luks_cases.KDFS["pbkdf2"],
                                  fast=False)
    image = reftools.sifref_build(tmp_path / "empty.sif", volume)
    code, _, err = verify(capsys, image, "--passphrase-file", _file(tmp_path, "p", PASSPHRASE))
    assert code == 3 and "opens keyslot 0, but the decrypted partition is not a squashfs" in err


# ---------------------------------------------------------------------------------------------
# verify-key answers from libcryptsetup's own view of the header, as the node does.


def _partition(image):
    fd = os.open(image, os.O_RDONLY)
    try:
        return sif.read_sif(fd).primary_partition()
    finally:
        os.close(fd)


def _hostile_copy(images, tmp_path, name, edit):
    """A copy of the PBKDF2 passphrase image whose LUKS2 header region went through ``edit``."""
    image = images.get("pbkdf2", 512, "passphrase")
    part = _partition(image)
    out = tmp_path / f"{name}.sif"
    out.write_bytes(image.read_bytes())
    with open(image, "rb") as f:
        f.seek(part.offset)
        region = bytearray(f.read(2 * 16384))
    luks_cases.patch(out, part.offset, edit(region))
    return out


def test_two_copy_attack_is_refused_as_the_node_refuses_it(images, tmp_path):
    """The newer primary copy shows the cheap PBKDF2 keyslot and a token libcryptsetup rejects; the
    copy libcryptsetup uses claims Argon2id at 4 GiB. verify-key used to say "opens keyslot 0";
    now it refuses before any derivation: in a child that cannot map 1 GiB more, within seconds."""
    from engine_helpers import measured
    image = _hostile_copy(images, tmp_path, "attack", luks_cases.hostile_two_copies)
    keyfile = _file(tmp_path, "p", PASSPHRASE)

    def verify_in_child():
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["verify-key", str(image), "--passphrase-file", str(keyfile)])
        return code, err.getvalue()

    status, (code, err), seconds, _ = measured(verify_in_child, headroom=1 << 30, timeout=120)
    assert (status, code) == (0, 5), err
    assert "keyslot 0: argon2id, 4194304 KiB" in err and "kdf_max_memory_kib" in err and err.count("\n") == 1
    assert seconds < 30


def test_copies_that_disagree_answer_as_cryptsetup(images, capsys, tmp_path):
    """The newer primary copy is a decoy (its keyslot claims other KDF parameters, and it carries a
    token libcryptsetup rejects); the older secondary is the real metadata. cryptsetup opens the
    image with the right key, and so must verify-key (it used to read the decoy: "wrong key")."""
    def decoy(region):
        out = bytearray(region)
        meta = luks_cases.metadata(out, 0)
        decoy_meta = luks_cases.with_kdf(meta, "0", {"type": "pbkdf2", "hash": "sha256", "iterations": 1001})
        luks_cases.set_copy(out, 0, {**decoy_meta, "tokens": luks_cases.REJECTED_TOKENS},
                            luks_cases.seqid(out, 0) + 3)
        return out

    image = _hostile_copy(images, tmp_path, "decoy", decoy)
    volume = tmp_path / "volume.luks"
    part = _partition(image)
    with open(image, "rb") as f:
        f.seek(part.offset)
        volume.write_bytes(f.read(part.size))
    keyfile = _file(tmp_path, "p", PASSPHRASE)
    tested = reftools.run("cryptsetup", "open", "--test-passphrase", "--disable-locks", "--key-file", keyfile,
                          volume, check=False)
    assert tested.returncode == 0, tested.stderr  # cryptsetup ignores the decoy...
    code, out, err = verify(capsys, image, "--passphrase-file", keyfile)
    assert (code, err) == (0, "") and out.endswith("opens keyslot 0\n")  # ...and so does verify-key


def test_an_ordinary_user_runs_verify_key(images, tmp_path):
    """No root: the image and key are the user's, libcryptsetup runs unprivileged."""
    from engine_helpers import USER, ensure_users, world_dir
    ensure_users()
    d = world_dir("verify-key-user-")
    try:
        image = d / "image.sif"
        image.write_bytes(images.get("argon2id", 4096, "passphrase").read_bytes())
        keyfile = d / "pass"
        keyfile.write_bytes(PASSPHRASE)
        owner = pwd.getpwnam(USER)
        for path in (image, keyfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
            path.chmod(0o600)
        run = subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups",
                              sys.executable, "-m", "spank_sif", "verify-key", str(image), "--passphrase-file",
                              str(keyfile)], capture_output=True, text=True, cwd=reftools.REPO, check=False,
                             env={"PATH": os.environ["PATH"], "SPANK_SIF_CONFIG": "/dev/null"})
        assert run.returncode == 0, run.stderr
        assert run.stdout.endswith("opens keyslot 0\n")
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("setting, words", [
    ("kdf_max_time_cost: 3", "needs 4 passes, above this site's limit of 3 passes (kdf_max_time_cost)"),
    ("kdf_max_threads: 1\nkdf_max_memory_kib: 65536", None),
    ("kdf_max_pbkdf2_iterations: 999", "digest 0 needs"),
])
def test_site_time_caps_apply(images, capsys, tmp_path, setting, words):
    image = images.get("argon2id", 512, "passphrase")  # 8 MiB, 4 passes, 1 thread; digest >= 1000
    config = _file(tmp_path, "caps.yaml", setting.encode() + b"\n")
    code, _, err = verify(capsys, image, "--passphrase-file", _file(tmp_path, "p", PASSPHRASE), "--config", config)
    if words is None:
        assert code == 0, err
    else:
        assert code == 5 and words in err and err.count("\n") == 1, err
