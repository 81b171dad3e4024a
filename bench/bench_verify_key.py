"""Benchmark: ``spank-sif verify-key`` costs the keyslot's KDF plus under 50 ms.

Side by side, in one run, on one image (a squashfs in a LUKS2 volume made by the real cryptsetup,
in a SIF laid out as Apptainer builds it):

- the keyslot KDF alone, same parameters, in this process (the floor nobody can go under);
- ``verify-key`` as a user runs it (new interpreter: start-up, imports, header, KDF, AF-merge, digest);
- ``verify-key`` in this process (the same work without interpreter start-up);
- ``cryptsetup open --test-passphrase`` on the same volume (what Apptainer's own check costs).

By default the volume gets cryptsetup's benchmarked defaults (what ``apptainer build --encrypt``
gets: Argon2id for about 2 s); ``--quick`` uses cheap parameters to try the script out.

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
from spank_sif import luks2  # noqa: E402
from spank_sif.cli import main as cli_main  # noqa: E402

PASSPHRASE = b"benchmark passphrase"
TARGET_MS = 50


def measure(cases: dict, repeat: int) -> dict:
    """Wall times in ms of each case, run round-robin ``repeat`` times so that a busy machine slows
    them all alike; returns {name: (min, median)}."""
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
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-verify-key-") as tmp:
        volume_path, image, keyfile = build(Path(tmp), args.quick)
        fd = os.open(volume_path, os.O_RDONLY)
        volume = luks2.read_luks2(fd)
        keyslot = volume.keyslots[0]
        digest = volume.digests[0]
        env = {k: v for k, v in os.environ.items() if "ENCRYPTION" not in k}
        argv = ["verify-key", str(image), "--passphrase-file", str(keyfile)]

        def cli_subprocess():
            subprocess.run([sys.executable, "-m", "spank_sif", *argv], check=True, env=env, cwd=REPO,
                           stdout=subprocess.DEVNULL)

        def cli_in_process():
            with open(os.devnull, "w") as devnull:
                saved, sys.stdout = sys.stdout, devnull
                try:
                    assert cli_main(argv) == 0
                finally:
                    sys.stdout = saved

        def cryptsetup_test():
            subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", str(keyfile),
                            str(volume_path)], check=True)

        area_key = luks2.derive_key(keyslot, PASSPHRASE)
        results = measure({
            "keyslot KDF alone (same parameters)": lambda: luks2.derive_key(keyslot, PASSPHRASE),
            "  after the KDF: area, AF-merge, digest check": lambda: luks2.recover_volume_key(
                volume, fd, keyslot, area_key),
            "    of which the digest PBKDF2": lambda: luks2.hashlib.pbkdf2_hmac(
                digest.hash, bytes(64), digest.salt, digest.iterations, len(digest.digest)),
            "python start-up alone (python -c pass)": lambda: subprocess.run(
                [sys.executable, "-c", "pass"], check=True),
            "python start-up + spank-sif imports, no work": lambda: subprocess.run(
                [sys.executable, "-c", "import spank_sif.cli; spank_sif.cli.build_parser()"], check=True,
                cwd=REPO),
            "spank-sif verify-key (new process)": cli_subprocess,
            "spank-sif verify-key (in process)": cli_in_process,
            "cryptsetup open --test-passphrase": cryptsetup_test,
        }, args.repeat)
        os.close(fd)

    print(f"keyslot KDF: {keyslot.kdf.describe()}; digest: pbkdf2-{digest.hash}, {digest.iterations} "
          f"iterations; {args.repeat} interleaved runs, ms")
    print(f"  {'':<52} {'min':>9} {'median':>9}")
    for name, (low, mid) in results.items():
        print(f"  {name:<52} {low:9.1f} {mid:9.1f}")
    kdf = results["keyslot KDF alone (same parameters)"][0]
    new, inproc = results["spank-sif verify-key (new process)"][0], results["spank-sif verify-key (in process)"][0]
    cryptsetup = results["cryptsetup open --test-passphrase"][0]
    startup = results["python start-up alone (python -c pass)"][0]
    print(f"ratios (min): verify-key/KDF {new / kdf:.3f} new process, {inproc / kdf:.3f} in process; "
          f"verify-key/cryptsetup {new / cryptsetup:.3f}")
    imports = results["python start-up + spank-sif imports, no work"][0]
    for label, total in (("in process", inproc), ("new process", new),
                         ("new process minus interpreter start-up", new - startup),
                         ("new process minus start-up and imports", new - imports)):
        over = total - kdf
        print(f"overhead over the KDF, {label}: {over:.1f} ms "
              f"({'meets' if over < TARGET_MS else 'misses'} the {TARGET_MS} ms target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
