"""What the plugin costs srun, measured side by side on a real single-node Slurm (as root).

1. A step WITHOUT --sif-image, plugin loaded vs not loaded (plugstack.conf empty): the ratio of
   median wall times; target: indistinguishable (within 2%), since the C shim never starts Python.
2. A step WITH --sif-image on a plain (unencrypted) image vs the same step without it (plugin
   loaded): the per-step overhead of opening, checking, loop-mounting and releasing the image.

3. What loading the plugin costs a process (srun and slurmstepd each load it once, slurmd at start):
   a fresh process dlopen()ing it as Slurm does (RTLD_LAZY, local; this maps libpython, which is
   never initialised) vs not, in CPU time, which other load on the machine disturbs less.

Runs alternate between the variants, so drift on a shared machine hits both alike.

    <prefix>/bin/python3 bench/bench_srun.py [--rounds 30]
"""
import argparse
import os
import resource
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import reftools  # noqa: E402
from slurm import SlurmCluster  # noqa: E402
from spank_sif import sif  # noqa: E402


def plain_image(cluster) -> Path:
    d = cluster.root / "images"
    d.mkdir(mode=0o755, exist_ok=True)
    squashfs = reftools.make_squashfs(d / "tree", d / "rootfs.sqfs", {"hello.txt": b"hi\n"})
    image = d / "plain.sif"
    sif.write_sif(str(image), sif.apptainer_layout(squashfs.read_bytes(), sif.FsType.SQUASHFS))
    os.chmod(image, 0o644)
    return image


def timed(cluster, argv) -> float:
    start = time.perf_counter()
    cluster.run(argv, check=True)
    return time.perf_counter() - start


def compare(cluster, rounds: int, variants: dict) -> dict:
    """variants: name -> (plugin loaded?, argv). Returns name -> list of seconds."""
    times = {name: [] for name in variants}
    names = list(variants)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            loaded, argv = variants[name]
            cluster.set_plugin(loaded)
            times[name].append(timed(cluster, argv))
    cluster.set_plugin(True)
    return times


def summary(times: list) -> str:
    return (f"median {statistics.median(times) * 1000:7.1f} ms   mean {statistics.mean(times) * 1000:7.1f} ms"
            f"   stdev {statistics.pstdev(times) * 1000:6.1f} ms")


def load_cost(rounds: int) -> tuple:
    """Median wall and mean CPU (ms) of a fresh process that only loads ctypes, without and with
    dlopen(plugin, RTLD_LAZY)."""
    from spank_sif.cli.plugin import plugin_path  # the installed plugin (run with its Python)
    codes = {"not loaded": "import ctypes",
             "loaded": f"import ctypes; ctypes.CDLL({plugin_path()!r}, mode={os.RTLD_LAZY})"}
    results = {name: ([], 0.0) for name in codes}
    for i in range(rounds):
        for name in (list(codes) if i % 2 == 0 else list(codes)[::-1]):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(["/usr/bin/python3", "-S", "-c", codes[name]], check=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            walls, total = results[name]
            walls.append(wall)
            results[name] = (walls, total + cpu)
    return {name: (statistics.median(w) * 1000, total / rounds * 1000)
            for name, (w, total) in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (starts slurmctld and slurmd)", file=sys.stderr)
        return 2
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="spank-sif-bench-"))
    try:
        cluster.start()
        image = plain_image(cluster)
        cluster.run(["srun", "true"], check=True)  # warm-up (first job, caches)

        print(f"1. srun true, no --sif-image: plugin loaded vs not loaded ({args.rounds} rounds each)")
        t = compare(cluster, args.rounds, {"not loaded": (False, ["srun", "true"]),
                                           "loaded": (True, ["srun", "true"])})
        for name, values in t.items():
            print(f"   {name:12} {summary(values)}")
        ratio = statistics.median(t["loaded"]) / statistics.median(t["not loaded"])
        print(f"   ratio loaded/not loaded (medians): {ratio:.3f}  (target <= 1.02)")

        print("2. srun true with --sif-image (plain image) vs without, plugin loaded")
        t = compare(cluster, args.rounds, {"without": (True, ["srun", "true"]),
                                           "with": (True, ["srun", f"--sif-image={image}", "true"])})
        for name, values in t.items():
            print(f"   {name:12} {summary(values)}")
        extra = statistics.median(t["with"]) - statistics.median(t["without"])
        print(f"   per-step overhead of --sif-image (medians): {extra * 1000:.1f} ms")

        print(f"3. loading the plugin into a fresh process ({args.rounds * 2} rounds each)")
        costs = load_cost(args.rounds * 2)
        for name, (wall, cpu) in costs.items():
            print(f"   {name:12} median wall {wall:6.1f} ms   mean CPU {cpu:6.2f} ms")
        print(f"   CPU cost of loading the plugin: "
              f"{costs['loaded'][1] - costs['not loaded'][1]:.2f} ms per process")
    finally:
        cluster.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
