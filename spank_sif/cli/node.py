"""Node commands for admins and tests (root): open, close, list, epilog, cleanup.

``open`` does on the command line what the plugin does for a job step, but mounts in the current
mount namespace, so an admin can look inside an image or check a node. Images and key files are
opened as ``--user`` (default: the invoking user), never as root.
"""
import json
import os
import sys

from spank_sif import keys, lifecycle
from spank_sif.cli.common import add_config_option, printable, site_config, table
from spank_sif.errors import KeyMaterialError, UsageError
from spank_sif.userfiles import User, read_as_user


def register(subparsers) -> None:
    def add(name, help_text, func):
        p = subparsers.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add_config_option(p)
        p.set_defaults(func=func)
        return p

    p = add("open", "unlock an image and mount it at MOUNTPOINT in the current mount namespace (root)", cmd_open)
    p.add_argument("image", metavar="IMAGE", help="SIF image (opened as --user)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="existing directory to mount the image on")
    p.add_argument("--user", metavar="USER", help="open the image and key files as USER (default: the "
                   "invoking user, $SUDO_USER under sudo)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--passphrase-file", metavar="F", help="file holding the passphrase (every byte counts)")
    key.add_argument("--pem-path", metavar="F", help="PEM RSA private key file")
    p.add_argument("--job", metavar="ID", default="cli", help="job label for the records (default: cli)")

    p = add("close", "unmount and remove what 'open' created, by mount point or mapping name (root)", cmd_close)
    p.add_argument("what", metavar="MOUNTPOINT|NAME")

    p = add("list", "list the images spank-sif has open on this node", cmd_list)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("epilog", "remove everything a job left on this node (what the job epilog runs; root)", cmd_epilog)
    p.add_argument("--job", metavar="ID", required=True, help="Slurm job id")

    p = add("cleanup", "remove what jobs no longer running on this node left (root)", cmd_cleanup)
    p.add_argument("--stale", action="store_true", required=True,
                   help="sweep jobs that no longer run here and interrupted 'open's")


def _need_root(command: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"spank-sif {command} needs root (it maps and mounts devices)")


def _invoking_user(name: str | None) -> User:
    if name:
        return User.from_name(name)
    sudo_uid = os.environ.get("SUDO_UID")
    if os.getuid() == 0 and sudo_uid and sudo_uid.isdigit():
        return User.from_uid(int(sudo_uid))
    return User.from_uid(os.getuid())


def _key_source(args, user: User) -> keys.KeySource | None:
    """A key named by a flag (read as the user), or None to use the environment like a job."""
    if args.pem_path:
        return keys.KeySource("pem_path", "--pem-path", path=args.pem_path)
    if args.passphrase_file:
        data = read_as_user(args.passphrase_file, user, keys.MAX_PASSPHRASE, what="passphrase file",
                            error=KeyMaterialError)
        return keys.passphrase_from_file(data, args.passphrase_file)
    return None


def cmd_open(args) -> int:
    _need_root("open")
    config = site_config(args)
    user = _invoking_user(args.user)
    target = os.path.abspath(args.mountpoint)
    unlocked = lifecycle.unlock(args.image, user, os.environ, args.job, config, cwd=os.getcwd(),
                                source=_key_source(args, user))
    try:
        lifecycle.mount(unlocked, target, private=False, create=False)
    except BaseException:
        lifecycle.release(unlocked, config)
        raise
    if unlocked.loop is not None:
        unlocked.loop.close()  # the mount holds the device now
    print(unlocked.session)
    return 0


def _removed(items: list[str]) -> int:
    for item in items:
        print(f"removed {printable(item)}")
    return 0


def cmd_close(args) -> int:
    _need_root("close")
    return _removed(lifecycle.release(args.what, site_config(args)))


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def cmd_list(args) -> int:
    entries = lifecycle.list_active(site_config(args))
    if args.json:
        json.dump(entries, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [("NAME", "JOB", "USER", "STATUS", "IMAGE", "MOUNT", "AGE")]
    for e in entries:
        rows.append((e["name"], e["job"], e["user"] or "-", e["status"] or "-", e["image"] or "-",
                     ",".join(e["mounts"]) or "-", _age(e["age"])))
    for line in table(rows):
        print(line)
    return 0


def cmd_epilog(args) -> int:
    _need_root("epilog")
    return _removed(lifecycle.sweep_job(args.job, site_config(args)))


def cmd_cleanup(args) -> int:
    _need_root("cleanup")
    return _removed(lifecycle.sweep_stale(site_config(args)))

