"""Target ``keys``: PEM private keys, crypto messages (the wrapped LUKS key) and key variables.

Input: a mode byte, then what the mode reads.

  0  PEM text -> keys.load_private_key; a key that loads then unwraps a message made for FUZZ_KEY
  1  DER of a key: byte 1 picks the PEM label (and bit 3 an "ENCRYPTED" header), the rest is the DER
     (base64 text would hide the key's structure from the mutator), then as mode 0
  2  PEM text of a crypto message -> keys.unwrap_key with FUZZ_KEY
  3  DER of a crypto message (wrapped as a PEM MESSAGE) -> keys.unwrap_key with FUZZ_KEY
  4  key variables: NUL-separated variable names (none: the defaults), two NULs, then NUL-separated
     NAME=VALUE entries as the job environment holds them -> keys.find_key_source
"""
import base64

from fuzz import harness
from fuzz.harness import check
from spank_sif import keys

MAX_LEN = 4096
MODES = 5
LABELS = (b"RSA PRIVATE KEY", b"PRIVATE KEY", b"ENCRYPTED PRIVATE KEY", b"OPENSSH PRIVATE KEY",
          b"EC PRIVATE KEY", b"RSA PUBLIC KEY", b"PUBLIC KEY", b"MESSAGE")
TOKENS = [b"-----BEGIN ", b"-----END ", b"-----", b"RSA PRIVATE KEY", b"PRIVATE KEY", b"MESSAGE",
          b"Proc-Type: 4,ENCRYPTED", b"_PASSPHRASE", b"_PEM_PATH", b"_PEM_DATA",
          b"APPTAINER_ENCRYPTION_PEM_DATA=", b"APPTAINER_ENCRYPTION_PASSPHRASE=", b"\x04\x82", b"\x30\x82",
          b"\x02\x01\x00", b"\x02\x81\x81\x00", b"\x02\x03\x01\x00\x01"]

# A key for the fuzzer only (it protects nothing): 1024 bits, the smallest keys.py accepts, so that
# each RSA decryption costs the fuzzer as little as possible.
FUZZ_KEY_PEM = b"""\
-----BEGIN RSA PRIVATE KEY-----
MIICXQIBAAKBgQDSdrdxNf6rdoxYg+AeO2FDJ6QF+1bgRIUB/ukBs4LsG4nOYZ5/
Vot9k2oM7ZwmstPK8Mwl1dnoV616yBcESQjNu2XRPTHM154lPWsB+QlXOUO/yGw1
NfCwsN+v1DB9dx1TyFDN30JPVVRQQ9wgBl5VN5Mo03HrxxRbzJpAWGbYzQIDAQAB
AoGBAMIj7Jer/R3hnxjPnV+F2vR9jppN/RenXSI4KGv/UVfHF1mfRvujs8zEvODs
FkzETQY5FbgZCod+yXInPMQhMtIX0KFM2xhfHTAZYQwfwn4EGrmBoWOwKFwkHNr0
k7fa4DcksykFE7bfXx1AZg/+1PjdIgIf/dDXppBnkYco8fWBAkEA8qwby1u8LNbx
ahScoG4TLm21kcAqMRR6kAXH5J9JfwPoYmYyAAK+WKJtGG0SRG72WBYp7LZpnCJz
6QRI9FjE8QJBAN4FxDEaoqroM7ReekdX9AFhmzbNwxMa80ukYDXEFZzim0EDvy3q
goixDgSFP/5MvKTixhkZbc0tCbKbwZnDIZ0CQQCuQVAkEtdpC1+HYQ2nVeOIL1d2
NZsWazInQT9st8S65D92iRPWViIA24GjTI8VfOiAEEpCpCnp6AN7i4wniabBAkB5
QQz1BGbyj/4s86w0aoSIfJYYSCfRt1ZIaW1h78Ud+WRxDWrL2NeRb6EINv3MFHyy
UGeALbMZ6w7wzL/fCgLBAkANcvn090BL4uDQD4J5lw2+TmWVaJVNq4FvXHL0itLK
g5vkUjFHMXtpfZ+Dw7UQreaK6nnS+wWyM702xHGrUGan
-----END RSA PRIVATE KEY-----
"""


def _fuzz_key():
    global _FUZZ_KEY
    if _FUZZ_KEY is None:
        _FUZZ_KEY = keys.load_private_key(FUZZ_KEY_PEM, "fuzz key")
    return _FUZZ_KEY


_FUZZ_KEY = None
_MESSAGE = None


def fuzz_message() -> bytes:
    """A crypto message wrapping 64 bytes for FUZZ_KEY, as Apptainer writes one."""
    global _MESSAGE
    if _MESSAGE is None:
        _MESSAGE = keys.wrap_key(_fuzz_key().public_key(), bytes(range(64)))
    return _MESSAGE


def pem(label: bytes, der: bytes, encrypted: bool = False) -> bytes:
    body = base64.b64encode(der)
    lines = b"\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    headers = b"Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\n" if encrypted else b""
    return b"-----BEGIN %s-----\n%s%s\n-----END %s-----\n" % (label, headers, lines, label)


def encode(mode: int, payload: bytes) -> bytes:
    return bytes([mode]) + payload


def run(data: bytes) -> str:
    if not data:
        return "ok"
    mode, rest = data[0] % MODES, data[1:]
    if mode == 0:
        return harness.outcome(lambda: _private_key(rest))
    if mode == 1:
        choice = rest[0] if rest else 0
        return harness.outcome(lambda: _private_key(pem(LABELS[choice & 7], rest[1:], bool(choice & 8))))
    if mode == 2:
        return harness.outcome(lambda: _unwrap(_fuzz_key(), rest))
    if mode == 3:
        return harness.outcome(lambda: _unwrap(_fuzz_key(), pem(b"MESSAGE", rest)))
    return harness.outcome(lambda: _key_source(rest))


def _private_key(text: bytes) -> None:
    key = keys.load_private_key(text, "fuzz.pem")
    check(keys.MIN_RSA_BITS <= key.key_size <= keys.MAX_RSA_BITS, "key size outside the limits")
    _unwrap(key, fuzz_message())


def _unwrap(key, message: bytes) -> None:
    with keys.unwrap_key(key, message) as secret:
        check(len(secret) > 0, "empty key unwrapped")


def _key_source(rest: bytes) -> None:
    names, _, entries = rest.partition(b"\0\0")
    variables = [n.decode("utf-8", "surrogateescape") for n in names.split(b"\0") if n] \
        or list(keys.DEFAULT_KEY_VARIABLES)
    env = {}
    for entry in entries.split(b"\0"):  # as spank.getenv decodes the job's environment
        name, eq, value = entry.partition(b"=")
        if eq:
            env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    source = keys.find_key_source(env, variables)
    chosen = next((v for v in variables if env.get(v)), None)
    check((source is None) == (chosen is None), "a set key variable was missed, or an unset one taken")
    if source is None:
        return
    check(source.variable == chosen and source.kind == keys.kind_of(chosen), "wrong variable or kind")
    if source.kind == "pem_path":
        check(source.path == env[chosen] and source.secret is None, "PEM path")
    else:
        check(bytes(source.secret.value) == env[chosen].encode("utf-8", "surrogateescape"), "key bytes")
        source.secret.wipe()
