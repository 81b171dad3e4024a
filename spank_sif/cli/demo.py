"""``spank-sif demo DIR``: build two small encrypted images and show what spank-sif sees in them.

Needs no root, no Slurm and no device-mapper: the images are made by ``spank-sif encrypt``
(spank_sif.builder: the real cryptsetup for the LUKS2 header, the data encrypted in userspace) and
checked with spank-sif's own userspace LUKS2 code.
"""
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

from spank_sif import cli, keys, sif
from spank_sif.errors import SystemSetupError, UsageError

HELLO = b"Hello from inside an encrypted SIF image.\n"
BUSYBOX = "/bin/busybox"  # Debian's busybox-static: a userland for container mode (--sif-container)
APPLETS = ("sh", "cat", "ls", "id", "env", "true")
DEFFILE = b"Bootstrap: scratch\n%files\n    hello.txt /hello.txt\n"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build small encrypted demo images and inspect/verify them",
                              description=__doc__.splitlines()[0].strip("`: "))
    p.add_argument("directory", help="where to write the images and their keys (created if missing)")
    p.add_argument("--fast-kdf", action="store_true",
                   help="cheap key derivation (64 MiB) instead of encrypt's default (256 MiB)")
    p.set_defaults(func=demo)


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _run(argv: list) -> int:
    print("$ spank-sif " + " ".join(argv), flush=True)
    rc = cli.main(argv)
    sys.stdout.flush()  # keep the command's stdout and its stderr line in order
    sys.stderr.flush()
    print(f"(exit {rc})")
    return rc


def _squashfs(directory: str) -> str:
    out = os.path.join(directory, "rootfs.sqfs")
    with tempfile.TemporaryDirectory() as tree:
        # The image's root directory keeps the tree's mode, and jobs run as ordinary users:
        # a private temporary directory (0700) would make every file in the image unreadable.
        os.chmod(tree, 0o755)
        with open(os.path.join(tree, "hello.txt"), "wb") as f:
            f.write(HELLO)
        os.chmod(os.path.join(tree, "hello.txt"), 0o644)
        _userland(tree)
        try:
            subprocess.run(["mksquashfs", tree, out, "-noappend", "-quiet", "-all-root"], check=True,
                           stdout=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise SystemSetupError("mksquashfs is not installed: install the squashfs-tools package") from exc
    return out


def _userland(tree: str) -> None:
    """A static busybox and its applets in /bin, when this machine has one: enough for the image to
    run ``cat`` and ``sh`` as a container (``srun --sif-container``)."""
    if not os.path.isfile(BUSYBOX):
        return
    bin_dir = os.path.join(tree, "bin")
    os.mkdir(bin_dir, 0o755)
    shutil.copy(BUSYBOX, os.path.join(bin_dir, "busybox"))
    for applet in APPLETS:
        os.symlink("busybox", os.path.join(bin_dir, applet))


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def demo(args) -> int:
    d = os.path.abspath(args.directory)
    os.makedirs(d, mode=0o700, exist_ok=True)
    if not os.path.isdir(d):
        raise UsageError(f"{d} is not a directory")
    kdf = ["--kdf-memory", "64M"] if args.fast_kdf else []

    _step("1. a root filesystem with one file (and busybox, if installed), squashed, in a plain SIF image")
    squashfs = _squashfs(d)
    plain = os.path.join(d, "demo-plain.sif")
    sif.write_sif(plain, [sif.SifObject(sif.DataType.DEFFILE, DEFFILE),
                          sif.SifObject.partition(squashfs, sif.FsType.SQUASHFS)])
    print(f"{plain}: {os.path.getsize(plain)} bytes")

    _step("2. passphrase mode (Apptainer: APPTAINER_ENCRYPTION_PASSPHRASE)")
    pass_file = os.path.join(d, "passphrase.txt")
    _write_private(pass_file, secrets.token_urlsafe(18).encode())
    pass_image = os.path.join(d, "demo-pass.sif")
    results = [_run(["encrypt", plain, pass_image, "--passphrase-file", pass_file, "--force", *kdf]) == 0]
    print(f"passphrase in {pass_file} (mode 0600)")

    _step("3. PEM mode (Apptainer: APPTAINER_ENCRYPTION_PEM_PATH)")
    private, public = keys.generate_key_pair(2048)
    pem_file, public_file = os.path.join(d, "demo.pem"), os.path.join(d, "demo.pub.pem")
    _write_private(pem_file, private)
    with open(public_file, "wb") as f:
        f.write(public)
    pem_image = os.path.join(d, "demo-pem.sif")
    results.append(_run(["encrypt", plain, pem_image, "--pem-path", public_file, "--force", *kdf]) == 0)
    print(f"private key in {pem_file} (mode 0600)")

    _step("4. what spank-sif sees in the PEM image")
    results.append(_run(["inspect", pem_image]) == 0)

    _step("5. the right keys open the images (exit 0), a wrong one does not (exit 2)")
    results.append(_run(["verify-key", pass_image, "--passphrase-file", pass_file]) == 0)
    results.append(_run(["verify-key", pem_image, "--pem-path", pem_file]) == 0)
    wrong = os.path.join(d, "wrong-passphrase.txt")
    _write_private(wrong, b"not the passphrase")
    results.append(_run(["verify-key", pass_image, "--passphrase-file", wrong]) == 2)

    _step("next")
    print(f"On a cluster with spank-sif installed (scripts/demo.sh goes on to run it on a real Slurm node):\n"
          f"  APPTAINER_ENCRYPTION_PEM_PATH={pem_file} srun --sif-image={pem_image} cat /sif/hello.txt")
    ok = all(results)
    print("\ndemo " + ("succeeded" if ok else "FAILED: see above"))
    return 0 if ok else 1
