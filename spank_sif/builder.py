"""Build Apptainer-compatible encrypted SIF images without root and without device-mapper.

Apptainer's builder formats a LUKS2 volume on a loop device and copies the squashfs through dm-crypt,
which needs root. The same volume can be made on a plain file by the real ``cryptsetup``: offline
``reencrypt --encrypt`` encrypts the squashfs in place, in userspace. Reducing the device by 32 MiB
puts the data segment at 16 MiB (Apptainer's layout with cryptsetup >= 2.1); the 16 MiB of scratch
space that reencryption needs at the tail is cut off afterwards, leaving exactly Apptainer's layout:
header and keyslots, then the squashfs's size of data. ``--disable-locks`` because an unprivileged
user cannot take cryptsetup's lock in /run/cryptsetup, and nobody else knows about this new file.

The key goes to cryptsetup on stdin, never in argv or a file. This is the base of the demo now and
of ``spank-sif encrypt`` later.
"""
import os
import secrets
import shutil
import subprocess
from typing import NamedTuple

from spank_sif import keys, sif
from spank_sif.secret import Secret, buffer
from spank_sif.errors import SystemSetupError, UsageError

LUKS_HEADER_SPACE = 16 << 20
REENCRYPT_SCRATCH = 16 << 20
PEM_KEY_BYTES = 64  # Apptainer's PEM mode: 64 random bytes are the LUKS passphrase


def _cryptsetup() -> str:
    path = shutil.which("cryptsetup", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise SystemSetupError("cryptsetup is not installed: install the cryptsetup-bin package")
    return path


def encrypt_squashfs(squashfs: str, volume: str, key, pbkdf_args=()) -> None:
    """Write ``volume``: a LUKS2 volume (cryptsetup's defaults unless ``pbkdf_args``) whose data
    segment is the content of ``squashfs``, encrypted with passphrase ``key`` (bytes or Secret)."""
    size = os.path.getsize(squashfs)
    shutil.copyfile(squashfs, volume)
    try:
        os.truncate(volume, size + LUKS_HEADER_SPACE + REENCRYPT_SCRATCH)
        secret = buffer(key)
        argv = [_cryptsetup(), "reencrypt", "--encrypt", "--type", "luks2", "--batch-mode", "--disable-locks",
                "--reduce-device-size", str(LUKS_HEADER_SPACE + REENCRYPT_SCRATCH), *pbkdf_args,
                "--key-file", "-", volume]
        # cryptsetup writes a temporary header file into its working directory: use the output's.
        done = subprocess.run(argv, input=bytes(secret), capture_output=True, check=False,
                              cwd=os.path.dirname(os.path.abspath(volume)))
        if done.returncode != 0:
            reason = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            raise SystemSetupError(f"cryptsetup could not encrypt {squashfs}: {reason}")
        os.truncate(volume, size + LUKS_HEADER_SPACE)
    except BaseException:
        os.unlink(volume)
        raise


class BuiltImage(NamedTuple):
    path: str
    mode: str  # "passphrase" or "pem"


def build_encrypted_image(squashfs: str, out: str, *, passphrase=None, public_key_pem: bytes | None = None,
                          deffile: bytes | None = None, pbkdf_args=()) -> BuiltImage:
    """An encrypted SIF laid out as Apptainer builds it, in passphrase mode (``passphrase``) or PEM
    mode (``public_key_pem``, PKCS#1 or SubjectPublicKeyInfo: 64 random bytes wrapped to it)."""
    if (passphrase is None) == (public_key_pem is None):
        raise UsageError("give either a passphrase or a public key")
    volume = out + ".luks.tmp"
    message = None
    if public_key_pem is not None:
        public_key = _load_public_key(public_key_pem)
        key = Secret(secrets.token_bytes(PEM_KEY_BYTES))
        message = keys.wrap_key(public_key, key.value)
    else:
        key = passphrase if isinstance(passphrase, Secret) else Secret(passphrase)
    try:
        encrypt_squashfs(squashfs, volume, key, pbkdf_args)
        sif.write_sif(out, sif.apptainer_layout(volume, deffile=deffile, crypto_message=message))
    finally:
        if public_key_pem is not None:
            key.wipe()
        if os.path.exists(volume):
            os.unlink(volume)
    return BuiltImage(out, "pem" if message else "passphrase")


def _load_public_key(pem: bytes):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    try:
        key = serialization.load_pem_public_key(pem)  # PKCS#1 "RSA PUBLIC KEY" and SPKI "PUBLIC KEY"
    except (ValueError, TypeError) as exc:
        raise UsageError(f"not a usable PEM public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise UsageError("the public key must be an RSA key, as Apptainer requires")
    return key
