"""Benchmark: ``spank-sif encrypt`` against cryptsetup writing the same data through dm-crypt.

Runs in the VM harness (the dm-crypt side needs device-mapper), on its tmpfs. The input is a 1 GiB
file that starts like a squashfs and is otherwise a hole (sparse: it costs no memory, and AES costs
the same whatever the bytes); both sides read the same file. Alternately and N times:

- encrypt:      ``builder.build_encrypted_image`` in a forked child (the whole command but Python's
                start-up: LUKS2 header by cryptsetup, data encrypted here, SIF written, read back,
                checked), 4096-byte sectors (the default) and 512-byte sectors;
- dm-crypt:     Apptainer's path with the same KDF: loop device, ``cryptsetup luksFormat``,
                ``cryptsetup open``, ``dd bs=1M conv=fsync`` into the mapping, close, detach;
                timed whole and the ``dd`` alone (the kernel's own encryption throughput).

Every side uses PBKDF2 at its minimum (1000 iterations), so the figures are about the data; the
keyslot KDF is a fixed cost per image, the same for both (it is chosen for the nodes). Reports
throughputs and the ratio encrypt / dm-crypt (target: at least 0.5 against ``dd`` alone), and the
peak memory (maximum resident set) of encrypt at 256 MiB and 1 GiB (target: flat). Also, for the
choice made in ``builder.xts_encrypt``: cryptography's XTS once per sector against spank-sif's
hand-made XTS (two ECB passes and a Python tweak loop, ``luks2._xts_decrypt``), 64 MiB, in process.

    python3 bench/bench_encrypt.py [--runs N]       # on the host: boots the VM, runs itself there
"""
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import vmrun  # noqa: E402  (puts the repository and tests/ on sys.path)

GIB = 1 << 30
KDF_ARGS = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def _input(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(b"hsqs")
        f.truncate(size)
    return path


def _encrypt_in_child(source: Path, out: Path, sector_size: int) -> tuple[float, int]:
    """(seconds, peak resident set in KiB) of one encryption in a forked child."""
    from spank_sif import builder
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            builder.build_encrypted_image(str(source), str(out), passphrase=b"benchmark", force=True,
                                          kdf=builder.make_kdf("pbkdf2", time=1000), sector_size=sector_size)
            code = 0
        except BaseException:  # noqa: BLE001 - shown, then the parent fails
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("encrypt failed in the benchmark child")
    out.unlink()
    return elapsed, usage.ru_maxrss


def _run(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, **kw)


def _dm_crypt(source: Path, volume: Path, key: Path, size: int) -> tuple[float, float]:
    """Apptainer's path: (whole seconds, seconds of the copy through dm-crypt)."""
    start = time.perf_counter()
    with open(volume, "wb") as f:
        f.truncate(size + (16 << 20))
    loop = _run("losetup", "-f", "--show", volume, text=True).stdout.strip()
    name = f"bench-encrypt-{os.getpid()}"
    try:
        _run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *KDF_ARGS, "--sector-size", 4096,
             "--key-file", key, loop)
        _run("cryptsetup", "open", "--type", "luks2", "--key-file", key, loop, name)
        try:
            copy_start = time.perf_counter()
            _run("dd", f"if={source}", f"of=/dev/mapper/{name}", "bs=1M", "conv=fsync", "status=none")
            copy = time.perf_counter() - copy_start
        finally:
            _run("cryptsetup", "close", name)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    elapsed = time.perf_counter() - start
    volume.unlink()
    return elapsed, copy


def _xts_variants(size: int = 64 << 20) -> dict:
    from spank_sif import builder, luks2
    key, data = os.urandom(64), os.urandom(size)
    report = {}
    for sector_size in builder.SECTOR_SIZES:
        times = {"cryptography per sector": [], "hand-made (two ECB passes)": []}
        for _ in range(3):
            start = time.perf_counter()
            builder.xts_encrypt(key, data, sector_size, 0)
            times["cryptography per sector"].append(time.perf_counter() - start)
            start = time.perf_counter()
            luks2._xts_decrypt(key, data, sector_size, 0)
            times["hand-made (two ECB passes)"].append(time.perf_counter() - start)
        report[f"{sector_size}-byte sectors, MiB/s"] = {
            name: round(size / statistics.median(t) / 2**20, 1) for name, t in times.items()}
    return report


def inside(runs: int) -> dict:
    work = Path(os.environ.get("SPANK_SIF_VM_WORK") or "/tmp") / "bench-encrypt"
    work.mkdir(exist_ok=True)
    key = work / "key"
    key.write_bytes(b"benchmark")
    big, small = _input(work / "big.sqfs", GIB), _input(work / "small.sqfs", GIB // 4)
    times = {"encrypt": [], "encrypt 512": [], "dm-crypt": [], "dm-crypt copy": []}
    rss = {"256 MiB": [], "1 GiB": []}
    for i in range(runs):
        for variant in (["encrypt", "dm-crypt", "encrypt 512"] if i % 2 == 0 else
                        ["encrypt 512", "dm-crypt", "encrypt"]):
            if variant == "dm-crypt":
                whole, copy = _dm_crypt(big, work / "volume", key, GIB)
                times["dm-crypt"].append(whole)
                times["dm-crypt copy"].append(copy)
            else:
                elapsed, peak = _encrypt_in_child(big, work / "out.sif", 512 if variant.endswith("512") else 4096)
                times[variant].append(elapsed)
                if variant == "encrypt":
                    rss["1 GiB"].append(peak)
        rss["256 MiB"].append(_encrypt_in_child(small, work / "out.sif", 4096)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    mib_s = {k: round(GIB / v / 2**20, 1) for k, v in med.items()}
    return {
        "runs": runs, "data_bytes": GIB,
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "throughput_mib_s": mib_s,
        "ratio_encrypt_vs_dm_crypt_copy": round(med["dm-crypt copy"] / med["encrypt"], 2),
        "ratio_encrypt_vs_dm_crypt_whole": round(med["dm-crypt"] / med["encrypt"], 2),
        "ratio_encrypt_512_vs_dm_crypt_copy": round(med["dm-crypt copy"] / med["encrypt 512"], 2),
        "peak_rss_kib": {k: max(v) for k, v in rss.items()},
        "xts": _xts_variants(),
    }


def summarize(report: dict) -> None:
    t, rss = report["throughput_mib_s"], report["peak_rss_kib"]
    print(f"1 GiB: encrypt {t['encrypt']} MiB/s (512-byte sectors {t['encrypt 512']}), dm-crypt copy "
          f"{t['dm-crypt copy']} MiB/s (Apptainer's whole path {t['dm-crypt']}); ratio encrypt / dm-crypt copy "
          f"{report['ratio_encrypt_vs_dm_crypt_copy']} (target >= 0.5), / whole path "
          f"{report['ratio_encrypt_vs_dm_crypt_whole']}")
    print(f"peak memory of encrypt: {rss['256 MiB'] // 1024} MiB at 256 MiB, {rss['1 GiB'] // 1024} MiB at 1 GiB "
          "(target: flat)")
    for sectors, variants in report["xts"].items():
        print(f"XTS, {sectors}: " + ", ".join(f"{name} {v}" for name, v in variants.items()))


def main() -> int:
    return vmrun.main(__file__, __doc__, inside, 3, summarize)


if __name__ == "__main__":
    sys.exit(main())
