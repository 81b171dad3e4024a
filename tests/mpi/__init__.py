"""Programs for MPI-style job steps, in C with nothing but libc (static: they run on the host and,
unchanged, inside any container image).

``pmi2_allgather()``: the binary of ``pmi2_allgather.c``, built once per source version into the test
cache. The VM harness builds it on the host before booting (``tests/vm/plugin.py``): the compiler
under emulation takes half a minute for what takes half a second here.
"""
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import reftools

SOURCE = Path(__file__).resolve().with_name("pmi2_allgather.c")


def pmi2_allgather() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    home = reftools.CACHE / "mpi"
    binary = home / digest / "pmi2_allgather"
    if binary.exists():
        return binary
    try:
        binary.parent.mkdir(parents=True, exist_ok=True)
        for old in home.iterdir():
            if old.name != digest:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:  # a read-only cache (the VM's view of one not built before booting)
        binary = Path(tempfile.mkdtemp(prefix="spank-sif-mpi-")) / "pmi2_allgather"
    partial = binary.with_name(f"{binary.name}.partial")
    subprocess.run(["cc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(partial),
                    str(SOURCE)], check=True)
    partial.rename(binary)
    return binary
