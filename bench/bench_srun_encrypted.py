"""Benchmark: what an encrypted image adds to an srun step beyond the key derivation.

Runs in the VM harness (dm-crypt needed), on a real single-node Slurm started there, jobs as the
unprivileged test user. Alternately and N times, on the same cheap-KDF reference images (built the way
Apptainer builds them; cheap so the fixed costs are visible):
- plain:     ``srun --sif-image=plain.sif true``      (loop + squashfs mount, no crypto)
- encrypted: ``srun --sif-image=enc.sif true``        (the same plus LUKS2 unlock with dm-crypt)
- kdf:       ``cryptsetup open --test-passphrase`` on the encrypted partition (the KDF and digest
             check that any unlock pays, Apptainer's included)
Reports medians and: encrypted - plain - kdf = what spank-sif's encrypted path costs on top.

    python3 bench/bench_srun_encrypted.py [--runs N]   # on the host: boots the VM, runs itself there
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vmrun  # noqa: E402  (puts the repository and tests/ on sys.path)

REPO = vmrun.REPO


def inside(runs: int) -> dict:
    from slurm import SlurmCluster
    from slurm.fixtures import site_yaml
    from vm import fixtures

    ref = fixtures.ref_images(Path(os.environ["SPANK_SIF_VM_WORK"]) / "bench-ref")
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="spank-sif-bench-"))
    try:
        cluster.start()
        cluster.set_plugin(True)
        cluster.write_site_config(site_yaml(cluster))
        d = cluster.root / "images"
        d.mkdir(mode=0o755)
        images = {}
        for name, src in (("plain", ref.plain), ("encrypted", ref.fast_pass_4k)):
            images[name] = d / f"{name}.sif"
            shutil.copyfile(src, images[name])
            images[name].chmod(0o644)
        passphrase = ref.pass_file.read_text()
        env = {"APPTAINER_ENCRYPTION_PASSPHRASE": passphrase}
        times = {"plain": [], "encrypted": [], "kdf": []}
        with vmrun.partition_loop(images["encrypted"]) as loop:
            cluster.run(["srun", "true"], check=True)  # warm-up
            for i in range(runs):
                order = ["plain", "encrypted", "kdf"] if i % 2 == 0 else ["kdf", "encrypted", "plain"]
                for name in order:
                    start = time.perf_counter()
                    if name == "kdf":
                        subprocess.run(["cryptsetup", "open", "--test-passphrase", "--type", "luks2",
                                        "--key-file", str(ref.pass_file), loop], check=True)
                    else:
                        cluster.run(["srun", f"--sif-image={images[name]}", "true"], env=env, check=True)
                    times[name].append(time.perf_counter() - start)
    finally:
        cluster.cleanup()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"runs": runs, "median_s": {k: round(v, 3) for k, v in med.items()},
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "encrypted_beyond_plain_and_kdf_s": round(med["encrypted"] - med["plain"] - med["kdf"], 3)}


def summarize(report: dict) -> None:
    m = report["median_s"]
    print(f"srun with a plain image {m['plain']:.3f} s, with an encrypted image {m['encrypted']:.3f} s; "
          f"KDF + digest (cryptsetup --test-passphrase) {m['kdf']:.3f} s; encrypted path beyond plain "
          f"and KDF: {report['encrypted_beyond_plain_and_kdf_s'] * 1000:.0f} ms (all under emulation)")


def main() -> int:
    return vmrun.main(__file__, __doc__, inside, 7, summarize)

if __name__ == "__main__":
    sys.exit(main())
