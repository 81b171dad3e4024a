"""Benchmark: ``spank-sif verify-key`` costs the keyslot's KDF plus under 50 ms.

Side by side, in one run, on one image (a squashfs in a LUKS2 volume made by the real cryptsetup,
in a SIF laid out as Apptainer builds it), each step run round-robin so a busy machine slows all alike:

- the keyslot KDF alone, same parameters, in this process (the floor nobody can go under);
- the rest of the check, measured directly: SIF + LUKS2 headers, keyslot area + AF-merge + digest
  (the digest is a PBKDF2 that cryptsetup runs too), and for PEM mode loading the private key
  (with OpenSSL's key validation) and the RSA-OAEP unwrap, 2048- and 4096-bit keys;
- ``verify-key`` end to end, in this process (what the embedded plugin would pay) and as a new
  process (adds interpreter start-up and imports);
- ``cryptsetup open --test-passphrase`` on the same volume (what Apptainer's own check costs).

By default the volume gets cryptsetup's benchmarked defaults (what ``apptainer build --encrypt``
gets: Argon2id for about 2 s); ``--quick`` uses cheap parameters to try the script out.

    python3 bench/bench_verify_key.py [--quick] [--repeat N]
"""
import argparse
import hashlib
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
from spank_sif import keys, luks2, sif  # noqa: E402
from spank_sif.cli import main as cli_main  # noqa: E402

PASSPHRASE = b"benchmark passphrase"
TARGET_MS = 50


def measure(cases: dict, repeat: int) -> dict:
    """Wall times in ms of each case, run round-robin ``repeat`` times -> {name: (min, median)}."""
    times = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def build(workdir: Path, quick: bool) -> tuple[Path, Path, Path]:
    payload = reftools.make_squashfs(workdir / "tree", workdir / "payload.sqfs",
                                     {"bin/app": os.urandom(1 << 20)})
    volume = reftools.luks_encrypt_payload(payload, workdir / "volume.luks", PASSPHRASE, fast=quick)
    image = reftools.sifref_build(workdir / "image.sif", volume)
    keyfile = workdir / "passphrase"
    keyfile.write_bytes(PASSPHRASE)
    return volume, image, keyfile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="cheap KDF parameters (try-out only)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved runs per measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-verify-key-") as tmp:
        volume_path, image_path, keyfile = build(Path(tmp), args.quick)
        fd = os.open(image_path, os.O_RDONLY)
        part = sif.read_sif(fd).primary_partition()
        volume = luks2.read_luks2(fd, part.offset, part.size)
        keyslot, digest = volume.keyslots[0], volume.digests[0]
        area_key = luks2.derive_key(keyslot, PASSPHRASE)
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
        pem_cases = {}
        for bits in (2048, 4096):
            private_pem, public_pem = keys.generate_key_pair(bits)
            pem_cases[bits] = (private_pem, keys.wrap_key(load_pem_public_key(public_pem), os.urandom(64)))
        # New processes run as an installed package would: with compiled bytecode (cached by the first
        # run under a private prefix), whatever PYTHONDONTWRITEBYTECODE the developer's shell sets.
        env = {k: v for k, v in os.environ.items() if "ENCRYPTION" not in k and k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        argv = ["verify-key", str(image_path), "--passphrase-file", str(keyfile)]

        def cli_in_process():
            with open(os.devnull, "w") as devnull:
                saved, sys.stdout = sys.stdout, devnull
                try:
                    assert cli_main(argv) == 0
                finally:
                    sys.stdout = saved

        def run(*command, **kw):
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **kw)

        results = measure({
            "keyslot KDF alone (same parameters)": lambda: luks2.derive_key(keyslot, PASSPHRASE),
            "SIF + LUKS2 headers": lambda: luks2.read_luks2(
                fd, *(lambda p: (p.offset, p.size))(sif.read_sif(fd).primary_partition())),
            "after the KDF: area, AF-merge, digest check": lambda: luks2.recover_volume_key(
                volume, fd, keyslot, area_key),
            "  of which the digest PBKDF2": lambda: hashlib.pbkdf2_hmac(
                digest.hash, bytes(64), digest.salt, digest.iterations, len(digest.digest)),
            **{f"PEM mode only: load {bits}-bit key + RSA-OAEP unwrap": (
                lambda pem=pem, msg=msg: keys.unwrap_key(keys.load_private_key(pem, "bench"), msg))
               for bits, (pem, msg) in pem_cases.items()},
            "spank-sif verify-key (in process)": cli_in_process,
            "python start-up alone (python -c pass)": lambda: run(sys.executable, "-c", "pass", env=env),
            "python start-up + spank-sif imports": lambda: run(
                sys.executable, "-c", "import spank_sif.cli; spank_sif.cli.build_parser()", env=env, cwd=REPO),
            "spank-sif verify-key (new process)": lambda: run(
                sys.executable, "-m", "spank_sif", *argv, env=env, cwd=REPO),
            "cryptsetup open --test-passphrase": lambda: run(
                "cryptsetup", "open", "--test-passphrase", "--key-file", str(keyfile), str(volume_path)),
        }, args.repeat)
        os.close(fd)

    print(f"keyslot KDF: {keyslot.kdf.describe()}; digest: pbkdf2-{digest.hash}, {digest.iterations} "
          f"iterations; {args.repeat} interleaved runs, wall ms; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"  {'':<52} {'min':>9} {'median':>9}")
    for name, (low, mid) in results.items():
        print(f"  {name:<52} {low:9.1f} {mid:9.1f}")
    t = {name: low for name, (low, _) in results.items()}
    kdf = t["keyslot KDF alone (same parameters)"]
    beyond = t["SIF + LUKS2 headers"] + t["after the KDF: area, AF-merge, digest check"]
    own = beyond - t["  of which the digest PBKDF2"]
    pem2048, pem4096 = (t[f"PEM mode only: load {bits}-bit key + RSA-OAEP unwrap"] for bits in (2048, 4096))
    start_up = t["python start-up + spank-sif imports"]
    print(f"ratios (min): verify-key/KDF {t['spank-sif verify-key (in process)'] / kdf:.3f} in process, "
          f"{t['spank-sif verify-key (new process)'] / kdf:.3f} new process; verify-key (new process)/"
          f"cryptsetup {t['spank-sif verify-key (new process)'] / t['cryptsetup open --test-passphrase']:.3f}")
    print(f"beyond the keyslot KDF, in process (target < {TARGET_MS} ms): passphrase mode {beyond:.1f} ms "
          f"({own:.1f} ms without the digest PBKDF2); PEM mode {beyond + pem2048:.1f} ms (2048-bit key), "
          f"{beyond + pem4096:.1f} ms (4096-bit key: OpenSSL's RSA key validation dominates)")
    print(f"a new process adds interpreter start-up and imports: {start_up:.1f} ms "
          f"(python alone {t['python start-up alone (python -c pass)']:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
