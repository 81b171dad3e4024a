"""Where can ``@pytest.mark.vm`` tests run? Natively when the kernel has dm-crypt (or inside the VM)."""
import os
import shutil
import subprocess
from pathlib import Path

IN_VM_VARIABLE = "SPANK_SIF_IN_VM"
# What the tests need from the kernel; af_alg/algif_skcipher are needed by cryptsetup's keyslot crypto.
MODULES = ("dm_mod", "dm_crypt", "loop", "squashfs", "algif_skcipher", "xts")


def in_vm() -> bool:
    """True inside the harness's VM (the guest sets the variable before starting the tests)."""
    return os.environ.get(IN_VM_VARIABLE) == "1"


def load_modules() -> None:
    """Best effort: a kernel that has the modules loads them; one that has not is reported later."""
    if shutil.which("modprobe"):
        for module in MODULES:
            subprocess.run(["modprobe", "-q", module], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dmcrypt_missing() -> str | None:
    """Why this machine cannot map a LUKS volume with dm-crypt, or None if it can."""
    if os.geteuid() != 0:
        return "not root"
    load_modules()
    # The device node may exist without a driver behind it (it does on the development machines),
    # so ask the kernel: the misc device is registered only when device-mapper is in the kernel.
    misc = Path("/proc/misc")
    if not misc.exists() or "device-mapper" not in misc.read_text().split():
        return "the kernel has no device-mapper"
    if not Path("/dev/mapper/control").exists():
        return "/dev/mapper/control is missing"
    if "crypt" not in dm_targets():
        return "the kernel has no dm-crypt target"
    return None


def dm_targets() -> set[str]:
    """Target types the device-mapper driver offers (``dmsetup targets``; dm_crypt's sysfs entry as fallback)."""
    if shutil.which("dmsetup"):
        out = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True)
        if out.returncode == 0:
            return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return {"crypt"} if Path("/sys/module/dm_crypt").exists() else set()
