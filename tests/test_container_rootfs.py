"""spank_sif.rootfs on this machine's kernel, as root, in throwaway mount namespaces: targets
resolved inside the root, scaffolds for missing targets, refusals, read-only root, pivot_root.

Each case runs in a forked child that makes its own mount namespace (as a task does) and reports
back as JSON; the "image" is a read-only tmpfs (its own device, as a squashfs has).
"""
import json
import os
import traceback

import pytest

from spank_sif import mounts, rootfs
from spank_sif.errors import SifError

pytestmark = pytest.mark.root


def in_own_namespace(body) -> dict:
    """Run ``body()`` in a child with its own mount namespace; its returned dict (or the error)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount namespaces)")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        try:
            mounts.enter_private_namespace()
            result = {"ok": body()}
        except SifError as err:
            result = {"error": str(err), "type": type(err).__name__}
        except BaseException:  # noqa: BLE001 - report everything to the parent
            result = {"bug": traceback.format_exc()}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "bug" not in result, result["bug"]
    return result


def make_image(builder: rootfs.RootBuilder) -> None:
    """An image tree on its own read-only tmpfs at the builder's root."""
    rootfs.mount("tmpfs", builder.root, "tmpfs", 0, "mode=0755")
    r = builder.root
    for d in ("etc", "tmp", "opt/app"):
        os.makedirs(f"{r}/{d}")
    with open(f"{r}/etc/os-release", "w") as f:
        f.write("ID=image\n")
    with open(f"{r}/etc/passwd", "w") as f:
        f.write("root:x:0:0::/root:/bin/sh\n")
    os.symlink("/../../etc", f"{r}/escape")
    os.symlink("/nonexistent/place", f"{r}/dangling")
    os.symlink("../etc", f"{r}/opt/etc-link")
    rootfs.mount(None, builder.root, None, rootfs.MS_REMOUNT | rootfs.MS_RDONLY)
    builder.image_mounted()


@pytest.fixture
def host(tmp_path):
    """A host directory to bind, and the work area's mount point."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "hello.txt").write_text("from the host\n")
    (tmp_path / "file.txt").write_text("a host file\n")
    return tmp_path


def build(host, binds, inspect):
    """Build a root with ``binds`` [(source, target, readonly)], enter it, run ``inspect()`` inside."""
    def body():
        builder = rootfs.RootBuilder(str(host / "mp"))
        builder.prepare()
        make_image(builder)
        for source, target, readonly in binds:
            fd = os.open(source, os.O_PATH)
            try:
                builder.bind(fd, source, target, readonly, restrict=True)
            finally:
                os.close(fd)
        builder.enter()
        builder.close()
        return inspect()
    return in_own_namespace(body)


def listing(path):
    return sorted(os.listdir(path))


def test_missing_targets_get_scaffolds_and_the_image_stays_visible(host):
    src = str(host / "host")
    out = build(host, [(src, "/srv/in", False), (src, "/opt/app/data/x", True), (src, "/escape/sub", False)],
                lambda: {"root": listing("/"), "srv": open("/srv/in/hello.txt").read(),
                         "deep": open("/opt/app/data/x/hello.txt").read(), "etc": listing("/etc"),
                         "via": open("/etc/sub/hello.txt").read(), "link": listing("/opt/etc-link")})
    o = out["ok"]
    assert o["root"] == ["dangling", "escape", "etc", "opt", "srv", "tmp"]
    assert o["srv"] == o["deep"] == o["via"] == "from the host\n"
    assert o["etc"] == ["os-release", "passwd", "sub"] and o["link"] == o["etc"]
    assert not (host / "etc").exists()  # nothing made on the host


def test_the_root_scaffolds_and_the_image_are_read_only(host):
    src = str(host / "host")

    def inspect():
        results = {}
        for path in ("/new", "/srv/new", "/etc/new", "/opt/app/ro/new", "/srv/in/new"):
            try:
                open(path, "w").close()
                results[path] = "written"
            except OSError as exc:
                results[path] = exc.strerror
        return results
    out = build(host, [(src, "/srv/in", False), (src, "/opt/app/ro", True)], inspect)["ok"]
    assert out == {"/new": "Read-only file system", "/srv/new": "Read-only file system",
                   "/etc/new": "Read-only file system", "/opt/app/ro/new": "Read-only file system",
                   "/srv/in/new": "written"}
    assert (host / "host" / "new").exists()


def test_a_file_binds_onto_a_file(host):
    out = build(host, [(str(host / "file.txt"), "/etc/passwd", True), (str(host / "file.txt"), "/opt/f", False)],
                lambda: [open("/etc/passwd").read(), open("/opt/f").read()])
    assert out["ok"] == ["a host file\n"] * 2


REFUSED = [
    ("/escape", "dir", "symbolic link inside the image"),
    ("/dangling", "dir", "symbolic link"),
    ("/dangling/below", "dir", "symbolic link to a path the image does not have"),
    ("/etc/os-release", "dir", "is a file in the container"),
    ("/etc", "file", "is a directory in the container"),
    ("/etc/os-release/x", "dir", "not a directory"),
    ("/srv/in/new/deeper", "dir", "bound from the host"),
]


@pytest.mark.parametrize("target,kind,words", REFUSED)
def test_refused_targets_are_one_line_errors(host, target, kind, words):
    source = str(host / "host") if kind == "dir" else str(host / "file.txt")
    binds = [(str(host / "host"), "/srv/in", False), (source, target, False)]
    out = build(host, binds, lambda: "entered")
    assert out.get("type") == "UsageError", out
    assert words in out["error"] and "\n" not in out["error"]


def test_proc_magic_links_are_refused(host):
    binds = [("/proc", "/proc", False), (str(host / "host"), "/proc/self/root/etc/x", False)]
    out = build(host, binds, lambda: "entered")
    assert out.get("type") == "UsageError" and "/proc" in out["error"], out


def test_the_work_area_stays_out_of_recursive_binds(host):
    # the mount point lies under the bound host directory: the container must see it empty
    out = build(host, [(str(host), "/srv/host", False)], lambda: listing("/srv/host/mp"))
    assert out["ok"] == []


def test_only_image_files_are_read_for_identity(host):
    def body():
        builder = rootfs.RootBuilder(str(host / "mp"))
        builder.prepare()
        make_image(builder)
        seen = [builder.read_image_file("/etc/passwd", 1000).decode(),
                builder.read_image_file("/escape/passwd", 1000).decode(),  # in-root: the image's
                builder.read_image_file("/etc/passwd", 5).decode()]  # too large
        fd = os.open(str(host / "host"), os.O_PATH)
        builder.bind(fd, "host", "/srv/in", restrict=True)
        os.close(fd)
        return [*seen, builder.read_image_file("/srv/in/hello.txt", 1000).decode()]  # a bind: not the image
    assert in_own_namespace(body)["ok"] == ["root:x:0:0::/root:/bin/sh\n"] * 2 + ["", ""]
