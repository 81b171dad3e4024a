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


def timed(fn, repeat):
    """Median wall time of ``fn()`` in ms over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


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

        kdf_ms = timed(lambda: luks2.derive_key(keyslot, PASSPHRASE), args.repeat)
        digest_ms = timed(lambda: luks2.hashlib.pbkdf2_hmac(digest.hash, bytes(64), digest.salt,
                                                             digest.iterations, len(digest.digest)),
                          args.repeat)
        rest_ms = timed(lambda: luks2.open_keyslot(volume, fd, keyslot, PASSPHRASE), args.repeat) - kdf_ms
        startup_ms = timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), args.repeat)
        sub_ms = timed(cli_subprocess, args.repeat)
        inproc_ms = timed(cli_in_process, args.repeat)
        cs_ms = timed(cryptsetup_test, args.repeat)
        os.close(fd)

    overhead_sub, overhead_in = sub_ms - kdf_ms, inproc_ms - kdf_ms
    print(f"keyslot KDF: {keyslot.kdf.describe()}; digest: pbkdf2-{digest.hash}, {digest.iterations} "
          f"iterations; median of {args.repeat} runs")
    rows = [
        ("keyslot KDF alone (same parameters)", kdf_ms),
        ("  digest PBKDF2 alone (part of the check)", digest_ms),
        ("  keyslot area + AF-merge + digest (after the KDF)", rest_ms),
        ("python start-up alone (python -c pass)", startup_ms),
        ("spank-sif verify-key (new process)", sub_ms),
        ("spank-sif verify-key (in process)", inproc_ms),
        ("cryptsetup open --test-passphrase", cs_ms),
    ]
    for name, ms in rows:
        print(f"  {name:<52} {ms:9.1f} ms")
    print(f"verify-key / KDF: {sub_ms / kdf_ms:.3f} (new process), {inproc_ms / kdf_ms:.3f} (in process); "
          f"verify-key / cryptsetup: {sub_ms / cs_ms:.3f}")
    print(f"overhead over the KDF: {overhead_sub:.1f} ms (new process), {overhead_in:.1f} ms (in process); "
          f"target < {TARGET_MS} ms: {'met' if overhead_sub < TARGET_MS else 'NOT met'} (new process), "
          f"{'met' if overhead_in < TARGET_MS else 'NOT met'} (in process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
