"""Benchmark: a batch job of 4 srun steps on an encrypted image vs a job of 1 step (one unlock per
job per node), and the 4-step job with reuse_mappings off (every step derives the key).

Runs in the VM harness (dm-crypt needed), on a real single-node Slurm started there, jobs as the
unprivileged test user, on the reference image with cryptsetup's default KDF (Argon2id, as
Apptainer leaves it: the derivation is what reuse saves). Alternately and N times:
- one:          ``sbatch --wait`` of a script running ``srun --sif-image=enc.sif true`` once
- four:         the same script running it 4 times (reuse_mappings: true, the default)
- four-no-reuse: the 4-step script with reuse_mappings: false
Reports medians and the ratios four / one and four-no-reuse / one.

    python3 bench/bench_reuse.py [--runs N]   # on the host: boots the VM, runs itself there
"""
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import vmrun  # noqa: E402  (puts the repository and tests/ on sys.path)

VARIANTS = ("one", "four", "four-no-reuse")


def inside(runs: int) -> dict:
    from slurm import SlurmCluster
    from slurm.fixtures import site_yaml
    from vm import fixtures

    ref = fixtures.ref_images(Path(os.environ["SPANK_SIF_VM_WORK"]) / "bench-ref")
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="spank-sif-bench-"))
    try:
        cluster.start()
        cluster.set_plugin(True)
        d = cluster.root / "images"
        d.mkdir(mode=0o755)
        image = d / "enc.sif"
        shutil.copyfile(ref.enc_pass, image)
        image.chmod(0o644)
        env = {"APPTAINER_ENCRYPTION_PASSPHRASE": ref.pass_file.read_text()}
        step = f"srun --sif-image={image} true\n"
        scripts = {"one": "#!/bin/sh\n" + step, "four": "#!/bin/sh\n" + step * 4}
        scripts["four-no-reuse"] = scripts["four"]
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cluster.write_site_config(site_yaml(cluster))
        cluster.run(["srun", "true"], check=True)  # warm-up
        for i in range(runs):
            for name in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                cluster.write_site_config(site_yaml(cluster, "reuse_mappings: false\n"
                                                    if name == "four-no-reuse" else ""))
                start = time.perf_counter()
                cluster.run(["sbatch", "--wait", "-o", "/dev/null"], input=scripts[name], env=env,
                            check=True, timeout=1200)
                times[name].append(time.perf_counter() - start)
                cluster.wait_jobs_done(timeout=120)  # the epilog, outside the timing
    finally:
        cluster.cleanup()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"runs": runs, "median_s": {k: round(v, 3) for k, v in med.items()},
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "four_over_one": round(med["four"] / med["one"], 2),
            "four_no_reuse_over_one": round(med["four-no-reuse"] / med["one"], 2)}


def summarize(report: dict) -> None:
    m = report["median_s"]
    print(f"batch job, default-KDF image: 1 step {m['one']:.2f} s, 4 steps {m['four']:.2f} s "
          f"(ratio {report['four_over_one']}), 4 steps with reuse_mappings off {m['four-no-reuse']:.2f} s "
          f"(ratio {report['four_no_reuse_over_one']}), medians of {report['runs']} (under emulation)")


def main() -> int:
    return vmrun.main(__file__, __doc__, inside, 3, summarize)


if __name__ == "__main__":
    sys.exit(main())
