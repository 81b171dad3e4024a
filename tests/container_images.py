"""Small container images for the --sif-container tests: a busybox userland (Debian's static busybox)
squashed with mksquashfs, with what the tests look for inside.

Every variant has /etc/os-release, /etc/passwd and /etc/group of its own (root only), a program
only on the image's PATH (/opt/app/bin/hello-sif, added to PATH by the image's environment script),
no /home and no /var/tmp (binds there need scaffolds), and symbolic links that point out of the
image (/escape -> /../../etc, /data -> /../../etc/sif-data). Variants differ in their environment
scripts or shell.
"""
import os
import shutil
from pathlib import Path

import reftools

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "env", "id", "whoami", "ls", "touch", "pwd", "sleep", "true", "false",
           "mkdir", "printenv", "test", "readlink", "grep", "stat", "head", "wc", "tr", "uname", "hostname",
           "basename")
OS_RELEASE = b'PRETTY_NAME="spank-sif test image"\nNAME="spank-sif-test"\nID=spanksif\n'
IMAGE_VARIABLE = ("SIF_TEST_FROM_IMAGE", "set-by-90-environment")
HELLO_OUTPUT = "hello from a program only the image has"

ENVIRONMENT = f"""\
# like Apptainer's %environment section
export {IMAGE_VARIABLE[0]}={IMAGE_VARIABLE[1]}
export PATH=/opt/app/bin:$PATH
"""
VARIANTS = {
    "container": {"90-environment.sh": ENVIRONMENT},
    # the image has environment scripts but no /bin/sh to run them
    "no_shell": {"90-environment.sh": ENVIRONMENT},
    "env_fails": {"90-environment.sh": ENVIRONMENT,
                  "95-broken.sh": "echo 'missing licence file' >&2\nexit 3\n"},
    "env_hangs": {"90-environment.sh": ENVIRONMENT, "95-slow.sh": "sleep 600\n"},
}


def build_tree(root: Path, variant: str, programs: tuple = ()) -> Path:
    """The root file system of ``variant`` under ``root``; ``programs`` (static binaries) go to
    /opt/app/bin, on the image's PATH."""
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} missing: install busybox-static (scripts/install.sh --test)")
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run", "opt/app/bin", ".singularity.d/env"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        if applet == "sh" and variant == "no_shell":
            continue
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "os-release").write_bytes(OS_RELEASE)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    hello = root / "opt" / "app" / "bin" / "hello-sif"
    hello.write_text(f"#!/bin/sh\necho '{HELLO_OUTPUT}'\n")
    hello.chmod(0o755)
    (root / "escape").symlink_to("/../../etc")
    (root / "data").symlink_to("/../../etc/sif-data")
    for name, text in VARIANTS[variant].items():
        (root / ".singularity.d" / "env" / name).write_text(text)
    for program in programs:
        shutil.copy2(program, root / "opt" / "app" / "bin" / Path(program).name)
    return root


def build_squashfs(work: Path, variant: str, programs: tuple = ()) -> Path:
    tree = build_tree(work / f"{variant}-tree", variant, programs)
    return reftools.make_squashfs(tree, work / f"{variant}.sqfs")
