"""The node engine end to end on the host kernel (loop + squashfs, no device-mapper): plain images
through ``spank-sif open/list/close/epilog/cleanup``, every refusal, and crashes between steps."""
import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import reftools
from engine_helpers import (OTHER, USER, cli, ensure_users, leftovers, plain_image, world_dir,
                            write_config)
from spank_sif import lifecycle, sif
from spank_sif.config import SiteConfig
from vm.capability import dmcrypt_missing

pytestmark = pytest.mark.root

FILES = {"hello.txt": b"hello from a plain image\n", "opt/data.bin": os.urandom(300_000)}


@pytest.fixture(scope="module")
def images():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ensure_users()
    d = world_dir()
    image = plain_image(d, FILES)
    yield d, image
    shutil.rmtree(d)


@pytest.fixture
def site(images, tmp_path):
    """A site configuration with a private state directory, and a mount point."""
    d, image = images
    state = tmp_path / "state"
    target = tmp_path / "mnt"
    target.mkdir()
    config = write_config(tmp_path / "site.yaml", state_dir=str(state))
    yield {"image": image, "dir": d, "state": state, "target": target, "config": config,
           "tmp": tmp_path}
    # Whatever a test did, leave the machine clean for the next one.
    cli("epilog", "--job", "cli", "--config", config)
    cli("epilog", "--job", "4242", "--config", config)
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _open(site, *extra, image=None, target=None, env=None):
    return cli("open", image or site["image"], target or site["target"], "--user", USER,
               "--config", site["config"], *extra, env=env)


def _mount_options(target) -> set[str]:
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4] == str(target):
            return set(fields[5].split(","))
    return set()


def test_open_list_close_leaves_nothing(site):
    proc = _open(site)
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip()
    assert name.startswith(f"spank-sif-cli-{lifecycle.node_tag()}-")
    target = site["target"]
    assert (target / "hello.txt").read_bytes() == FILES["hello.txt"]
    assert (target / "opt/data.bin").read_bytes() == FILES["opt/data.bin"]
    assert {"ro", "nosuid", "nodev"} <= _mount_options(target)
    listing = json.loads(cli("list", "--json", "--config", site["config"], check=True).stdout)
    assert [(e["name"], e["job"], e["user"], e["mounts"], e["status"]) for e in listing] == \
        [(name, "cli", USER, [str(target)], "unlocked")]
    assert e_image(listing) == str(site["image"])
    table = cli("list", "--config", site["config"], check=True).stdout
    assert name in table and str(target) in table
    assert len(leftovers(site["image"], site["state"], target)) > 0  # sanity of the checker itself
    closed = cli("close", str(target), "--config", site["config"])
    assert closed.returncode == 0, closed.stderr
    assert leftovers(site["image"], site["state"], target) == []
    again = cli("close", str(target), "--config", site["config"])  # nothing left to close
    assert again.returncode == 8 and "nothing spank-sif opened" in again.stderr


def e_image(listing):
    return listing[0]["image"]


def test_close_by_name_and_epilog_sweeps_a_job(site, tmp_path):
    second = tmp_path / "mnt2"
    second.mkdir()
    first = _open(site, "--job", "4242.0")
    other = _open(site, "--job", "4242.1", target=second)
    assert first.returncode == 0 and other.returncode == 0, first.stderr + other.stderr
    assert first.stdout.startswith(f"spank-sif-4242.0-{lifecycle.node_tag()}-")
    assert cli("close", first.stdout.strip(), "--config", site["config"]).returncode == 0
    assert not (site["target"] / "hello.txt").exists()
    assert (second / "hello.txt").exists()
    swept = cli("epilog", "--job", "4242", "--config", site["config"])
    assert swept.returncode == 0, swept.stderr
    assert "removed mount" in swept.stdout
    assert leftovers(site["image"], site["state"], second) == []


@pytest.mark.parametrize("case, code, message", [
    ("unreadable", 3, "cannot read image"),
    ("missing", 3, "does not exist"),
    ("not_sif", 3, "not a SIF"),
    ("truncated", 3, ""),
    ("no_primary", 3, "no primary system partition"),
    ("gocryptfs", 3, "gocryptfs"),
    ("outside_allowed", 5, "outside the directories this site allows"),
    ("plain_refused", 5, "only runs encrypted images"),
    ("no_mount_point", 7, "does not exist: create the directory"),
    ("mount_point_symlink", 7, "is a symbolic link"),
])
def test_refusals_are_one_line_and_leave_nothing(site, case, code, message):
    d, tmp = site["dir"], site["tmp"]
    image, target, config = site["image"], site["target"], site["config"]
    bad = d / f"{case}.sif"
    if case == "unreadable":
        shutil.copy(image, bad)
        bad.chmod(0o600)  # root can read it, the user cannot
        image = bad
    elif case == "missing":
        image = d / "nothing-here.sif"
    elif case == "not_sif":
        bad.write_bytes(b"#!/bin/sh\necho not an image\n" * 100)
        bad.chmod(0o644)
        image = bad
    elif case == "truncated":
        data = image.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        bad.chmod(0o644)
        image = bad
    elif case == "no_primary":
        sqfs = reftools.make_squashfs(tmp / "t", tmp / "t.sqfs", {"a": b"a"})
        image = reftools.sifref_build(bad, sqfs, fs="squashfs", parttype=3)
        image.chmod(0o644)
    elif case == "gocryptfs":
        sif.write_sif(bad, [sif.SifObject.partition(b"\0" * 8192, sif.FsType.GOCRYPTFS_SQUASHFS)])
        bad.chmod(0o644)
        image = bad
    elif case == "outside_allowed":
        config = write_config(tmp / "c.yaml", state_dir=str(site["state"]), allowed_image_paths=["/srv/images"])
    elif case == "plain_refused":
        config = write_config(tmp / "c.yaml", state_dir=str(site["state"]), allow_unencrypted=False)
    elif case == "no_mount_point":
        target = tmp / "no-such-dir"
    elif case == "mount_point_symlink":
        (tmp / "real").mkdir()
        target = tmp / "link"
        target.symlink_to(tmp / "real")
    proc = cli("open", image, target, "--user", USER, "--config", config)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("spank-sif: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert leftovers(image, site["state"], target) == []
    assert leftovers(site["image"], site["state"], target) == []


def test_other_users_image_is_refused(site):
    d = site["dir"]
    private = d / "private.sif"
    shutil.copy(site["image"], private)
    other = __import__("pwd").getpwnam(OTHER)
    os.chown(private, other.pw_uid, other.pw_gid)
    private.chmod(0o600)
    # A plain image its owner can change: only a site that lets the kernel mount anything runs it.
    config = write_config(site["tmp"] / "always.yaml", state_dir=str(site["state"]), kernel_mount="always")
    proc = cli("open", private, site["target"], "--user", USER, "--config", config)
    assert proc.returncode == 3 and "cannot read image" in proc.stderr
    ok = cli("open", private, site["target"], "--user", OTHER, "--config", config)
    assert ok.returncode == 0, ok.stderr
    assert cli("close", site["target"], "--config", config).returncode == 0


def test_encrypted_image_on_this_kernel(site, tmp_path):
    """Without dm-crypt (these machines, CI): refused in one line. With it (asked of the kernel, not of
    the engine), the same image opens and closes. Either way nothing is left behind."""
    sqfs = reftools.make_squashfs(tmp_path / "t", tmp_path / "t.sqfs", {"a": b"a" * 5000})
    with contextlib.chdir(tmp_path):  # cryptsetup reencrypt writes a temporary header in its cwd
        vol = reftools.luks_encrypt_payload(sqfs, tmp_path / "t.luks", b"pass")
    image = reftools.sifref_build(site["dir"] / "enc.sif", vol, fs="encrypted")
    image.chmod(0o644)
    proc = cli("open", image, site["target"], "--user", USER, "--config", site["config"],
               env={"APPTAINER_ENCRYPTION_PASSPHRASE": "pass"})
    if dmcrypt_missing() is None:
        assert proc.returncode == 0, proc.stderr
        assert (site["target"] / "a").read_bytes() == b"a" * 5000
        assert cli("close", site["target"], "--config", site["config"]).returncode == 0
    else:
        assert proc.returncode == 7, proc.stderr
        assert "this node's kernel lacks device-mapper/dm-crypt" in proc.stderr and proc.stderr.count("\n") == 1
    assert leftovers(image, site["state"], site["target"]) == []


def test_kdf_above_the_cap_is_refused_before_any_kdf(site, tmp_path):
    sqfs = reftools.make_squashfs(tmp_path / "t", tmp_path / "t.sqfs", {"a": b"a" * 5000})
    vol = reftools.luks_encrypt_payload(sqfs, tmp_path / "t.luks", b"pass")  # argon2id, 32 MiB
    image = reftools.sifref_build(site["dir"] / "capped.sif", vol, fs="encrypted")
    image.chmod(0o644)
    config = write_config(tmp_path / "c.yaml", state_dir=str(site["state"]), kdf_max_memory_kib=16384)
    proc = cli("open", image, site["target"], "--user", USER, "--config", config,
               env={"APPTAINER_ENCRYPTION_PASSPHRASE": "pass"})
    assert proc.returncode == 5, proc.stderr
    assert "needs 32768 KiB of memory, above this site's limit of 16384 KiB" in proc.stderr
    # Refused before the node's KDF lock was even looked at (its slot files live in the state directory).
    assert sorted(p.name for p in site["state"].rglob("kdf*")) == []
    assert leftovers(image, site["state"], site["target"]) == []


def test_kernel_without_loop_driver(site):
    """In a mount namespace whose /dev lacks the loop nodes, as in a bare container."""
    script = (f"mount -t tmpfs tmpfs /dev && exec {os.sys.executable} -m spank_sif open {site['image']} "
              f"{site['target']} --user {USER} --config {site['config']}")
    env = dict(os.environ, PYTHONPATH=str(reftools.REPO))
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 7, proc.stderr
    assert "no free loop device: /dev/loop-control is missing" in proc.stderr
    assert leftovers(site["image"], site["state"], site["target"]) == []


KILL_POINTS = ("session", "loop", "unlocked", "mounted")


@pytest.mark.parametrize("step", KILL_POINTS)
@pytest.mark.parametrize("job", ["cli", "4242.0"])
def test_killed_between_steps_then_swept(site, step, job):
    proc = _open(site, "--job", job, env={"SPANK_SIF_KILL_AT": step})
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert any(p.suffix == ".json" for p in site["state"].rglob("*")), "the crash left no record to sweep"
    if job == "cli":
        swept = cli("cleanup", "--stale", "--config", site["config"])
        if step == "mounted":  # a finished open: not stale, closed by the admin
            assert swept.returncode == 0 and swept.stdout == ""
            swept = cli("close", site["target"], "--config", site["config"])
    else:
        swept = cli("epilog", "--job", "4242", "--config", site["config"])
    assert swept.returncode == 0, swept.stderr
    assert leftovers(site["image"], site["state"], site["target"]) == []


def test_sweep_stale_only_touches_jobs_no_longer_running(site, tmp_path):
    second = tmp_path / "mnt2"
    second.mkdir()
    assert _open(site, "--job", "5001.0").returncode == 0
    assert _open(site, "--job", "5002.0", target=second).returncode == 0
    config = SiteConfig(state_dir=str(site["state"]))
    done = lifecycle.sweep_stale(config, is_running=lambda jid: jid == "5002")
    assert any(str(site["target"]) in item for item in done)
    assert not (site["target"] / "hello.txt").exists() and (second / "hello.txt").exists()
    assert [e["job"] for e in lifecycle.list_active(config)] == ["5002.0"]
    lifecycle.sweep_job("5002", config)
    assert leftovers(site["image"], site["state"], second) == []


# ------------------------------------------------------------------ security: what users choose

def test_list_and_messages_escape_what_users_chose(site):
    """The real path of an image reached through a symlink whose target's name holds a newline and
    an escape sequence: `list` shows it escaped (one line per session), JSON keeps it exact; an
    error quoting such a path is one escaped line."""
    d = site["dir"]
    odd = d / "odd\nname\x1b[31m"
    odd.mkdir()
    os.chmod(odd, 0o755)
    shutil.copy(site["image"], odd / "app.sif")
    os.chmod(odd / "app.sif", 0o644)
    (d / "link.sif").symlink_to(odd / "app.sif")
    try:
        opened = _open(site, image=d / "link.sif")
        assert opened.returncode == 0, opened.stderr
        table = cli("list", "--config", site["config"], check=True).stdout
        assert "\x1b" not in table and table.count("\n") == 2, table  # heading + one session
        assert "odd\\x0aname\\x1b[31m/app.sif" in table
        listing = json.loads(cli("list", "--json", "--config", site["config"], check=True).stdout)
        assert e_image(listing) == str(odd / "app.sif")
        missing = _open(site, image=d / "gone\x1b]0;title\x07.sif")
        assert missing.returncode == 3 and missing.stderr.count("\n") == 1, missing.stderr
        assert "\x1b" not in missing.stderr and "\x07" not in missing.stderr
        assert "gone\\x1b]0;title\\x07.sif does not exist" in missing.stderr
    finally:
        cli("close", site["target"], "--config", site["config"])
        shutil.rmtree(odd)
        (d / "link.sif").unlink()


def test_real_path_longer_than_the_kernel_allows_is_one_line(site):
    """A path the kernel cannot return (longer than PATH_MAX, reached through a relative path)."""
    from spank_sif.errors import ImageError
    from spank_sif.userfiles import User
    here = os.open(".", os.O_RDONLY)
    deep = os.open(site["dir"], os.O_RDONLY)
    try:
        for _ in range(25):  # 25 x 201 bytes
            os.mkdir("d" * 200, 0o755, dir_fd=deep)
            deep, parent = os.open("d" * 200, os.O_RDONLY, dir_fd=deep), deep
            os.close(parent)
        with open(os.open("x.sif", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=deep), "wb") as f:
            f.write(site["image"].read_bytes())
        os.fchdir(deep)
        config = SiteConfig(state_dir=str(site["state"]))
        with pytest.raises(ImageError, match="its full path is too long for this system"):
            lifecycle.unlock("x.sif", User.from_name(USER), {}, "cli", config)
    finally:
        os.fchdir(here)
        os.close(here)
        os.close(deep)
        shutil.rmtree(site["dir"] / ("d" * 200))
    assert leftovers(site["image"], site["state"], site["target"]) == []


def _acl_granting_write(uid: int) -> bytes:
    """A POSIX access ACL (the kernel's xattr format) giving ``uid`` read and write."""
    import struct
    entry = struct.Struct("<HHI")
    return struct.pack("<I", 2) + b"".join(entry.pack(tag, perm, ident) for tag, perm, ident in [
        (0x01, 6, 0xFFFFFFFF), (0x02, 6, uid), (0x04, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF),
        (0x20, 4, 0xFFFFFFFF)])


# Who can change each image besides root, and which policies let the kernel mount it.
KERNEL_MOUNT = {
    # image: (encrypted, mounted under always, encrypted-only, root-owned)
    "root_plain": (False, True, True, True),
    "user_plain": (False, True, False, False),
    "group_writable_plain": (False, True, False, False),
    "acl_writable_plain": (False, True, False, False),
    "user_encrypted": (True, True, True, False),
    "root_encrypted": (True, True, True, True),
}


@pytest.fixture(scope="module")
def policy_images(images):
    d, plain = images
    user = __import__("pwd").getpwnam(USER)
    out = d / "policy"
    out.mkdir()
    sqfs = reftools.make_squashfs(out / "t", out / "t.sqfs", {"a": b"a" * 5000})
    with contextlib.chdir(out):  # cryptsetup reencrypt writes a temporary header in its cwd
        volume = reftools.luks_encrypt_payload(sqfs, out / "t.luks", b"pass")
    encrypted = reftools.sifref_build(out / "enc.sif", volume, fs="encrypted")
    made = {}
    for name, (is_encrypted, *_) in KERNEL_MOUNT.items():
        path = out / f"{name}.sif"
        shutil.copy(encrypted if is_encrypted else plain, path)
        path.chmod(0o664 if name.startswith("group") else 0o644)
        if name.startswith("user"):
            os.chown(path, user.pw_uid, user.pw_gid)
        if name.startswith("acl"):
            os.setxattr(path, "system.posix_acl_access", _acl_granting_write(user.pw_uid))
        made[name] = path
    return made


@pytest.mark.parametrize("policy", ["always", "encrypted-only", "root-owned"])
@pytest.mark.parametrize("name", KERNEL_MOUNT)
def test_kernel_mount_policy(site, policy_images, policy, name):
    """kernel_mount decides, on the opened file, whether the kernel may parse it: a plain image its
    owner, its group or an ACL entry lets a user change is refused under encrypted-only and
    root-owned, an encrypted one only under root-owned; refused before any key work."""
    encrypted, *allowed = KERNEL_MOUNT[name]
    mounted = allowed[["always", "encrypted-only", "root-owned"].index(policy)]
    config = write_config(site["tmp"] / "policy.yaml", state_dir=str(site["state"]), kernel_mount=policy)
    proc = cli("open", policy_images[name], site["target"], "--user", USER, "--config", config,
               env={"APPTAINER_ENCRYPTION_PASSPHRASE": "pass"})
    if mounted:
        assert "kernel_mount" not in proc.stderr, proc.stderr
        # Plain: mounted. Encrypted: through the policy, as far as this kernel goes.
        no_dm_crypt = encrypted and dmcrypt_missing() is not None
        assert proc.returncode == (7 if no_dm_crypt else 0), proc.stderr
        cli("close", site["target"], "--config", config)
    else:
        assert proc.returncode == 5 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"kernel_mount: {policy}" in proc.stderr and "can be changed by" in proc.stderr
    assert leftovers(policy_images[name], site["state"], site["target"]) == []


@pytest.mark.parametrize("policy", ["always", "encrypted-only", "root-owned"])
def test_kernel_mount_policy_does_not_trust_a_fuse_file(site, policy):
    """A FUSE server reports whatever owner and mode it likes (here root's, 0644) and can change the
    data at any time: only `always` mounts a plain image it serves."""
    from fusefs import FuseFile
    where = site["dir"] / f"fuse-{policy}"
    where.mkdir()
    config = write_config(site["tmp"] / "policy.yaml", state_dir=str(site["state"]), kernel_mount=policy)
    try:
        with FuseFile(where, site["image"].read_bytes(), uid=0, mode=0o644) as image:
            proc = cli("open", image, site["target"], "--user", USER, "--config", config)
            if policy == "always":
                assert proc.returncode == 0, proc.stderr
                assert (site["target"] / "hello.txt").read_bytes() == FILES["hello.txt"]
                assert cli("close", site["target"], "--config", config).returncode == 0
            else:
                assert proc.returncode == 5 and proc.stderr.count("\n") == 1, proc.stderr
                assert "the user-space process serving its file system (fuse)" in proc.stderr
            assert leftovers(Path(image), site["state"], site["target"]) == []
    finally:
        where.rmdir()
