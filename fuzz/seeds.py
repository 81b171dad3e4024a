"""The seed inputs of each target: the reference SIF images, volumes made by the real cryptsetup,
keys and messages made by the code Apptainer's formats come from, configurations as admins write them.

Seeds stay small: SIF images are compacted (the descriptor table holds the used descriptors and one
free slot, each object keeps at most its first 64 bytes), LUKS2 volumes contribute their headers only.
"""
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import fuzz
from fuzz import target_config, target_keys, target_luks2, target_sif  # noqa: F401  (by name below)

SIF_TEST_IMAGES = Path("/usr/share/gocode/src/github.com/sylabs/sif/test/images")
KEEP_BYTES = 64


def write(target: str) -> list[Path]:
    """Write ``target``'s seeds into its corpus directory (named by content, as libFuzzer names them)."""
    directory = fuzz.CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for data in globals()[f"{target}_seeds"]().values():
        path = directory / hashlib.sha1(data).hexdigest()
        path.write_bytes(data)
        made.append(path)
    return made


# ---------------------------------------------------------------------------------------------
# sif


def compact(raw: bytes, spare: int = 1) -> bytes:
    """The same image with its used descriptors only (plus ``spare`` free ones), right after the
    header, and each object cut to its first KEEP_BYTES bytes."""
    from spank_sif import sif
    h = list(sif.HEADER.unpack_from(raw))
    used = [list(sif.DESCRIPTOR.unpack_from(raw, h[9] + i * sif.DESCRIPTOR.size)) for i in range(h[8])]
    used = [d for d in used if d[1]]
    count = len(used) + spare
    table, data = bytearray(count * sif.DESCRIPTOR.size), bytearray()
    data_offset = sif.HEADER.size + len(table)
    for i, d in enumerate(used):
        content = raw[d[5]:d[5] + min(d[6], KEEP_BYTES)]
        d[5:8] = [data_offset + len(data), len(content), len(content)]
        data += content
        sif.DESCRIPTOR.pack_into(table, i * sif.DESCRIPTOR.size, *d)
    h[7:13] = [spare, count, sif.HEADER.size, len(table), data_offset, len(data)]
    return sif.HEADER.pack(*h) + table + data


def _written(objects, **layout) -> bytes:
    from spank_sif import sif
    fd = os.memfd_create("seed.sif")
    try:
        sif.write_sif(fd, objects, image_id=bytes(range(16)), created_at=1700000000, **layout)
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def sif_seeds() -> dict[str, bytes]:
    from spank_sif import sif
    S, P = sif.SifObject, sif.FsType
    luks = b"LUKS\xba\xbe" + bytes(58)
    layouts = {
        "pem": sif.apptainer_layout(luks, deffile=b"Bootstrap: docker\n", json_objects={"oci-config.json": b"{}"},
                                    crypto_message=target_keys.fuzz_message()),
        "passphrase": sif.apptainer_layout(luks),
        "plain": sif.apptainer_layout(b"hsqs" + bytes(60), fs_type=P.SQUASHFS, arch="arm64"),
        "gocryptfs": sif.apptainer_layout(b"x" * 64, fs_type=P.GOCRYPTFS_SQUASHFS),
        "two-primary": [S.partition(b"a", P.SQUASHFS), S.partition(b"b", P.ENCRYPTED_SQUASHFS)],
        "odd-objects": [
            S.partition(luks, P.ENCRYPTED_SQUASHFS),
            S.crypto_message(b"pgp", link=1, format_type=sif.FormatType.OPENPGP,
                             message_type=sif.MessageType.CLEAR_SIGNATURE),
            S.crypto_message(b"-----BEGIN MESSAGE-----\n", link=1, link_is_group=True),
            S(sif.DataType.SIGNATURE, b"sig", link=1, extra=(1).to_bytes(4, "little") + bytes(range(1, 21))),
            S(sif.DataType.SBOM, b"{}", extra=(4).to_bytes(4, "little")),
            S(sif.DataType.OCI_BLOB, b"blob", extra=b"sha256:" + b"ab" * 32, group=0),
            S(sif.DataType.ENV_VAR, b"", name="\x1b[31mname\n"),
            S.partition(b"overlay", P.EXT3, sif.PartType.OVERLAY)],
    }
    seeds = {f"ref-{p.stem}": target_sif.encode(compact(p.read_bytes()))
             for p in sorted(SIF_TEST_IMAGES.glob("*.sif"))}
    seeds |= {name: target_sif.encode(compact(_written(objs))) for name, objs in layouts.items()}
    # One as the writer lays it out (table at 4096, partition aligned to 4 KiB), with no repairs.
    seeds["as-written"] = target_sif.encode(_written(layouts["passphrase"], descriptors_total=4), flags=0)
    return seeds


# ---------------------------------------------------------------------------------------------
# luks2

PBKDF2 = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
ARGON2 = ["--pbkdf-force-iterations", "4", "--pbkdf-memory", "8192", "--pbkdf-parallel", "1"]
VOLUME_SIZE = 20 << 20


def _cryptsetup(*argv, key: bytes = b"fuzz") -> None:
    subprocess.run(["cryptsetup", "--batch-mode", *argv], input=key, check=True, capture_output=True)


def _volume(path: Path, *options: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(VOLUME_SIZE)
    _cryptsetup("luksFormat", "--type", "luks2", *options, "--key-file", "-", str(path))
    return path


def _luks2_input(path: Path, **kw) -> bytes:
    """A target_luks2 input describing the primary header copy of the volume at ``path``."""
    with open(path, "rb") as f:
        binary = f.read(4096)
        hdr_size, seqid = int.from_bytes(binary[8:16], "big"), int.from_bytes(binary[16:24], "big")
        text = f.read(hdr_size - 4096).split(b"\0", 1)[0]
    alg = binary[72:104].split(b"\0", 1)[0].decode()
    flags = (target_luks2.HEADER_SIZES.index(hdr_size) << 4) | (target_luks2.CHECKSUMS.index(alg) << 2)
    return target_luks2.encode(text, flags=flags | kw.pop("flags", 0), seqids=(seqid & 15) * 0x11,
                               size=os.path.getsize(path), **kw)


def luks2_seeds() -> dict[str, bytes]:
    variants = {
        "argon2id": ["--pbkdf", "argon2id", *ARGON2],
        "argon2i-4096": ["--pbkdf", "argon2i", *ARGON2, "--sector-size", "4096"],
        "pbkdf2-sha512-128bit": [*PBKDF2, "--hash", "sha512", "--key-size", "256"],
        "metadata-32k": [*PBKDF2, "--luks2-metadata-size", "32k", "--luks2-keyslots-size", "2m"],
        "metadata-64k-label": [*PBKDF2, "--luks2-metadata-size", "64k", "--label", "fuzz", "--subsystem", "x"],
    }
    seeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: _volume(Path(tmp, name), *options) for name, options in variants.items()}
        # Several keyslots, a preferred and an ignored one, and a token: what keyslot_order sorts out.
        multi = paths["multi"] = _volume(Path(tmp, "multi"), *PBKDF2)
        Path(tmp, "old").write_bytes(b"fuzz")
        for slot in ("3", "7"):
            Path(tmp, "new").write_bytes(b"key" + slot.encode())
            _cryptsetup("luksAddKey", *PBKDF2, "--key-slot", slot, "--key-file", str(Path(tmp, "old")),
                        str(multi), str(Path(tmp, "new")))
        _cryptsetup("config", "--priority", "prefer", "--key-slot", "3", str(multi))
        _cryptsetup("config", "--priority", "ignore", "--key-slot", "7", str(multi))
        token = Path(tmp, "token.json")
        token.write_text(json.dumps({"type": "fuzz", "keyslots": ["0"], "data": "x"}))
        _cryptsetup("token", "import", "--json-file", str(token), str(multi))
        for name, path in paths.items():
            seeds[name] = _luks2_input(path)
        seeds["cap-too-low"] = _luks2_input(paths["argon2id"], cap_exp=2)
        seeds["in-partition"] = _luks2_input(paths["pbkdf2-sha512-128bit"], flags=0x80)
        with open(paths["argon2id"], "rb") as f:
            binary = f.read(448)
        seeds["overlay"] = _luks2_input(paths["argon2id"], overlay=binary[6:448])
        # The copies disagree (the secondary is newer and costlier), or only one is there.
        cheap = json.loads(_text(seeds["pbkdf2-sha512-128bit"]))
        costly = json.loads(_text(seeds["argon2id"]))
        costly["keyslots"]["0"]["kdf"]["memory"] = 4194304
        seeds["copies-disagree"] = target_luks2.encode(
            json.dumps(cheap).encode() + b"\0" + json.dumps(costly).encode(), flags=3, seqids=0x21)
        seeds["secondary-only"] = target_luks2.encode(json.dumps(cheap).encode(), flags=2)
        # What an interrupted reencryption leaves: a mandatory requirement.
        cheap["config"]["requirements"] = {"mandatory": ["online-reencrypt-v2"]}
        seeds["reencryption"] = target_luks2.encode(json.dumps(cheap).encode())
    return seeds


def _text(data: bytes) -> bytes:
    start = target_luks2.PREFIX + (target_luks2.OVERLAY if data[0] & 0x40 else 0)
    return data[start:].split(b"\0", 1)[0]


# ---------------------------------------------------------------------------------------------
# keys


def keys_seeds() -> dict[str, bytes]:
    import base64

    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    from spank_sif import keys
    key = target_keys._fuzz_key()
    enc = s.BestAvailableEncryption(b"pass")
    pkcs1_der = key.private_bytes(s.Encoding.DER, s.PrivateFormat.TraditionalOpenSSL, s.NoEncryption())
    pkcs8_der = key.private_bytes(s.Encoding.DER, s.PrivateFormat.PKCS8, s.NoEncryption())
    message = target_keys.fuzz_message()
    message_der = base64.b64decode(b"".join(message.splitlines()[1:-1]))
    empty = key.public_key().encrypt(b"", keys._oaep())  # one block that decrypts to no key at all
    ec_key = ec.generate_private_key(ec.SECP256R1())
    E = target_keys.encode
    return {
        "pkcs1": E(0, target_keys.FUZZ_KEY_PEM),
        "pkcs8": E(0, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())),
        "pkcs8-encrypted": E(0, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, enc)),
        "pkcs1-encrypted": E(0, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.TraditionalOpenSSL, enc)),
        "openssh": E(0, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())),
        "ec": E(0, ec_key.private_bytes(s.Encoding.PEM, s.PrivateFormat.TraditionalOpenSSL, s.NoEncryption())),
        "ec-pkcs8": E(0, ec_key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())),
        "public": E(0, key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.PKCS1)),
        "pkcs1-der": E(1, b"\0" + pkcs1_der),
        "pkcs8-der": E(1, b"\1" + pkcs8_der),
        "message": E(2, message),
        "message-der": E(3, message_der),
        "message-empty-key": E(3, b"\x04\x81" + bytes([len(empty)]) + empty),
        "env-passphrase": E(4, b"\0\0APPTAINER_ENCRYPTION_PASSPHRASE=secret\xff\0PATH=/bin"),
        "env-pem-path": E(4, b"\0\0SINGULARITY_ENCRYPTION_PEM_PATH=~/k.pem\0APPTAINER_ENCRYPTION_PEM_DATA="),
        "env-custom": E(4, b"SITE_KEY_PASSPHRASE\0SITE_PEM_DATA\0\0SITE_PEM_DATA=-----BEGIN"),
    }


# ---------------------------------------------------------------------------------------------
# config


def config_seeds() -> dict[str, bytes]:
    full = b"""\
# /etc/slurm/spank_sif.yaml
mount_point: /sif
key_variables:
  - APPTAINER_ENCRYPTION_PEM_PATH
  - APPTAINER_ENCRYPTION_PASSPHRASE
strip_key_variables: true
allowed_image_paths: [/common/images, /home]
allow_unencrypted: false
kdf_max_memory_kib: 1048576
kdf_max_parallel: 2
state_dir: /run/spank-sif
log_level: debug
"""
    return {
        "full": full,
        "empty": b"",
        "flow": b"{mount_point: /mnt/sif, log_level: info, kdf_max_parallel: 1}",
        "anchors": b"a: &x /sif\nmount_point: *x\n",
        "typo": b"kdf_max_memroy_kib: 10\n",
        "wrong-type": b"kdf_max_memory_kib: yes\nallowed_image_paths: /x\n",
        "list": b"- mount_point\n",
        "document": b"%YAML 1.1\n---\nstate_dir: !!str /run/x\n...\n",
    }
