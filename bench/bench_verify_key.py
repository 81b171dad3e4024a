"""Benchmark: ``spank-sif verify-key`` costs libcryptsetup's key check plus under 50 ms.

A LUKS2 unlock runs two key derivations, both sized when the volume is formatted and paid alike by
every opener (cryptsetup, the kernel path, this code): the keyslot's KDF (cryptsetup's default:
Argon2id for about 2 s) and the digest's PBKDF2 that confirms the recovered volume key (cryptsetup
sizes it to 125 ms of its own benchmark). verify-key has libcryptsetup run both, with the keyslot
area and the AF-merge, in one call (``crypt_volume_key_get``): that call alone is the floor.
"Beyond the key check" is everything else, what spank-sif adds: reading the SIF header, the LUKS2
header snapshot (header copies and keyslot material copied into a memfd, loaded by libcryptsetup,
its view validated and held against the caps), the PEM key and its unwrap, the squashfs check of
the first data sector.

One volume (a squashfs in LUKS2 made by the real cryptsetup), three SIF images laid out as Apptainer
builds them: passphrase, PEM with a 2048-bit and with a 4096-bit RSA key. Side by side, round-robin
(so a busy machine slows every case alike), minimum of ``--repeat`` runs:

- libcryptsetup's key check alone on an already loaded header, in this process (the floor);
- the parts beyond it, each timed directly (low noise);
- ``verify-key`` end to end in this process, as an embedded caller (the plugin's engine) pays it;
- ``verify-key`` as a new process, next to the start-up floor of any Python command built on
  argparse, cryptography's AES and libcryptsetup (the interpreter, those imports, the library load);
- ``cryptsetup open --test-passphrase`` on the same volume (what Apptainer's own check costs).

By default the volume gets cryptsetup's benchmarked defaults (what ``apptainer build --encrypt``
gets); ``--quick`` uses cheap parameters: the end-to-end differences are then nearly noise-free.

    python3 bench/bench_verify_key.py [--quick] [--repeat N]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import reftools  # noqa: E402
from spank_sif import keys, libcryptsetup, luks2, sif  # noqa: E402
from spank_sif.cli import main as cli_main  # noqa: E402

PASSPHRASE = b"benchmark passphrase"
TARGET_MS = 50
BITS = (2048, 4096)
# What any Python command that parses arguments and uses cryptography's AES and libcryptsetup
# (through cffi) imports and loads.
LIBRARY_FLOOR = ("import argparse, hashlib, json; import cryptography.hazmat.primitives.ciphers; "
                 "import cffi; cffi.FFI().dlopen('libcryptsetup.so.12'); "
                 "argparse.ArgumentParser().add_argument('x')")
# ... and, for a PEM key, what loading and using an RSA key with cryptography imports (15 ms).
LIBRARY_FLOOR_PEM = (LIBRARY_FLOOR + "; from cryptography.hazmat.primitives import serialization; "
                     "from cryptography.hazmat.primitives.asymmetric import rsa, padding")
OWN_IMPORTS = LIBRARY_FLOOR + "; from spank_sif.cli import build_parser; build_parser('verify-key')"


def measure(cases: dict, repeat: int) -> dict:
    """Wall times in ms of each case, run round-robin ``repeat`` times -> {name: (min, median)}."""
    times = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def build(work: Path, quick: bool) -> dict:
    """The volume and its images: {"volume", "passphrase", "passphrase-file", 2048, 4096} and the
    private key paths {("key", bits)}."""
    payload = reftools.make_squashfs(work / "tree", work / "payload.sqfs", {"bin/app": os.urandom(1 << 20)})
    volume = reftools.luks_encrypt_payload(payload, work / "volume.luks", PASSPHRASE, fast=quick)
    keyfile = work / "passphrase"
    keyfile.write_bytes(PASSPHRASE)
    made = {"volume": volume, "passphrase-file": keyfile,
            "passphrase": reftools.sifref_build(work / "passphrase.sif", volume)}
    for bits in BITS:
        private, public = keys.generate_key_pair(bits)
        (work / f"{bits}.pem").write_bytes(private)
        (work / f"{bits}.pub").write_bytes(public)
        # The image's key message wraps the volume's passphrase, as Apptainer's PEM mode does.
        made[bits] = reftools.sifref_build(work / f"pem{bits}.sif", volume, pem_pub=work / f"{bits}.pub", key=keyfile)
        made["key", bits] = work / f"{bits}.pem"
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="cheap KDF parameters (low noise, try-out)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved runs per measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-verify-key-") as tmp:
        made = build(Path(tmp), args.quick)
        fd = os.open(made["passphrase"], os.O_RDONLY)
        part = sif.read_sif(fd).primary_partition()
        caps = luks2.KdfCaps(memory_kib=1 << 20, time_cost=16, threads=8, pbkdf2_iterations=32_000_000)
        header = libcryptsetup.Header(fd, part.offset, part.size, caps)
        keyslot, digest = header.allowed[0], luks2.digest_of(header.volume, header.allowed[0])
        _, volume_key = header.unlock(PASSPHRASE)

        def snapshot():
            libcryptsetup.Header(fd, part.offset, part.size, caps).close()

        pem = {bits: (made["key", bits].read_bytes(), _message(made[bits])) for bits in BITS}
        # New processes run as an installed package would: with compiled bytecode (cached by the first
        # run under a private prefix), whatever PYTHONDONTWRITEBYTECODE the developer's shell sets.
        env = {k: v for k, v in os.environ.items() if "ENCRYPTION" not in k and k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        passphrase_argv = ["verify-key", str(made["passphrase"]), "--passphrase-file", str(made["passphrase-file"])]
        pem_argv = {bits: ["verify-key", str(made[bits]), "--pem-path", str(made["key", bits])] for bits in BITS}
        # The console script's own start-up: import the CLI and call main(), as pip's wrapper does.
        console = "import sys; from spank_sif.cli import main; sys.exit(main())"

        def run(*command):
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)

        results = measure({
            "libcryptsetup key check alone": lambda: header.unlock(PASSPHRASE)[1].wipe(),
            "part: SIF header": lambda: sif.read_sif(fd).primary_partition(),
            "part: LUKS2 header snapshot, load, view": snapshot,
            "part: squashfs check": lambda: luks2.decrypt_sectors(header.volume, fd, volume_key, 0, 1),
            **{f"part: load {bits}-bit key + unwrap": (
                lambda pem=pem[bits]: keys.unwrap_key(keys.load_private_key(pem[0], "bench"), pem[1]))
               for bits in BITS},
            "verify-key in process, passphrase": lambda: _quietly(cli_main, passphrase_argv),
            **{f"verify-key in process, PEM {bits}": (lambda argv=pem_argv[bits]: _quietly(cli_main, argv))
               for bits in BITS},
            "python start-up alone": lambda: run(sys.executable, "-c", "pass"),
            "python + argparse/cryptography/libcryptsetup": lambda: run(sys.executable, "-c", LIBRARY_FLOOR),
            "  + cryptography's RSA key loading": lambda: run(sys.executable, "-c", LIBRARY_FLOOR_PEM),
            "  + spank-sif's imports for verify-key": lambda: run(sys.executable, "-c", OWN_IMPORTS),
            "verify-key new process, passphrase": lambda: run(sys.executable, "-c", console, *passphrase_argv),
            "verify-key new process, PEM 4096": lambda: run(sys.executable, "-c", console, *pem_argv[4096]),
            "cryptsetup open --test-passphrase": lambda: run(
                "cryptsetup", "open", "--test-passphrase", "--key-file", str(made["passphrase-file"]),
                str(made["volume"])),
        }, args.repeat)
        header.close()
        os.close(fd)

    report(results, keyslot, digest, args.repeat)
    return 0


def _message(image_path: Path) -> bytes:
    fd = os.open(image_path, os.O_RDONLY)
    try:
        image = sif.read_sif(fd)
        message = next(m for m in image.crypto_messages(image.primary_partition()) if m.is_pem_rsa_oaep)
        return image.read_object(fd, message, keys.MAX_MESSAGE)
    finally:
        os.close(fd)


def _quietly(fn, argv):
    with open(os.devnull, "w") as devnull:
        saved, sys.stdout = sys.stdout, devnull
        try:
            assert fn(argv) == 0
        finally:
            sys.stdout = saved


def report(results: dict, keyslot, digest, repeat: int) -> None:
    print(f"keyslot KDF: {keyslot.kdf.describe()}; digest: pbkdf2-{digest.hash}, {digest.iterations} "
          f"iterations; {repeat} interleaved runs, wall ms; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"  {'':<44} {'min':>9} {'median':>9}")
    for name, (low, mid) in results.items():
        print(f"  {name:<44} {low:9.1f} {mid:9.1f}")
    t = {name: low for name, (low, _) in results.items()}
    check = t["libcryptsetup key check alone"]
    noise = results["libcryptsetup key check alone"][1] - check
    parts = t["part: SIF header"] + t["part: LUKS2 header snapshot, load, view"] + t["part: squashfs check"]
    modes = {"passphrase": parts, **{f"PEM {b}": parts + t[f"part: load {b}-bit key + unwrap"] for b in BITS}}
    floor, floor_pem = t["python + argparse/cryptography/libcryptsetup"], t["  + cryptography's RSA key loading"]
    imports = t["  + spank-sif's imports for verify-key"] - floor
    print(f"beyond libcryptsetup's key check (keyslot KDF + area + AF-merge + digest, {check:.1f} ms), "
          f"target < {TARGET_MS} ms; the parts timed directly:")
    print("  in process:  " + "; ".join(f"{mode} {ms:.1f} ms {'ok' if ms < TARGET_MS else 'OVER'}"
                                         for mode, ms in modes.items()))
    print("  new process: " + "; ".join(f"{mode} {ms + imports:.1f} ms {'ok' if ms + imports < TARGET_MS else 'OVER'}"
                                         for mode, ms in modes.items()) +
          f" (spank-sif's imports {imports:.1f} ms), plus the start-up floor of any Python command on "
          f"argparse, cryptography and libcryptsetup: {floor:.1f} ms, {floor_pem:.1f} ms with RSA key "
          f"loading (python alone {t['python start-up alone']:.1f} ms)")
    print(f"  cross-check, end to end minus the key check (noise: the key check alone varies by {noise:.0f} ms): "
          + "; ".join(f"{mode} {t[f'verify-key in process, {mode}'] - check:.1f} ms" for mode in modes)
          + f"; new process, passphrase {t['verify-key new process, passphrase'] - check - floor:.1f} ms and PEM 4096 "
          f"{t['verify-key new process, PEM 4096'] - check - floor_pem:.1f} ms beyond the floor")
    print(f"verify-key in process / cryptsetup --test-passphrase: "
          f"{t['verify-key in process, passphrase'] / t['cryptsetup open --test-passphrase']:.3f}; "
          f"new process / cryptsetup: "
          f"{t['verify-key new process, passphrase'] / t['cryptsetup open --test-passphrase']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
