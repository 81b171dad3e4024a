"""Boot one VM (virtme-ng, Debian's kernel, software emulation) and run a command in it as root.

The guest's root file system is the host's (read-only, throwaway overlays on /etc, /tmp, ...), so the
command sees this repository, this Python and the installed tools. Directories passed as ``rwdirs`` are
writable from the guest; the command's output and exit status come back through the run directory.
Why each choice is made: docs/testing.md, "Why the VM is booted this way".
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GUEST_SCRIPT = Path(__file__).resolve().parent / "guest.py"
GUEST_WORK = "/run/spank-sif-vm"  # a tmpfs in the guest: cryptsetup fails on the 9p-shared directories
DEFAULT_TIMEOUT = 3600  # each whole VM run; the VMs share the CPUs with each other and the host tests
MEMORY = "4G"  # cryptsetup's default Argon2id takes up to 1 GiB, half the RAM at most
CPUS = 2
KERNEL_VARIABLE = "SPANK_SIF_VM_KERNEL"
LAUNCHER_VARIABLE = "SPANK_SIF_VM_LAUNCHER"  # "local": run the guest step here, without a VM (harness tests)
# What the guest inherits from the host environment (the VM starts with an empty one).
PASSED_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "USER", "LOGNAME", "PYTHONPATH",
                    "PYTHONHASHSEED", "GOFLAGS")


class VmUnavailable(Exception):
    """The VM cannot be started on this machine (no vng, no suitable kernel)."""


@dataclass
class VmResult:
    returncode: int | None  # None: the command never finished (boot failure, timeout, guest crash)
    stdout: str
    stderr: str
    console: str  # what vng itself printed: boot errors, kernel messages
    timed_out: bool
    seconds: float
    rundir: Path

    def tail(self, lines: int = 40) -> str:
        """The end of everything the run printed, for failure messages."""
        parts = [(name, text) for name, text in (("VM console", self.console), ("guest stdout", self.stdout),
                                                 ("guest stderr", self.stderr)) if text.strip()]
        return "\n".join(f"--- {name} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])
                         for name, text in parts) or "(the VM printed nothing)"


def find_kernel() -> Path:
    """The newest /boot/vmlinuz-* whose modules include dm-crypt ($SPANK_SIF_VM_KERNEL overrides)."""
    if os.environ.get(KERNEL_VARIABLE):
        kernel = Path(os.environ[KERNEL_VARIABLE])
        if not kernel.is_file():
            raise VmUnavailable(f"{KERNEL_VARIABLE}={kernel}: no such kernel image")
        return kernel
    candidates = [k for k in Path("/boot").glob("vmlinuz-*")
                  if any(Path("/lib/modules", k.name.removeprefix("vmlinuz-")).glob("kernel/drivers/md/dm-crypt.ko*"))]
    if not candidates:
        raise VmUnavailable("no /boot/vmlinuz-* with dm-crypt modules: install linux-image-amd64 "
                            "(scripts/install.sh --test)")
    return max(candidates, key=lambda k: [int(n) for n in re.findall(r"\d+", k.name)])


def find_vng() -> Path:
    """virtme-ng's ``vng``, looked up next to this Python first (it is installed with the test tools)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    vng = shutil.which("vng", path=path)
    if not vng:
        raise VmUnavailable("virtme-ng (vng) not found: pip install virtme-ng (scripts/install.sh --test)")
    return Path(vng)


def guest_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in PASSED_VARIABLES or k.startswith("SPANK_SIF_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", ""),
                                   "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"])
    env.update(extra or {})
    return env


def run_in_vm(argv: list[str], *, rundir: Path | None = None, rwdirs: tuple[Path, ...] = (),
              timeout: float = DEFAULT_TIMEOUT, env: dict[str, str] | None = None,
              cwd: Path | None = None, stopping: threading.Event | None = None) -> VmResult:
    """Boot a VM, run ``argv`` in it as root (cwd ``cwd``, environment: the host's basics plus ``env``,
    modules for dm-crypt loaded, ``$SPANK_SIF_VM_WORK`` a tmpfs, ``$TMPDIR`` inside it), and return
    its exit status and output. Raises VmUnavailable when no VM can be started here."""
    rundir = Path(rundir or tempfile.mkdtemp(prefix="spank-sif-vm-"))
    rundir.mkdir(parents=True, exist_ok=True)
    local = os.environ.get(LAUNCHER_VARIABLE) == "local"
    spec = {
        "argv": [str(a) for a in argv], "cwd": str(cwd or Path.cwd()), "env": guest_environment(env),
        "work": str(rundir / "work") if local else GUEST_WORK, "local": local,
        "stdout": str(rundir / "guest.stdout"), "stderr": str(rundir / "guest.stderr"),
        "returncode": str(rundir / "guest.rc"),
    }
    spec_path = rundir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    guest = [sys.executable, str(GUEST_SCRIPT), str(spec_path)]
    if local:
        command, path = guest, os.environ.get("PATH", "")
    else:
        vng = find_vng()
        command = [str(vng), "--run", str(find_kernel()), "--disable-kvm", "--memory", MEMORY,
                   "--cpus", str(CPUS)]
        for d in (rundir, *rwdirs):
            command += ["--rwdir", str(d)]
        command += ["--exec", shlex.join(guest)]
        # vng starts its helper virtme-run by name.
        path = os.pathsep.join([str(vng.parent), os.environ.get("PATH", "")])
    start = time.monotonic()
    timed_out = False
    with open(rundir / "console.log", "wb") as console:
        # stdin from /dev/null: vng crashes when it has none (under CI); own session: to stop qemu too.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PATH=path), cwd=cwd, start_new_session=True)
        try:
            timed_out = not wait_unless_stopped(proc, timeout, stopping)
            if timed_out or proc.returncode is None:
                stop(proc)
        except BaseException:  # Ctrl-C or a pytest timeout: never leave a VM running
            stop(proc)
            raise
    rc_file = rundir / "guest.rc"
    return VmResult(
        returncode=int(rc_file.read_text()) if rc_file.exists() else None,
        stdout=read(rundir / "guest.stdout"), stderr=read(rundir / "guest.stderr"),
        console=read(rundir / "console.log"), timed_out=timed_out, seconds=time.monotonic() - start,
        rundir=rundir)


def wait_unless_stopped(proc: subprocess.Popen, timeout: float, stopping: threading.Event | None) -> bool:
    """Wait for the VM to end; False when it ran out of time. Returns early, with the VM still running,
    when ``stopping`` is set (the caller stops it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopping is not None and stopping.is_set():
            return True
        try:
            proc.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return True
        except subprocess.TimeoutExpired:
            continue
    return False


def stop(proc: subprocess.Popen) -> None:
    """Stop the VM we started: its whole process group (vng, virtme-run, qemu)."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
