"""Benchmark: the cost of opening an encrypted image beyond the keyslot KDF.

Runs in the VM harness (dm-crypt is needed). For each reference image (cryptsetup's default KDF, as
Apptainer leaves it, and a cheap-KDF one that exposes the fixed costs), alternately and N times:

- baseline: ``cryptsetup open --test-passphrase`` on the same LUKS2 volume (a loop device over the
  partition, set up outside the timing): process start, header load, the KDF, the digest check;
- engine: ``lifecycle.unlock`` + ``lifecycle.mount`` in-process (open as the user, SIF and LUKS2
  parsing, loop device, libcryptsetup activation with the same KDF, /dev/mapper wait, mount);
- cli: the whole ``spank-sif open`` command (adds Python start-up), for information.

Reports medians and the ratio engine / baseline (target: at most 1.2 for the default-KDF image).

    python3 bench/bench_open.py [--runs N]            # on the host: boots the VM, runs itself there
"""
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import vmrun  # noqa: E402  (puts the repository and tests/ on sys.path)

REPO = vmrun.REPO


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def inside(runs: int) -> dict:
    from engine_helpers import USER, cli, ensure_users, world_dir, write_config
    from vm import fixtures
    from spank_sif import lifecycle
    from spank_sif.config import SiteConfig
    from spank_sif.userfiles import User

    ensure_users()
    work = Path(os.environ["SPANK_SIF_VM_WORK"])
    ref = fixtures.ref_images(work / "bench-ref")
    d = world_dir("bench-open-")
    passphrase = (ref.dir / "pass.txt").read_bytes()
    (d / "pass.txt").write_bytes(passphrase)
    (d / "pass.txt").chmod(0o644)
    state = d / "state"
    config = SiteConfig(state_dir=str(state))
    config_file = write_config(d / "site.yaml", state_dir=str(state))
    user = User.from_name(USER)
    env = {"APPTAINER_ENCRYPTION_PASSPHRASE": passphrase.decode()}
    target = d / "mnt"
    target.mkdir()
    report = {}
    for label, source in (("default KDF", ref.enc_pass), ("cheap KDF", ref.fast_pass_4k)):
        image = d / source.name
        image.write_bytes(source.read_bytes())
        image.chmod(0o644)
        times = {"baseline": [], "engine": [], "cli": []}
        with vmrun.partition_loop(image) as loop:
            def baseline():
                subprocess.run(["cryptsetup", "open", "--test-passphrase", "--type", "luks2", "--key-file",
                                str(d / "pass.txt"), loop], check=True)

            def engine():
                unlocked = lifecycle.unlock(str(image), user, env, "bench", config)
                lifecycle.mount(unlocked, str(target), private=False)
                engine.unlocked = unlocked

            def via_cli():
                proc = cli("open", image, target, "--user", USER, "--passphrase-file", d / "pass.txt",
                           "--config", config_file)
                assert proc.returncode == 0, proc.stderr

            for _ in range(runs):
                times["baseline"].append(_timed(baseline))
                times["engine"].append(_timed(engine))
                lifecycle.release(engine.unlocked, config)
                times["cli"].append(_timed(via_cli))
                lifecycle.release(str(target), config)
        med = {k: statistics.median(v) for k, v in times.items()}
        report[label] = {"runs": runs, "median_s": {k: round(v, 3) for k, v in med.items()},
                         "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                         "ratio_engine_vs_test_passphrase": round(med["engine"] / med["baseline"], 3),
                         "ratio_cli_vs_test_passphrase": round(med["cli"] / med["baseline"], 3)}
    return report


def summarize(report: dict) -> None:
    for label, r in report.items():
        m = r["median_s"]
        print(f"{label}: cryptsetup --test-passphrase {m['baseline']:.3f} s, engine open {m['engine']:.3f} s "
              f"(ratio {r['ratio_engine_vs_test_passphrase']:.2f}; target <= 1.2 for the default KDF), "
              f"CLI {m['cli']:.3f} s (ratio {r['ratio_cli_vs_test_passphrase']:.2f})")


def main() -> int:
    return vmrun.main(__file__, __doc__, inside, 5, summarize)

if __name__ == "__main__":
    sys.exit(main())
