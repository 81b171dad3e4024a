#!/usr/bin/env python3
"""Benchmark: `spank-sif inspect` costs the same whatever the image's size, because it reads only
the global header and the descriptor table.

Builds encrypted-layout images whose partition is 1 MiB, 1 GiB and 64 GiB (sparse files, so they
cost no disk), then measures side by side, in one run:
  - the time of `read_sif` and of the whole `inspect` command (in-process, output discarded);
  - the bytes read, counted two ways: by wrapping os.pread, and by the kernel (/proc/self/io rchar).
Usage: python3 bench/bench_inspect.py [--rounds N] [--dir DIR]
"""
import argparse
import contextlib
import io
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spank_sif import sif  # noqa: E402
from spank_sif.cli import main  # noqa: E402

SIZES = {"1 MiB": 1 << 20, "1 GiB": 1 << 30, "64 GiB": 1 << 36}
EXPECTED_BYTES = sif.HEADER.size + sif.DEFAULT_DESCRIPTORS * sif.DESCRIPTOR.size


def sparse_image(path: Path, partition_size: int) -> None:
    """An image laid out as Apptainer's, whose partition (the last object) is grown to
    ``partition_size`` bytes of holes: the header and descriptor are updated to match."""
    image = sif.write_sif(path, sif.apptainer_layout(b"LUKS\xba\xbe", deffile=b"Bootstrap: docker\n",
                                                     crypto_message=b"-----BEGIN MESSAGE-----\n"))
    part, message = image.primary_partition(), image.descriptors[-1]
    # Put the message first and the partition last, so the partition can grow into a hole.
    with open(path, "r+b") as f:
        data = os.pread(f.fileno(), message.size, message.offset)
        os.pwrite(f.fileno(), data, part.offset)
        new_part_offset = part.offset + 4096
        table = sif.DEFAULT_DESCRIPTORS_OFFSET
        for d, offset, size in ((message, part.offset, message.size), (part, new_part_offset, partition_size)):
            os.pwrite(f.fileno(), struct.pack("<qq", offset, size), table + d.index * sif.DESCRIPTOR.size + 17)
        end = new_part_offset + partition_size
        os.pwrite(f.fileno(), struct.pack("<q", end - image.header.data_offset), 120)
        f.truncate(end)


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@contextlib.contextmanager
def counting_pread():
    counted = [0]
    real = os.pread

    def pread(fd, n, offset):
        data = real(fd, n, offset)
        counted[0] += len(data)
        return data
    os.pread = pread
    try:
        yield counted
    finally:
        os.pread = real


def median_seconds(fn, rounds: int) -> float:
    fn()                                        # warm up (imports, caches)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(path: Path, rounds: int) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sif.read_sif(fd).primary_partition().size == path.stat().st_size - 36864
        read_time = median_seconds(lambda: sif.read_sif(fd), rounds)
        with counting_pread() as counted:
            sif.read_sif(fd)
        read_bytes = counted[0]
    finally:
        os.close(fd)

    def inspect():
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["inspect", str(path)]) == 0
    cli_time = median_seconds(inspect, rounds)
    before = rchar()
    inspect()
    cli_bytes = rchar() - before
    return {"read_time": read_time, "read_bytes": read_bytes, "cli_time": cli_time, "cli_bytes": cli_bytes}


def run(rounds: int, directory: str | None) -> dict:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        results = {}
        for label, size in SIZES.items():
            path = Path(tmp) / f"{label.replace(' ', '')}.sif"
            sparse_image(path, size)
            results[label] = measure(path, rounds)
    return results


def report(results: dict) -> bool:
    print(f"{'partition':>10}  {'bytes':>14}  {'read_sif':>10}  {'inspect':>10}  {'pread bytes':>11}  {'rchar':>7}")
    for label, r in results.items():
        print(f"{label:>10}  {SIZES[label]:>14}  {r['read_time'] * 1e6:>8.0f}us  {r['cli_time'] * 1e6:>8.0f}us"
              f"  {r['read_bytes']:>11}  {r['cli_bytes']:>7}")
    small, large = results[min(SIZES, key=SIZES.get)], results[max(SIZES, key=SIZES.get)]
    ratio_read = large["read_time"] / small["read_time"]
    ratio_cli = large["cli_time"] / small["cli_time"]
    same_bytes = len({r["read_bytes"] for r in results.values()}) == 1
    print(f"time ratio {max(SIZES, key=SIZES.get)} / {min(SIZES, key=SIZES.get)}: "
          f"read_sif {ratio_read:.2f}, inspect {ratio_cli:.2f} (1.00 = constant)")
    print(f"bytes read by read_sif: {small['read_bytes']} at every size "
          f"(header {sif.HEADER.size} + {sif.DEFAULT_DESCRIPTORS} descriptors x {sif.DESCRIPTOR.size} = "
          f"{EXPECTED_BYTES}): {'yes' if same_bytes and small['read_bytes'] == EXPECTED_BYTES else 'NO'}")
    return same_bytes and small["read_bytes"] == EXPECTED_BYTES


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--dir", help="where to put the sparse images (default: $TMPDIR)")
    args = parser.parse_args()
    sys.exit(0 if report(run(args.rounds, args.dir)) else 1)
