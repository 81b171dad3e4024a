"""Run a benchmark's measuring part where dm-crypt is: here if this kernel has it (or we are the VM
harness's guest), else inside one VM of the harness (tests/vm), and return what it measured."""
import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def measure(script: str, inside, runs: int, inside_flag: bool) -> dict | None:
    """``inside(runs)`` -> JSON-able dict, run in the guest by re-running ``script --inside``.
    Prints the guest's output tail and returns None if the VM run failed."""
    if inside_flag or os.environ.get("SPANK_SIF_IN_VM") == "1":
        return inside(runs)
    from vm import fixtures
    from vm.harness import run_in_vm
    import reftools
    reftools.reftools()  # build the reference tools here: Go under emulation is slow
    result = run_in_vm([sys.executable, script, "--inside", "--runs", str(runs)], cwd=REPO,
                       rwdirs=(fixtures.prepare_cache(),), timeout=1800)
    if result.returncode != 0:
        print(result.tail(), file=sys.stderr)
        return None
    return json.loads(result.stdout)


def main(script: str, doc: str, inside, default_runs: int, summarize) -> int:
    """A VM benchmark's command line: ``--runs N``; measure (in the VM if needed), print the JSON
    report, then ``summarize(report)`` for people (not in the guest, whose stdout is the JSON)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--runs", type=int, default=default_runs)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    report = measure(script, inside, args.runs, args.inside)
    if report is None:
        return 1
    print(json.dumps(report, indent=1))
    if not args.inside:
        summarize(report)
    return 0


@contextlib.contextmanager
def partition_loop(image):
    """A read-only loop device over the image's primary partition (the baseline for
    ``cryptsetup open --test-passphrase``), set up outside any timing and removed afterwards."""
    from spank_sif import sif
    fd = os.open(image, os.O_RDONLY)
    try:
        part = sif.read_sif(fd).primary_partition()
    finally:
        os.close(fd)
    loop = subprocess.run(["losetup", "-f", "--show", "-r", "-o", str(part.offset), "--sizelimit",
                           str(part.size), str(image)], capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
