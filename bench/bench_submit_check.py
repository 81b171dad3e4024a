"""What the submit check (site key submit_check) costs sbatch and srun, side by side on a real
single-node Slurm (as root): off vs fast vs full, wall time and the command's peak memory.

1. `sbatch --hold` with an encrypted image whose key derivation has cryptsetup's default costs
   (argon2id, as `apptainer build --encrypt` makes them): full pays one derivation on the submit
   host, fast should cost about what off costs plus reading the SIF and LUKS2 headers.
2. `srun true` with a plain image (no key): the per-step cost of the check itself.

Variants alternate round by round, so drift on a shared machine hits them alike; held jobs are
cancelled as they come. Ratios are of medians, against `off`.

    <prefix>/bin/python3 bench/bench_submit_check.py [--rounds 5]
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import reftools  # noqa: E402
from slurm import SlurmCluster  # noqa: E402
from spank_sif import sif  # noqa: E402

KEY = b"bench-key"
MODES = ("off", "fast", "full")
# Runs the command and reports its wall time and its peak resident memory (the only child).
MEASURE = """\
import resource, subprocess, sys, time
start = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
if result.returncode:
    sys.exit(result.stderr)
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, (result.stdout.split() or ["-"])[-1])
"""


def images(cluster) -> dict:
    d = cluster.root / "images"
    d.mkdir(mode=0o755, exist_ok=True)
    squashfs = reftools.make_squashfs(d / "tree", d / "rootfs.sqfs", {"hello.txt": b"hi\n"})
    encrypted = reftools.luks_encrypt_payload(squashfs, d / "payload.luks", KEY, fast=False)
    out = {"plain": d / "plain.sif", "encrypted": d / "encrypted.sif"}
    sif.write_sif(str(out["plain"]), sif.apptainer_layout(squashfs.read_bytes(), sif.FsType.SQUASHFS))
    sif.write_sif(str(out["encrypted"]), sif.apptainer_layout(encrypted.read_bytes(),
                                                              sif.FsType.ENCRYPTED_SQUASHFS))
    for path in out.values():
        os.chmod(path, 0o644)
    return out


def measure(cluster, argv, env) -> tuple:
    result = cluster.run([sys.executable, "-c", MEASURE, *argv], env=env, check=True)
    wall, peak, last = result.stdout.split()
    if last.isdigit():  # sbatch --hold: its job ID
        cluster.run(["scancel", last], check=True)
    return float(wall), int(peak)


def compare(cluster, rounds: int, argv, env) -> dict:
    results = {mode: ([], []) for mode in MODES}
    for i in range(rounds):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            cluster.write_site_config(f"mount_point: {cluster.root / 'sif'}\nsubmit_check: {mode}\n")
            wall, peak = measure(cluster, argv, env)
            results[mode][0].append(wall)
            results[mode][1].append(peak)
    return results


def report(results: dict) -> None:
    base = statistics.median(results["off"][0])
    for mode, (walls, peaks) in results.items():
        median = statistics.median(walls)
        print(f"   {mode:5} median {median * 1000:8.1f} ms  ratio to off {median / base:6.2f}   "
              f"peak memory {max(peaks) / 1024:7.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (starts slurmctld and slurmd)", file=sys.stderr)
        return 2
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="spank-sif-bench-"))
    try:
        cluster.start()
        image = images(cluster)
        cluster.run(["srun", "true"], check=True)  # warm-up (first job, caches)
        env = {"APPTAINER_ENCRYPTION_PASSPHRASE": KEY.decode()}
        print(f"1. sbatch --hold, encrypted image with cryptsetup's default KDF ({args.rounds} rounds)")
        report(compare(cluster, args.rounds, ["sbatch", "--hold", "--parsable", "-o", "/dev/null",
                                              f"--sif-image={image['encrypted']}", "--wrap", "true"], env))
        print(f"2. srun true, plain image ({args.rounds * 4} rounds)")
        report(compare(cluster, args.rounds * 4, ["srun", f"--sif-image={image['plain']}", "true"], {}))
    finally:
        cluster.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
