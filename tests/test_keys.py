"""Key handling: Secret, key variables and precedence, PEM loading, RSA-OAEP unwrap (against the
reference builder's messages), and the luks_passphrase recipe on images laid out like Apptainer's."""
import base64
import os
import pickle
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reftools
from spank_sif import keys, sif
from spank_sif.secret import Secret
from spank_sif.errors import ImageError, KeyMaterialError, WrongKeyError

# ---------------------------------------------------------------------------------------------
# Secret


def test_secret_wipes_the_bytes_it_owns():
    buf = bytearray(b"hunter2")
    with Secret(buf) as secret:
        assert secret.value is buf and len(secret) == 7
    assert buf == bytes(7)
    with pytest.raises(ValueError):
        secret.value


def test_secret_never_shows_its_value():
    secret = Secret(b"hunter2")
    assert "hunter2" not in repr(secret) + str(secret) + f"{secret}"
    assert repr(secret) == "<Secret 7 bytes>"
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_secret_copies_immutable_input():
    data = b"abc"
    secret = Secret(data)
    secret.wipe()
    assert data == b"abc"


# ---------------------------------------------------------------------------------------------
# Key variables

A, S = "APPTAINER_ENCRYPTION_", "SINGULARITY_ENCRYPTION_"
SOURCE_CASES = [
    # (environment, expected (kind, variable) or None)
    ({}, None),
    ({"HOME": "/home/alice"}, None),
    ({A + "PASSPHRASE": "p", A + "PEM_PATH": "/k.pem"}, ("pem_path", A + "PEM_PATH")),
    ({A + "PASSPHRASE": "p", A + "PEM_DATA": "pem"}, ("pem_data", A + "PEM_DATA")),
    ({A + "PEM_DATA": "pem", A + "PEM_PATH": "/k.pem"}, ("pem_path", A + "PEM_PATH")),
    ({S + "PEM_PATH": "/k.pem", A + "PASSPHRASE": "p"}, ("passphrase", A + "PASSPHRASE")),
    ({S + "PASSPHRASE": "p"}, ("passphrase", S + "PASSPHRASE")),
    ({S + "PASSPHRASE": "p", S + "PEM_PATH": "/k"}, ("pem_path", S + "PEM_PATH")),
    ({A + "PEM_PATH": "", S + "PASSPHRASE": "p"}, ("passphrase", S + "PASSPHRASE")),  # empty = unset
]


@pytest.mark.parametrize("env, expected", SOURCE_CASES)
def test_key_variable_precedence(env, expected):
    source = keys.find_key_source(env, keys.DEFAULT_KEY_VARIABLES)
    assert (source and (source.kind, source.variable)) == expected


def test_site_order_overrides_the_default():
    env = {A + "PASSPHRASE": "a", S + "PASSPHRASE": "s"}
    source = keys.find_key_source(env, [S + "PASSPHRASE", A + "PASSPHRASE"])
    assert source.variable == S + "PASSPHRASE" and bytes(source.secret.value) == b"s"


@pytest.mark.parametrize("value, raw", [
    ("pass phrase \n", b"pass phrase \n"),      # no stripping: Apptainer passes the bytes as they are
    ("  lead", b"  lead"),
    ("caf\u00e9", "caf\u00e9".encode()),
    ("bad\udcffbyte", b"bad\xffbyte"),            # a non-UTF-8 byte, as os.environ decodes it
])
def test_passphrase_is_the_exact_bytes(value, raw):
    source = keys.find_key_source({A + "PASSPHRASE": value})
    assert bytes(source.secret.value) == raw
    assert value not in repr(source)


def test_only_empty_variables_is_an_error_naming_the_variable():
    with pytest.raises(KeyMaterialError, match=f"{A}PASSPHRASE is set but empty"):
        keys.find_key_source({A + "PASSPHRASE": ""})


# ---------------------------------------------------------------------------------------------
# PEM private keys


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key, fmt, password=None):
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


TRAD, PKCS8, OPENSSH = (serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8,
                        serialization.PrivateFormat.OpenSSH)


def test_pkcs1_and_unencrypted_pkcs8_load(rsa_key):
    for fmt in (TRAD, PKCS8):
        loaded = keys.load_private_key(_pem(rsa_key, fmt), "KEY")
        assert loaded.private_numbers() == rsa_key.private_numbers()


def test_reference_and_openssl_keys_load(tmp_path):
    _, sifref = reftools.reftools()
    reftools.run(sifref, "genkey", "-priv", tmp_path / "go.pem", "-pub", tmp_path / "go.pub", "-bits", "1024")
    reftools.run("openssl", "genrsa", "-traditional", "-out", tmp_path / "ossl1.pem", "2048")
    reftools.run("openssl", "genrsa", "-out", tmp_path / "ossl8.pem", "2048")  # PKCS#8 in OpenSSL 3
    for name in ("go.pem", "ossl1.pem", "ossl8.pem"):
        assert keys.load_private_key((tmp_path / name).read_bytes(), name).key_size in (1024, 2048)


def _bad_keys(rsa_key, tmp_path):
    pkcs1 = _pem(rsa_key, TRAD)
    der_b64 = b"".join(pkcs1.splitlines()[1:-1])
    ssh = tmp_path / "id_rsa"
    reftools.run("ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", ssh)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pub = rsa_key.public_key()
    return {
        "encrypted PKCS#1": (_pem(rsa_key, TRAD, b"pw"), "openssl rsa -in KEY -out KEY.pem -traditional"),
        "encrypted PKCS#8": (_pem(rsa_key, PKCS8, b"pw"), "openssl rsa -in KEY -out KEY.pem -traditional"),
        "OpenSSH (ssh-keygen)": (ssh.read_bytes(), "ssh-keygen -p -m pem -f KEY"),
        "OpenSSH (library)": (_pem(rsa_key, OPENSSH), "ssh-keygen -p -m pem -f KEY"),
        "EC (traditional)": (_pem(ec_key, TRAD), "RSA keys"),
        "EC (PKCS#8)": (_pem(ec_key, PKCS8), "RSA keys"),
        "Ed25519": (_pem(ed25519.Ed25519PrivateKey.generate(), PKCS8), "RSA keys"),
        "public PKCS#1": (pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
                          "public key"),
        "public SPKI": (pub.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo), "public key"),
        "not PEM": (b"hello world\n", "not a PEM private key"),
        "DER instead of PEM": (base64.b64decode(der_b64), "not a PEM private key"),
        "bad base64": (pkcs1.replace(der_b64[100:104], b"!!!!"), "not valid base64"),
        "truncated DER": (b"-----BEGIN RSA PRIVATE KEY-----\n" + base64.encodebytes(
            base64.b64decode(der_b64)[:600]) + b"-----END RSA PRIVATE KEY-----\n", "not a valid private key"),
        "truncated file": (pkcs1[:len(pkcs1) // 2], "no RSA private key"),
        "certificate only": (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                             "no RSA private key"),
    }


def test_bad_key_catalogue(rsa_key, tmp_path):
    for name, (pem, words) in _bad_keys(rsa_key, tmp_path).items():
        with pytest.raises(KeyMaterialError) as caught:
            keys.load_private_key(pem, "APPTAINER_ENCRYPTION_PEM_PATH=/home/u/key.pem")
        message = str(caught.value)
        assert words in message, name
        assert message.startswith("APPTAINER_ENCRYPTION_PEM_PATH=/home/u/key.pem: "), name
        assert "\n" not in message
        assert not any(line in message for line in pem.decode("latin-1").splitlines() if len(line) > 20), name


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | (n.bit_length() + 7) // 8]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def _numbers_pem(n, e, p, q, d, dmp1=None, dmq1=None, iqmp=None):
    """PKCS#1 PEM of any numbers, consistent or not, encoded by hand (the library refuses some):
    what a damaged or crafted key file holds."""
    values = [0, n, e, d, p, q, d % (p - 1) if dmp1 is None else dmp1, d % (q - 1) if dmq1 is None else dmq1,
              pow(q, -1, p) if iqmp is None else iqmp]
    der = _der(0x30, b"".join(_der(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big")) for v in values))
    return b"-----BEGIN RSA PRIVATE KEY-----\n" + base64.encodebytes(der) + b"-----END RSA PRIVATE KEY-----\n"


def _inconsistent_keys(rsa_key, tmp_path):
    k = rsa_key.private_numbers()
    n, e, p, q, d = k.public_numbers.n, k.public_numbers.e, k.p, k.q, k.d
    reftools.run("openssl", "genrsa", "-traditional", "-out", tmp_path / "512.pem", "512")
    return {
        "512-bit key": ((tmp_path / "512.pem").read_bytes(), "512-bit modulus, must be 1024 to 16384 bits"),
        "even public exponent": (_numbers_pem(n, 65536, p, q, d), "invalid public exponent"),
        "modulus changed": (_numbers_pem(n + 2, e, p, q, d), "factors do not multiply"),
        "factor 1": (_numbers_pem(n, e, 1, n, d, dmp1=1, iqmp=0), "factors do not multiply"),
        "private exponent changed": (_numbers_pem(n, e, p, q, d + 2), "private exponent does not match"),
        "p and q swapped, CRT values kept": (_numbers_pem(n, e, q, p, d, k.dmp1, k.dmq1, k.iqmp),
                                             "CRT coefficients"),
        "dmq1 changed": (_numbers_pem(n, e, p, q, d, dmq1=k.dmq1 ^ 4), "CRT coefficients"),
        "iqmp out of range": (_numbers_pem(n, e, p, q, d, iqmp=k.iqmp + p), "CRT coefficients"),
    }


def test_inconsistent_key_catalogue(rsa_key, tmp_path):
    """OpenSSL's slow primality proof is skipped; every inconsistency OpenSSL's CRT decryption could
    trip on is still refused, with one line that names the key and not its numbers."""
    for name, (pem, words) in _inconsistent_keys(rsa_key, tmp_path).items():
        with pytest.raises(KeyMaterialError) as caught:
            keys.load_private_key(pem, "APPTAINER_ENCRYPTION_PEM_DATA")
        message = str(caught.value)
        assert words in message and message.startswith("APPTAINER_ENCRYPTION_PEM_DATA: not a usable RSA"), name
        assert "\n" not in message and str(rsa_key.private_numbers().p)[:12] not in message, name


def test_key_with_composite_factor_only_fails_to_decrypt():
    """A consistent key whose 'prime' is composite passes the cheap check (Apptainer's Go runtime
    accepts it too) and decrypts garbage: the owner gets "wrong key", OpenSSL neither hangs nor crashes."""
    p1, p2, q = (rsa.generate_private_key(public_exponent=65537, key_size=1024).private_numbers().p
                 for _ in range(3))
    p, e = p1 * p2, 65537
    d = pow(e, -1, (p - 1) * (q - 1) // __import__("math").gcd(p - 1, q - 1))
    key = keys.load_private_key(_numbers_pem(p * q, e, p, q, d), "KEY")
    message = keys.wrap_key(key.public_key(), os.urandom(64))
    with pytest.raises(WrongKeyError):
        keys.unwrap_key(key, message)


# ---------------------------------------------------------------------------------------------
# Crypto messages: the reference builder's, and ours


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """For 1024-bit (chunked) and 2048-bit keys: (key pair, random LUKS key, PEM-mode image) made
    by the reference tools, the image laid out as Apptainer's builder does."""
    out = tmp_path_factory.mktemp("keys")
    _, sifref = reftools.reftools()
    part = out / "partition"
    part.write_bytes(b"LUKS\xba\xbe" + bytes(8186))  # the key tests never open the volume
    made = {}
    for bits in (1024, 2048):
        priv, pub, key = out / f"{bits}.pem", out / f"{bits}.pub", out / f"{bits}.key"
        reftools.run(sifref, "genkey", "-priv", priv, "-pub", pub, "-bits", bits)
        reftools.run(sifref, "randkey", "-o", key)
        image = reftools.sifref_build(out / f"{bits}.sif", part, pem_pub=pub, key=key)
        made[bits] = (priv, pub, key.read_bytes(), image)
    made["passphrase"] = reftools.sifref_build(out / "pass.sif", part)
    return made


def _message(image_path):
    fd = os.open(image_path, os.O_RDONLY)
    try:
        image = sif.read_sif(fd)
        desc = image.crypto_messages(image.primary_partition())[0]
        return image.read_object(fd, desc, keys.MAX_MESSAGE)
    finally:
        os.close(fd)


def _load(path):
    return keys.load_private_key(path.read_bytes(), str(path))


@pytest.mark.parametrize("bits, chunks", [(1024, 2), (2048, 1)])
def test_unwrap_reference_message(reference, bits, chunks):
    priv, _, key, image = reference[bits]
    message = _message(image)
    assert len(base64.b64decode(b"".join(message.splitlines()[1:-1]))) == 4 + chunks * bits // 8
    with keys.unwrap_key(_load(priv), message) as unwrapped:
        assert bytes(unwrapped.value) == key and len(key) == 64


@pytest.mark.parametrize("bits", [1024, 2048])
def test_wrap_is_shaped_like_the_reference(reference, bits):
    priv, pub, key, image = reference[bits]
    public = serialization.load_pem_public_key(pub.read_bytes())
    ours, theirs = keys.wrap_key(public, key), _message(image)
    assert [len(line) for line in ours.splitlines()] == [len(line) for line in theirs.splitlines()]
    assert ours.splitlines()[0] == theirs.splitlines()[0] == b"-----BEGIN MESSAGE-----"
    der_header = [base64.b64decode(m.splitlines()[1][:8])[:4] for m in (ours, theirs)]
    assert der_header[0] == der_header[1] == b"\x04\x82" + (2 * bits // 8 if bits == 1024 else bits // 8) \
        .to_bytes(2, "big")  # the same DER OCTET STRING header
    assert bytes(keys.unwrap_key(_load(priv), ours).value) == key


def test_message_for_another_key_is_a_wrong_key(reference, rsa_key):
    message = _message(reference[2048][3])
    with pytest.raises(WrongKeyError, match="does not match this image"):
        keys.unwrap_key(rsa_key, message)  # same size, other key
    other_size = rsa.generate_private_key(public_exponent=65537, key_size=1536)
    with pytest.raises(WrongKeyError, match="1536-bit RSA blocks"):
        keys.unwrap_key(other_size, message)  # 256 bytes of ciphertext: not 192-byte blocks


def _reencode(message, change):
    der = base64.b64decode(b"".join(message.splitlines()[1:-1]))
    return b"-----BEGIN MESSAGE-----\n" + base64.encodebytes(change(der)) + b"-----END MESSAGE-----\n"


def test_damaged_messages(reference):
    priv, _, _, image = reference[2048]
    key, message = _load(priv), _message(image)
    flip_last = _reencode(message, lambda der: der[:-1] + bytes([der[-1] ^ 1]))
    with pytest.raises(WrongKeyError, match="does not decrypt"):
        keys.unwrap_key(key, flip_last)
    cases = {
        "truncated PEM": message[:len(message) // 2],
        "no PEM": b"garbage",
        "truncated DER": _reencode(message, lambda der: der[:-10]),
        "trailing bytes": _reencode(message, lambda der: der + b"xx"),
        "not an OCTET STRING": _reencode(message, lambda der: b"\x30" + der[1:]),
        "bad DER length": _reencode(message, lambda der: b"\x04\x89" + der[2:]),
        "empty": b"",
    }
    for name, bad in cases.items():
        with pytest.raises(ImageError):
            keys.unwrap_key(key, bad)


# ---------------------------------------------------------------------------------------------
# The recipe


def _open_image(path):
    fd = os.open(path, os.O_RDONLY)
    return fd, sif.read_sif(fd)


def test_luks_passphrase_from_pem_path_reads_as_the_user(reference):
    priv, _, key, image_path = reference[1024]
    fd, image = _open_image(image_path)
    asked = []

    def read_user_file(path):
        asked.append(path)
        with open(path, "rb") as f:
            return f.read()

    try:
        source = keys.find_key_source({A + "PEM_PATH": str(priv)})
        with keys.luks_passphrase(image, fd, source, read_user_file) as passphrase:
            assert bytes(passphrase.value) == key
        assert asked == [str(priv)]
    finally:
        os.close(fd)


def test_luks_passphrase_from_pem_data(reference):
    priv, _, key, image_path = reference[2048]
    fd, image = _open_image(image_path)
    try:
        source = keys.find_key_source({S + "PEM_DATA": priv.read_text()})
        assert bytes(keys.luks_passphrase(image, fd, source, None).value) == key
    finally:
        os.close(fd)


def test_luks_passphrase_returns_its_own_copy(reference):
    fd, image = _open_image(reference["passphrase"])
    try:
        source = keys.find_key_source({A + "PASSPHRASE": "pw"})
        keys.luks_passphrase(image, fd, source, None).wipe()
        assert bytes(source.secret.value) == b"pw"
    finally:
        os.close(fd)


def test_unreadable_key_file_names_variable_and_path(reference):
    fd, image = _open_image(reference[2048][3])

    def refuse(path):
        raise PermissionError(13, "Permission denied", path)

    try:
        source = keys.find_key_source({A + "PEM_PATH": "/home/u/k.pem"})
        with pytest.raises(KeyMaterialError, match=f"^{A}PEM_PATH=/home/u/k.pem: cannot read the key file: "
                                                   "Permission denied$"):
            keys.luks_passphrase(image, fd, source, refuse)
    finally:
        os.close(fd)


def test_pem_key_for_a_passphrase_image(reference):
    fd, image = _open_image(reference["passphrase"])
    try:
        source = keys.find_key_source({A + "PEM_PATH": str(reference[2048][0])})
        with pytest.raises(WrongKeyError, match="encrypted with a passphrase"):
            keys.luks_passphrase(image, fd, source, lambda p: open(p, "rb").read())
    finally:
        os.close(fd)


def test_generated_pair_is_pkcs1_and_works(reference):
    private, public = keys.generate_key_pair(2048)
    assert private.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert public.startswith(b"-----BEGIN RSA PUBLIC KEY-----\n")
    # The reference parser (Go's x509.ParsePKCS1PublicKey, as Apptainer's build) accepts the public key.
    pub_path = reference[2048][3].parent / "generated.pub"
    pub_path.write_bytes(public)
    out = reference[2048][3].parent / "generated.sif"
    reftools.sifref_build(out, reference[2048][3].parent / "partition", pem_pub=pub_path,
                          key=reference[2048][3].parent / "2048.key")
    assert bytes(keys.unwrap_key(keys.load_private_key(private, "new"), _message(out)).value) == \
        reference[2048][2]


# ---------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes, a typed error (or a key), never a traceback.

LABELS = st.sampled_from(["RSA PRIVATE KEY", "PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "OPENSSH PRIVATE KEY",
                          "EC PRIVATE KEY", "MESSAGE", "RSA PUBLIC KEY", "X"])
ARMOURED = st.builds(lambda label, body: b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (
    label.encode(), base64.encodebytes(body), label.encode()), LABELS, st.binary(max_size=700))
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(pem=ARMOURED | st.binary(max_size=300))
def test_fuzz_private_keys(pem):
    try:
        keys.load_private_key(pem, "KEY")
    except KeyMaterialError as err:
        assert "\n" not in str(err)


@FUZZ
@given(message=ARMOURED | st.binary(max_size=300))
def test_fuzz_messages(rsa_key, message):
    try:
        keys.unwrap_key(rsa_key, message)
    except (ImageError, WrongKeyError) as err:
        assert "\n" not in str(err) and str(err)


FIELDS = ("n", "e", "d", "p", "q", "dmp1", "dmq1", "iqmp")


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), st.integers(-(1 << 70), 1 << 70), min_size=1, max_size=3))
def test_fuzz_damaged_key_numbers(rsa_key, changes):
    """A real key with some of its numbers shifted: refused with one line, or it loads and then
    unwraps (or fails as a wrong key); OpenSSL, its validation skipped, never crashes or hangs."""
    k = rsa_key.private_numbers()
    values = {"n": k.public_numbers.n, "e": k.public_numbers.e, "d": k.d, "p": k.p, "q": k.q,
              "dmp1": k.dmp1, "dmq1": k.dmq1, "iqmp": k.iqmp}
    values = {name: max(1, value + changes.get(name, 0)) for name, value in values.items()}
    message = keys.wrap_key(rsa_key.public_key(), b"k" * 64)
    try:
        key = keys.load_private_key(_numbers_pem(**values), "KEY")
    except KeyMaterialError as err:
        assert "\n" not in str(err)
        return
    try:
        assert keys.unwrap_key(key, message).value == b"k" * 64
    except WrongKeyError as err:
        assert "\n" not in str(err)


@pytest.mark.parametrize("name,kind", [("APPTAINER_ENCRYPTION_PEM_PATH", "pem_path"),
                                       ("SINGULARITY_ENCRYPTION_PEM_DATA", "pem_data"),
                                       ("SITE_PASSPHRASE", "passphrase"), ("SITE_KEY", None)])
def test_a_variables_kind_comes_from_its_suffix(name, kind):
    assert keys.kind_of(name) == kind


# ---------------------------------------------------------------------------------------------
# What is left in memory

UNWRAP_IN_A_FRESH_PROCESS = """
import os, sys
from spank_sif import keys, sif, userfiles
image_path, pem_path = sys.argv[1:3]
fd = os.open(image_path, os.O_RDONLY)
image = sif.read_sif(fd, name=image_path)
source = keys.KeySource("pem_path", "APPTAINER_ENCRYPTION_PEM_PATH", path=pem_path)
root = userfiles.User.from_uid(0)
read = lambda path: userfiles.read_as_user(path, root, keys.MAX_PEM_FILE, what="PEM key file")
with keys.luks_passphrase(image, fd, source, read) as passphrase:
    print(len(passphrase), flush=True)
print("done", flush=True)
sys.stdin.readline()
"""


def _memory(pid: int):
    """(start, bytes) of every readable mapping of process ``pid`` (root reads /proc/<pid>/mem)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                yield start, mem.read(end - start)
            except OSError:
                continue


@pytest.mark.root
def test_after_an_unwrap_no_copy_of_the_key_or_the_pem_text_is_left(tmp_path):
    """A fresh process reads a PEM key file (as the user, into a buffer of its own), unwraps an
    image's 64-byte LUKS key with it, and wipes what it holds. Its whole memory (freed heap
    included) then holds neither half of the unwrapped key, nor a line of the PEM text, nor the DER
    key: every buffer it owned on the way was wiped, and the libraries' own unwiped copies (the
    RSA numbers, cryptography's decryption buffer) stayed in the child that did the RSA work."""
    if os.geteuid() != 0:
        pytest.skip("reads another process's memory and opens files as a user")
    private, public = keys.generate_key_pair(2048)
    luks_key = os.urandom(64)
    image = tmp_path / "pem.sif"
    message = keys.wrap_key(serialization.load_pem_public_key(public), luks_key)
    sif.write_sif(str(image), sif.apptainer_layout(b"\0" * 4096, crypto_message=message))
    pem = tmp_path / "key.pem"
    pem.write_bytes(private)
    pem.chmod(0o600)
    body = private.splitlines()[1:-1]
    der = serialization.load_pem_private_key(private, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    # Halves and inner parts: a freed buffer's first bytes are the allocator's, the rest stays.
    needles = {"the unwrapped key": (luks_key[:32], luks_key[32:]), "the DER key": (der[200:240],),
               **{f"PEM line {i}": (body[i][16:],) for i in (3, len(body) // 2, len(body) - 3)}}
    proc = subprocess.Popen([sys.executable, "-c", UNWRAP_IN_A_FRESH_PROCESS, str(image), str(pem)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(reftools.REPO)))
    try:
        assert proc.stdout.readline().strip() == "64" and proc.stdout.readline().strip() == "done"
        found = {name for _, data in _memory(proc.pid) for name, parts in needles.items()
                 if any(part in data for part in parts)}
    finally:
        proc.communicate("\n", timeout=30)
    assert found == set()


def test_the_unwrapping_child_is_not_dumpable_while_it_holds_the_private_key(monkeypatch):
    """The child that parses the PEM text and does the RSA work writes no core dump: its dumpable
    flag is 0 while it unwraps (the caller's is left as it was). The real unwrap runs; the child
    only reports its flag, through a pipe, as it starts."""
    from spank_sif.secret import PR_GET_DUMPABLE, _prctl
    private, public = keys.generate_key_pair(2048)
    luks_key = os.urandom(64)
    message = keys.wrap_key(serialization.load_pem_public_key(public), luks_key)
    seen_r, seen_w = os.pipe()
    real = keys.unwrap_key

    def reporting(private_key, message):
        os.write(seen_w, b"%d" % _prctl(PR_GET_DUMPABLE, 0))
        return real(private_key, message)

    monkeypatch.setattr(keys, "unwrap_key", reporting)
    before = _prctl(PR_GET_DUMPABLE, 0)
    try:
        with keys.unwrap_in_child(bytearray(private), message, "the test's key") as key:
            assert bytes(key.value) == luks_key
    finally:
        os.close(seen_w)
    with os.fdopen(seen_r, "rb") as seen:
        assert seen.read() == b"0"
    assert _prctl(PR_GET_DUMPABLE, 0) == before == 1
