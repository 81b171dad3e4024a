"""The user's key: where it comes from, how a PEM key unwraps the image's LUKS passphrase, Secret.

Apptainer's two modes (docs/formats.md, "Keys"):
- passphrase: the LUKS passphrase is the variable's bytes, exactly (no newline stripped);
- PEM: the image holds a crypto message (PEM ``MESSAGE`` around a DER OCTET STRING) with 64 random
  bytes RSA-OAEP-wrapped (SHA-256, MGF1-SHA-256, empty label) to the user's public key, in k-byte
  chunks (Apptainer >= 1.2); the 64 unwrapped bytes are the LUKS passphrase.

This module owns the key variables: their names, precedence and kinds (the site configuration
only chooses among them). Errors name the variable (and a key file's path), never the secret.
Secrets are kept in ``Secret`` buffers that are zeroed after use; nothing here ever writes a secret
anywhere. Key text is parsed where it lies (PEM lines are never copied out one by one), and what
the libraries hand back holding key material (the decoded DER, each decrypted RSA block) is wiped
once used: the copies that remain are the libraries' own (see docs/security-model.md).
"""
import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

from spank_sif import errors
from spank_sif.errors import ImageError, KeyMaterialError, WrongKeyError
from spank_sif.secret import Secret, make_undumpable, wipe, wipe_bytes

# Apptainer's names first (its precedence: PEM path, PEM data, passphrase), then the
# SingularityCE / Singularity 3.x twins, which Apptainer itself ignores but sites still use.
DEFAULT_KEY_VARIABLES = (
    "APPTAINER_ENCRYPTION_PEM_PATH",
    "APPTAINER_ENCRYPTION_PEM_DATA",
    "APPTAINER_ENCRYPTION_PASSPHRASE",
    "SINGULARITY_ENCRYPTION_PEM_PATH",
    "SINGULARITY_ENCRYPTION_PEM_DATA",
    "SINGULARITY_ENCRYPTION_PASSPHRASE",
)
# A variable's kind is its name's suffix: that is how a site-chosen name is understood.
KINDS = {"_PEM_PATH": "pem_path", "_PEM_DATA": "pem_data", "_PASSPHRASE": "passphrase"}
MAX_PEM_FILE = 1 << 20  # a 16384-bit key is 12 KB; anything near this is not a key
MAX_PASSPHRASE = 8 << 20  # cryptsetup's own limit for a key file
MAX_MESSAGE = 64 << 10  # a crypto message for a 16384-bit key is about 3 KB
OAEP_OVERHEAD = 66  # 2 * SHA-256 size + 2: the largest plaintext chunk is k - 66 bytes
# RSA key sizes: under 1024 bits a modulus can be factored (and OAEP with SHA-256 needs 536);
# OpenSSL refuses moduli over 16384 bits (OPENSSL_RSA_MAX_MODULUS_BITS). keygen makes 2048 to 16384.
MIN_RSA_BITS, MAX_RSA_BITS = 1024, 16384


class KeySource(NamedTuple):
    """Where the key comes from. ``variable`` is what messages name (an environment variable, or a
    command-line option). ``path`` for ``pem_path``; ``secret`` holds the passphrase or PEM text."""

    kind: str  # "passphrase", "pem_path" or "pem_data"
    variable: str
    path: str = ""
    secret: Secret | None = None  # its repr never shows the value

    def describe(self) -> str:
        return f"{self.variable}={self.path}" if self.kind == "pem_path" else self.variable

    def material(self) -> Secret:
        """The key itself (a passphrase or PEM text); a ``pem_path`` source has none."""
        if self.secret is None:
            raise KeyMaterialError(f"{self.describe()}: holds no key material")
        return self.secret


def kind_of(variable: str) -> str | None:
    """The kind of key a variable holds, from its suffix; None if it is not a key variable."""
    return next((kind for suffix, kind in KINDS.items() if variable.endswith(suffix)), None)


def passphrase_from_file(data: bytes | bytearray, path: str, option: str = "--passphrase-file") -> KeySource:
    """The key source for a passphrase read from a file (every byte counts, as in Apptainer)."""
    if len(data) > MAX_PASSPHRASE:
        raise KeyMaterialError(f"{option} {path}: larger than {MAX_PASSPHRASE} bytes, not a passphrase")
    if not data:
        raise KeyMaterialError(f"{option} {path} is empty; an empty key cannot open an image")
    return KeySource("passphrase", f"{option} {path}", secret=Secret(data))  # adopts a bytearray


def read_key_file(path: str, limit: int, what: str) -> bytes:
    """A key file read by this process, which is the user (the CLI, srun/sbatch/salloc): an
    ordinary open is the user's own access check. At most ``limit`` bytes; ``what`` names the
    option or the file in messages. (The node reads key files as the user with userfiles.)"""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise KeyMaterialError(f"{what} {path}: cannot read it: {exc.strerror}") from exc
    if len(data) > limit:
        raise KeyMaterialError(f"{what} {path}: larger than {limit} bytes, not a key")
    return data


def find_key_source(env: Mapping[str, "str | Secret"], variables=DEFAULT_KEY_VARIABLES) -> KeySource | None:
    """The first variable of ``variables`` set to a non-empty value in ``env``, or None if none is set.

    Values are strings (a process's own environment) or ``Secret``s (the plugin reads the job's
    key variables straight into them, never into a string); a Secret is adopted, not copied.

    Empty variables are skipped, a rule of spank-sif's own (Apptainer takes a set-but-empty
    variable as given, and then fails): a job script that exports an empty twin of a variable set
    further down the list still works. If the only key variables set are empty, that is an error
    (an empty key never opens an image, and it is likely a mistake in a job script)."""
    empty = []
    for variable in variables:
        value = env.get(variable)
        if value is None:
            continue
        if len(value) == 0:
            empty.append(variable)
            continue
        kind = kind_of(variable)
        if kind is None:
            raise KeyMaterialError(f"{variable}: not a key variable (must end in {', '.join(KINDS)})")
        if kind == "pem_path":  # a path, not a key: a string is fine
            path = value.value.decode("utf-8", "surrogateescape") if isinstance(value, Secret) else value
            return KeySource(kind, variable, path=path)
        if isinstance(value, Secret):
            return KeySource(kind, variable, secret=value)
        # Environment strings come from bytes decoded with surrogateescape: encode back exactly.
        return KeySource(kind, variable, secret=Secret(value.encode("utf-8", "surrogateescape")))
    if empty:
        raise KeyMaterialError(f"{empty[0]} is set but empty; an empty key cannot open an image")
    return None


# ---------------------------------------------------------------------------------------------
# PEM private keys

CONVERT_OPENSSH = "convert it with: ssh-keygen -p -m pem -f KEY"
CONVERT_ENCRYPTED = "remove the passphrase with: openssl rsa -in KEY -out KEY.pem -traditional"


_LINE = re.compile(rb"[^\r\n]+")  # bytes.splitlines' line ends: \n, \r, \r\n
_WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.strip() removes
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


def _pem_blocks(data):
    """(label, headers, der) of each PEM block in ``data``; der is None if the base64 is broken.

    Line by line, in linear time whatever the input (a regex over hostile text can go quadratic).
    ``data`` may be key text: lines are read in place, the base64 is gathered in one buffer that is
    wiped when the iteration ends, and the caller wipes each ``der`` (``secret.wipe_bytes``)."""
    label: bytes | None = None
    headers: list[bytes] = []
    body = bytearray(len(data))  # never grown: a buffer that moves leaves a copy behind
    used = 0
    try:
        for match in _LINE.finditer(data):
            start, end = match.span()
            while start < end and data[start] in _WHITESPACE:
                start += 1
            while end > start and data[end - 1] in _WHITESPACE:
                end -= 1
            if label is None:
                if (end - start > 16 and data.startswith(b"-----BEGIN ", start, end)
                        and data.endswith(b"-----", start, end)):
                    label, headers, used = bytes(data[start + 11:end - 5]), [], 0
            elif end - start == len(label) + 14 and data.startswith(b"-----END " + label + b"-----", start):
                yield label.decode("ascii", "replace"), b"\n".join(headers), _base64(body, used)
                label = None
            elif data.find(b":", start, end) >= 0:  # RFC 1421 headers ("Proc-Type: 4,ENCRYPTED")
                headers.append(bytes(data[start:end]))  # have a colon, base64 never does
            else:
                body[used:used + end - start] = memoryview(data)[start:end]
                used += end - start
    finally:
        wipe(body)


def _base64(body: bytearray, used: int) -> bytes | None:
    """The bytes of the base64 text ``body[:used]`` (strict: only the base64 alphabet), or None."""
    text = memoryview(body)[:used]
    if not _BASE64.fullmatch(text):
        return None
    try:
        return binascii.a2b_base64(text)
    except (binascii.Error, ValueError):
        return None


def load_private_key(pem, origin: str):
    """The RSA private key in ``pem`` (bytes or a bytearray; PKCS#1 as Apptainer requires, or
    unencrypted PKCS#8).

    ``origin`` names where the key came from in messages (a variable, a path)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if b"-----BEGIN" not in pem:
        raise KeyMaterialError(f"{origin}: not a PEM private key (no -----BEGIN line)")
    for label, headers, der in _pem_blocks(pem):
        if label == "OPENSSH PRIVATE KEY":
            raise KeyMaterialError(f"{origin}: OpenSSH-format key, Apptainer needs PEM; {CONVERT_OPENSSH}")
        if label == "ENCRYPTED PRIVATE KEY" or b"ENCRYPTED" in headers:
            raise KeyMaterialError(f"{origin}: the private key is passphrase-protected; {CONVERT_ENCRYPTED}")
        if label in ("EC PRIVATE KEY", "DSA PRIVATE KEY"):
            raise KeyMaterialError(f"{origin}: {label.split()[0]} key; image encryption uses RSA keys")
        if label not in ("RSA PRIVATE KEY", "PRIVATE KEY"):
            continue
        if der is None:
            raise KeyMaterialError(f"{origin}: the {label} block is not valid base64")
        try:
            # OpenSSL's own check (RSA_check_key) proves p and q prime, which costs more than the
            # rest of an unlock (bench/bench_verify_key.py). check_rsa_key does what Apptainer's
            # Go runtime checks (rsa.PrivateKey.Validate), plus the CRT values OpenSSL computes with.
            key = serialization.load_der_private_key(der, password=None, unsafe_skip_rsa_key_validation=True)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyMaterialError(f"{origin}: the {label} block is not a valid private key") from exc
        finally:
            wipe_bytes(der)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyMaterialError(f"{origin}: {type(key).__name__.replace('PrivateKey', '')} key; "
                                   "image encryption uses RSA keys")
        problem = check_rsa_key(key.private_numbers())
        if problem:
            raise KeyMaterialError(f"{origin}: not a usable RSA private key ({problem}); "
                                   "is the file damaged? make a new pair with 'spank-sif keygen'")
        return key
    if b"PUBLIC KEY-----" in pem:
        raise KeyMaterialError(f"{origin}: this is a public key; unlocking needs the private key")
    raise KeyMaterialError(f"{origin}: no RSA private key found in the PEM data")


def check_rsa_key(numbers) -> str:
    """What is wrong with an RSA private key's numbers (``RSAPrivateNumbers``), or "" if nothing.

    The consistency Apptainer's runtime requires (Go's ``rsa.PrivateKey.Validate``: n = p*q, e*d = 1
    modulo p-1 and q-1) and that every number OpenSSL's CRT decryption uses is in range and agrees with
    the others, so the arithmetic is well defined: a damaged or crafted key then fails to decrypt
    ("wrong key") instead of reaching OpenSSL in a state its documentation calls unsafe. Primality is
    not proven (OpenSSL's slow part): a key whose factors are not prime only hurts its owner. A few
    multiplications: microseconds."""
    pub = numbers.public_numbers
    n, e, p, q, d = pub.n, pub.e, numbers.p, numbers.q, numbers.d
    if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        return f"{n.bit_length()}-bit modulus, must be {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
    if not (3 <= e < n and e & 1):
        return "invalid public exponent"
    if not (p >= 3 and q >= 3 and p & 1 and q & 1 and p * q == n):
        return "its factors do not multiply to its modulus"
    if not (1 < d < n and (e * d) % (p - 1) == 1 and (e * d) % (q - 1) == 1):
        return "its private exponent does not match its public exponent"
    if numbers.dmp1 != d % (p - 1) or numbers.dmq1 != d % (q - 1) or not (
            0 < numbers.iqmp < p and (numbers.iqmp * q) % p == 1):
        return "its CRT coefficients do not match its factors"
    return ""


# ---------------------------------------------------------------------------------------------
# Crypto messages


def _der_octet_string(der: bytes) -> bytes:
    """Content of a DER OCTET STRING that spans all of ``der``."""
    if len(der) < 2 or der[0] != 0x04:
        raise ImageError("the image's key message is not a DER OCTET STRING")
    length, start = der[1], 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or len(der) < 2 + count:
            raise ImageError("the image's key message has an invalid DER length")
        length, start = int.from_bytes(der[2:2 + count], "big"), 2 + count
    if start + length != len(der):
        raise ImageError("the image's key message is truncated or has trailing bytes")
    return der[start:]


def _message_ciphertext(message: bytes) -> bytes:
    blocks = [(label, der) for label, _, der in _pem_blocks(message)]
    if not blocks or blocks[0][1] is None:
        raise ImageError("the image's key message is not a valid PEM block (truncated or corrupted)")
    return _der_octet_string(blocks[0][1])


def _oaep():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def unwrap_key(private_key, message: bytes) -> Secret:
    """The key wrapped in a crypto message (PEM text from the image) with ``private_key``.

    A message that does not decrypt with this key raises ``WrongKeyError``: for a PEM user that is
    the "wrong key" case (verify-key exits 2), as a wrong passphrase is for a passphrase user."""
    ciphertext = _message_ciphertext(message)
    k = private_key.key_size // 8 + (private_key.key_size % 8 > 0)
    if not ciphertext or len(ciphertext) % k:
        raise WrongKeyError(f"the PEM key does not match this image (its key message is not made of "
                            f"{private_key.key_size}-bit RSA blocks)")
    # Room for the most the blocks can hold, never grown (a buffer that moves leaves a copy behind);
    # each decrypted block is wiped as soon as it is copied in.
    out, used, oaep = bytearray(len(ciphertext) // k * (k - OAEP_OVERHEAD)), 0, _oaep()
    try:
        for pos in range(0, len(ciphertext), k):
            chunk = private_key.decrypt(ciphertext[pos:pos + k], oaep)
            try:
                if used + len(chunk) > len(out):  # OAEP never gives more: refuse rather than grow
                    raise ValueError("RSA-OAEP block larger than its padding allows")
                out[used:used + len(chunk)] = chunk
                used += len(chunk)
            finally:
                wipe_bytes(chunk)
        if not used:
            raise ImageError("the image's key message holds an empty key")
        return Secret(bytearray(memoryview(out)[:used]))
    except ValueError as exc:
        raise WrongKeyError("the PEM key does not match this image (the key message does not decrypt)") \
            from exc
    finally:
        wipe(out)


def wrap_key(public_key, key: bytes | bytearray) -> bytes:
    """A crypto message for ``key``, as Apptainer >= 1.2 writes it (chunks of k - 66 bytes)."""
    step = public_key.key_size // 8 - OAEP_OVERHEAD
    oaep = _oaep()
    ciphertext = b"".join(public_key.encrypt(bytes(key[i:i + step]), oaep) for i in range(0, len(key), step))
    n = len(ciphertext)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    body = base64.b64encode(b"\x04" + length + ciphertext)
    lines = b"\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN MESSAGE-----\n" + lines + b"\n-----END MESSAGE-----\n"


def generate_key_pair(bits: int) -> tuple[bytes, bytes]:
    """(private, public) PEM, both PKCS#1 (``RSA PRIVATE KEY`` / ``RSA PUBLIC KEY``) as Apptainer
    wants them for ``--pem-path`` at run and build time."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    return private, public


# ---------------------------------------------------------------------------------------------
# The recipe


def read_pem(source: KeySource, read_user_file: Callable[[str], bytes | bytearray]) -> Secret:
    """The PEM text of a ``pem_data`` or ``pem_path`` source (bounded), in a Secret of its own
    (a bytearray from ``read_user_file`` is adopted, not copied)."""
    if source.kind == "pem_data":
        return Secret(bytearray(source.material().value))  # the source's owner wipes the original
    try:
        data = Secret(read_user_file(source.path))
    except OSError as exc:
        raise KeyMaterialError(f"{source.describe()}: cannot read the key file: "
                               f"{exc.strerror or exc}") from exc
    if len(data) > MAX_PEM_FILE:
        data.wipe()
        raise KeyMaterialError(f"{source.describe()}: {len(data)} bytes is too big for a key file")
    return data


def luks_passphrase(image, fd: int, source: KeySource, read_user_file: Callable[[str], bytes | bytearray]) -> Secret:
    """The LUKS passphrase for the primary partition of ``image`` (a ``sif.SifImage`` read from
    ``fd``) from the user's key. ``read_user_file(path)`` reads a PEM file (as the user), best into
    a bytearray, which is then wiped with the rest."""
    if source.kind == "passphrase":
        return Secret(bytearray(source.material().value))
    part = image.primary_partition()
    messages = [m for m in image.crypto_messages(part) if m.is_pem_rsa_oaep]
    if not messages:
        raise WrongKeyError(f"{source.variable} is a PEM key but this image was encrypted with a "
                            "passphrase (it holds no key message); use a passphrase variable instead")
    message = image.read_object(fd, messages[0], MAX_MESSAGE)
    with read_pem(source, read_user_file) as pem:
        return unwrap_in_child(pem.value, message, source.describe())


# What a child sends back: the key, or a SifError (class name, NUL, message), or a bug's traceback.
_KEY, _ERROR, _BUG = b"K", b"E", b"B"
_REPLY_MAX = MAX_MESSAGE + 4096  # more than any key a message can hold, and any error text


def unwrap_in_child(pem, message: bytes, origin: str) -> Secret:
    """``unwrap_key(load_private_key(pem, origin), message)``, done in a forked child that is not
    dumpable and exits afterwards: only the unwrapped key comes back, into a Secret.

    The libraries leave copies behind that no wipe reaches: cryptography hands the RSA numbers to
    Python as integers and frees its own decryption buffer unwiped (most of the key survives in
    freed memory). In a child that exits, all of it goes with the child's memory; the caller (a
    slurmstepd that lives on, and dumps core if it crashes) never holds them. Errors come back
    as the same SifError."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        os.close(read_end)
        _unwrap_child(write_end, pem, message, origin)
    os.close(write_end)
    reply = bytearray(_REPLY_MAX)
    try:
        try:
            size = _read_into(read_end, reply)
        finally:
            os.close(read_end)
            os.waitpid(pid, 0)
        kind, body = bytes(reply[:1]), memoryview(reply)[1:size]
        if kind == _KEY and size > 1:
            return Secret(bytearray(body))
        if kind == _ERROR:
            name, _, text = bytes(body).decode("utf-8", "replace").partition("\0")
            error = getattr(errors, name, None)
            raise (error if isinstance(error, type) and issubclass(error, errors.SifError)
                   else KeyMaterialError)(text)
        raise RuntimeError("unwrapping the PEM key failed in its child process: "
                           + (bytes(body).decode("utf-8", "replace") if kind == _BUG else "no answer"))
    finally:
        wipe(reply)


def _unwrap_child(out: int, pem, message: bytes, origin: str) -> None:
    """The child of ``unwrap_in_child``: never returns."""
    try:
        make_undumpable()  # for good: this process holds the private key until it exits
        try:
            with unwrap_key(load_private_key(pem, origin), message) as key:
                _write_all(out, _KEY)
                _write_all(out, key.value)
        except errors.SifError as err:
            _write_all(out, _ERROR + f"{type(err).__name__}\0{err}".encode())
        except BaseException:  # noqa: BLE001 - a bug: its traceback goes back to the caller
            import traceback
            _write_all(out, _BUG + traceback.format_exc().encode("utf-8", "replace")[-4000:])
    finally:
        os._exit(0)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_into(fd: int, buf: bytearray) -> int:
    """Read ``fd`` to its end into ``buf`` (no bytes object on the way); the count read. More than
    ``buf`` holds is an error: the child never sends that much."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = os.readv(fd, [view[got:]])
        if not n:
            return got
        got += n
    raise RuntimeError("the PEM key's child process sent more than a key")

