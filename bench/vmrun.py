"""Run a benchmark's measuring part where dm-crypt is: here if this kernel has it (or we are the VM
harness's guest), else inside one VM of the harness (tests/vm), and return what it measured."""
import json
import os
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
