"""What entering the container costs a task: `srun --sif-container true` vs mount mode, side by side
on a real single-node Slurm (as root), on the same plain image (the busybox test image: an
environment script, no /home, so a scaffold is built for the home directory).

Three variants per task count N, alternating round by round (drift on a shared machine hits all
alike):
  mount, host true    srun --sif-image=IMG true                the node's /bin/true, image mounted
  mount, image true   srun --sif-image=IMG <mount point>/bin/true   the image's (busybox) true
  container           srun --sif-image=IMG --sif-container true     the image's true, inside
Reported: medians, ratios, and the difference per task (difference / N). Container vs "mount,
image true" is what entering costs (building the root, binds, identity files, pivot_root, the
image's environment scripts): both run the same program from the same freshly mounted image, so
reading it from the image (squashfs decompresses it anew for each step) counts on both sides.
Container vs "mount, host true" is the whole difference a user sees. Target: under 20 ms per task.

    <prefix>/bin/python3 bench/bench_container.py [--rounds 20] [--tasks 1 4]
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import container_images  # noqa: E402
from bench_srun import compare, summary  # noqa: E402
from slurm import SlurmCluster  # noqa: E402
from spank_sif import sif  # noqa: E402


def container_image(cluster) -> Path:
    d = cluster.root / "images"
    d.mkdir(mode=0o755, exist_ok=True)
    squashfs = container_images.build_squashfs(d, "container")
    image = d / "container.sif"
    sif.write_sif(str(image), sif.apptainer_layout(squashfs.read_bytes(), sif.FsType.SQUASHFS))
    os.chmod(image, 0o644)
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (starts slurmctld and slurmd)", file=sys.stderr)
        return 2
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="spank-sif-bench-"))
    try:
        cluster.start()
        cluster.write_site_config(f"mount_point: {cluster.root / 'sif'}\n")
        image = container_image(cluster)
        base = ["srun", "--overcommit", f"--sif-image={image}"]
        image_true = str(cluster.root / "sif" / "bin" / "true")
        cluster.run([*base, "--sif-container", "true"], check=True)  # warm-up (first job, caches)
        for n in args.tasks:
            print(f"srun -n {n} true on a plain image ({args.rounds} rounds)")
            t = compare(cluster, args.rounds, {
                "mount, host true": (True, [*base, f"-n{n}", "true"]),
                "mount, image true": (True, [*base, f"-n{n}", image_true]),
                "container": (True, [*base, f"-n{n}", "--sif-container", "true"])})
            for name, values in t.items():
                print(f"   {name:18} {summary(values)}")
            container = statistics.median(t["container"])
            for name in ("mount, image true", "mount, host true"):
                mount = statistics.median(t[name])
                print(f"   container vs {name:18} ratio {container / mount:.3f}, per task "
                      f"{(container - mount) / n * 1000:+.1f} ms (medians)")
    finally:
        cluster.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
