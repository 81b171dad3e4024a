"""Files are opened with the user's uid, gid and groups, never root's (userfiles.open_as_user)."""
import os
import shutil

import pytest

from engine_helpers import GROUP, OTHER, USER, ensure_users, world_dir
from spank_sif.errors import ImageError, KeyMaterialError
from spank_sif.userfiles import User, open_as_user, read_as_user

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def users():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ensure_users()
    return User.from_name(USER), User.from_name(OTHER)


@pytest.fixture
def wd():
    path = world_dir()
    yield path
    shutil.rmtree(path)


def _file(path, mode, data=b"data\n", owner=None, group=None):
    path.write_bytes(data)
    os.chown(path, owner if owner is not None else 0, group if group is not None else 0)
    path.chmod(mode)
    return path


def test_user_identity(users):
    user, _ = users
    import grp
    assert grp.getgrnam(GROUP).gr_gid in user.groups
    assert user.name == USER and user.uid != 0


def test_opens_a_readable_file_and_returns_a_usable_fd(users, wd):
    user, _ = users
    f = _file(wd / "ok", 0o644, b"contents\n")
    fd = open_as_user(str(f), user)
    try:
        assert os.pread(fd, 100, 0) == b"contents\n"
        assert os.get_inheritable(fd) is False  # close-on-exec
    finally:
        os.close(fd)


@pytest.mark.parametrize("case, expected", [
    ("root_only", "cannot read image"),
    ("missing", "does not exist"),
    ("directory", "not a regular file"),
    ("fifo", "not a regular file"),
    ("symlink_to_root_only", "cannot read image"),
    ("untraversable_dir", "cannot read image"),
    ("other_users_file", "cannot read image"),
])
def test_refusals_are_one_line_and_name_the_cause(users, wd, case, expected):
    user, other = users
    target = wd / "target"
    if case == "root_only":
        _file(target, 0o600)  # root can read it: only the user's rights may count
    elif case == "directory":
        target.mkdir()
    elif case == "fifo":
        os.mkfifo(target, 0o666)  # opening must not hang
    elif case == "symlink_to_root_only":
        secret = _file(wd / "secret", 0o600)
        target.symlink_to(secret)
    elif case == "untraversable_dir":
        (wd / "closed").mkdir(mode=0o700)
        _file(wd / "closed" / "f", 0o644)
        target = wd / "closed" / "f"
    elif case == "other_users_file":
        _file(target, 0o600, owner=other.uid, group=other.gid)
    with pytest.raises(ImageError) as err:
        open_as_user(str(target), user)
    message = str(err.value)
    assert expected in message and str(target) in message and "\n" not in message


def test_supplementary_groups_count(users, wd):
    import grp
    user, other = users
    f = _file(wd / "group-readable", 0o640, group=grp.getgrnam(GROUP).gr_gid)
    os.close(open_as_user(str(f), user))
    with pytest.raises(ImageError):
        open_as_user(str(f), other)


def test_users_own_symlink_is_followed_with_users_rights(users, wd):
    user, _ = users
    f = _file(wd / "readable", 0o644, b"via link\n")
    (wd / "link").symlink_to(f)
    fd = open_as_user(str(wd / "link"), user)
    try:
        assert os.pread(fd, 100, 0) == b"via link\n"
    finally:
        os.close(fd)


def test_relative_path_resolves_in_given_cwd(users, wd):
    user, _ = users
    _file(wd / "rel", 0o644, b"relative\n")
    fd = open_as_user("rel", user, cwd=str(wd))
    try:
        assert os.pread(fd, 100, 0) == b"relative\n"
    finally:
        os.close(fd)


def test_read_as_user_limits_and_error_class(users, wd):
    user, _ = users
    _file(wd / "key", 0o644, b"k" * 100)
    assert read_as_user(str(wd / "key"), user, 100) == b"k" * 100
    with pytest.raises(KeyMaterialError, match="larger than 99 bytes"):
        read_as_user(str(wd / "key"), user, 99, error=KeyMaterialError)
    with pytest.raises(KeyMaterialError, match="PEM key file .* does not exist"):
        read_as_user(str(wd / "nope"), user, 99, what="PEM key file", error=KeyMaterialError)


def test_file_only_its_owner_may_read_opens(users, wd):
    user, other = users
    mine = _file(wd / "mine", 0o400, owner=user.uid, group=user.gid)
    os.close(open_as_user(str(mine), user))
    with pytest.raises(ImageError, match="cannot read"):
        open_as_user(str(mine), other)


def test_descriptors_of_the_caller_do_not_reach_the_child(users, wd):
    """root holds a file the user may read but not reach (its directory is root's alone); the child
    that opens as the user must not inherit that descriptor, or /proc/self/fd/N reopens it with the
    user's rights, around the directory that protects it."""
    user, _ = users
    closed = wd / "root-only"
    closed.mkdir(mode=0o700)
    secret = _file(closed / "secret", 0o644, b"root's\n")
    with pytest.raises(ImageError, match="cannot read"):
        open_as_user(str(secret), user)  # by its path: refused
    held = os.open(secret, os.O_RDONLY)  # inheritable or not: the fork copies it
    try:
        for fd in (held, 0, 1, 2):
            with pytest.raises(ImageError):
                os.close(open_as_user(f"/proc/self/fd/{fd}", user))
    finally:
        os.close(held)


def test_a_file_system_that_cannot_be_identified_is_not_vouched_for(tmp_path):
    """kernel_mount trusts a file only on a file system it can identify. A descriptor opened before
    this process entered a new mount namespace lies on a mount that namespace does not list (its
    mounts are copies with new ids), so its file system cannot be identified: nobody vouches for
    it, even root's file of mode 0644."""
    from engine_helpers import in_child
    from spank_sif import mounts, userfiles
    path = tmp_path / "root-owned.img"
    path.write_bytes(b"squashfs, say")
    path.chmod(0o644)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def in_a_new_mount_namespace():
        mounts.enter_private_namespace()  # as each task does
        return userfiles.filesystem_type(fd), userfiles.who_else_can_write(fd)

    try:
        assert userfiles.filesystem_type(fd) and userfiles.who_else_can_write(fd) == ""
        assert in_child(in_a_new_mount_namespace) == (
            0, ("", "whoever serves its file system (which cannot be identified)"))
    finally:
        os.close(fd)
