"""The pieces of container mode that need no mount: the generated /etc/passwd and /etc/group
(spank_sif.identity) and the image's environment (spank_sif.environment), the latter with the real
/bin/sh of this machine sourcing real scripts."""
import os
import time

import pytest

from spank_sif import environment, identity
from spank_sif.environment import DEFAULT_PATH, EnvironmentScriptError

WHO = identity.Identity("alice", 1000, 1000, "Alice: A.", "/home/alice", "/bin/bash",
                        ((1000, "alice"), (27, "sudo"), (5000, "lab")))


def test_passwd_replaces_the_users_entries_and_keeps_the_rest():
    image = b"root:x:0:0:root:/root:/bin/sh\nalice:x:7:7::/nowhere:/bin/false\nold:x:1000:1:::\n\n"
    out = identity.passwd(image, WHO).decode()
    assert out.splitlines() == ["root:x:0:0:root:/root:/bin/sh",
                                "alice:x:1000:1000:Alice  A.:/home/alice:/bin/bash"]


def test_passwd_without_an_image_file():
    assert identity.passwd(b"", WHO) == b"alice:x:1000:1000:Alice  A.:/home/alice:/bin/bash\n"


def test_group_adds_the_user_to_known_groups_and_appends_the_others():
    image = b"root:x:0:\nsudo:x:27:bob\nlab:x:5000:alice\nbroken line\n"
    out = identity.group(image, WHO).decode().splitlines()
    assert out == ["root:x:0:", "sudo:x:27:bob,alice", "lab:x:5000:alice", "broken line", "alice:x:1000:alice"]


def test_identity_of_a_host_user():
    who = identity.Identity.of(0, 0, [0])
    assert who.name == "root" and who.groups[0] == (0, "root")


# ------------------------------------------------------------------ environment merge

def test_changes_image_first_then_job_then_image_root():
    job = {"HOME": "/h", "PATH": "/host/bin", "LD_PRELOAD": "/host.so", "LANG": "job"}
    evaluated = {"HOME": "/h", "PATH": "/img/bin:" + DEFAULT_PATH, "LANG": "image", "FOO": "image",
                 "SHLVL": "1", "_": "/bin/sh", "PWD": "/x"}
    to_set, to_unset = environment.changes(job, evaluated, ("PATH", "LD_PRELOAD"))
    assert to_set == {"PATH": "/img/bin:" + DEFAULT_PATH, "FOO": "image", "SIF_IMAGE_ROOT": "/"}
    assert to_unset == ["LD_PRELOAD"]


def test_shell_input_drops_host_only_variables():
    env = environment.shell_input({"PATH": "/host", "LD_LIBRARY_PATH": "/l", "HOME": "/h"},
                                  ("PATH", "LD_LIBRARY_PATH"))
    assert env == {"HOME": "/h", "PATH": DEFAULT_PATH}


# ------------------------------------------------------------------ evaluating real scripts

@pytest.fixture
def proc_fd():
    fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def scripts(tmp_path, **texts):
    for name, text in texts.items():
        (tmp_path / f"{name}.sh").write_text(text)
    return str(tmp_path)


def test_scripts_run_in_name_order_and_only_exports_count(tmp_path, proc_fd):
    env_dir = scripts(tmp_path, **{
        "01-base": "export A=first\nexport ORDER=one\n",
        "90-environment": 'export ORDER="$ORDER two"\nexport PATH=/opt/app/bin:$PATH\nNOT_EXPORTED=1\n'
                          'export ODD="a b\nc=d"\necho noise; echo more noise >&2\n'})
    (tmp_path / "README").write_text("export IGNORED=1\n")  # not a .sh file
    out = environment.evaluate({"HOME": "/h", "PATH": DEFAULT_PATH}, 5, proc_fd, env_dir=env_dir)
    assert out["ORDER"] == "one two" and out["A"] == "first" and out["ODD"] == "a b\nc=d"
    assert out["PATH"] == "/opt/app/bin:" + DEFAULT_PATH and out["HOME"] == "/h"
    assert "NOT_EXPORTED" not in out and "IGNORED" not in out


def test_no_scripts_gives_back_the_start(tmp_path, proc_fd):
    out = environment.evaluate({"PATH": DEFAULT_PATH}, 5, proc_fd, env_dir=str(tmp_path / "none"))
    assert out["PATH"] == DEFAULT_PATH
    assert not environment.has_scripts(str(tmp_path / "none")) and not environment.has_scripts(str(tmp_path))


def test_a_failing_script_is_named_with_its_last_words(tmp_path, proc_fd):
    env_dir = scripts(tmp_path, **{"10-ok": "export A=1\n", "50-bad": "echo 'no licence' >&2\nexit 3\n"})
    with pytest.raises(EnvironmentScriptError) as err:
        environment.evaluate({"PATH": DEFAULT_PATH}, 5, proc_fd, env_dir=env_dir)
    assert str(err.value) == f"the image's environment script {env_dir}/50-bad.sh failed (exit status 3): no licence"


def test_a_hanging_script_is_stopped_in_time_with_its_children(tmp_path, proc_fd):
    marker = tmp_path / "child.pid"
    env_dir = scripts(tmp_path, **{"70-hang": f"sleep 300 & echo $! > {marker}\nwait\n"})
    start = time.monotonic()
    with pytest.raises(EnvironmentScriptError, match="70-hang.sh did not finish within 1 s"):
        environment.evaluate({"PATH": DEFAULT_PATH}, 1, proc_fd, env_dir=env_dir)
    assert time.monotonic() - start < 5
    child = int(marker.read_text())
    time.sleep(0.2)
    try:  # killed: gone, or a zombie waiting for its new parent
        with open(f"/proc/{child}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        pass


def test_a_script_that_closes_the_channel_and_runs_on_is_bounded(tmp_path, proc_fd):
    env_dir = scripts(tmp_path, **{"10-sneaky": "exec 3>&- 4<&- >/dev/null 2>&1\nsleep 300\n"})
    with pytest.raises(EnvironmentScriptError, match="did not finish within 1 s"):
        environment.evaluate({"PATH": DEFAULT_PATH}, 1, proc_fd, env_dir=env_dir)


def test_no_shell_is_its_own_error(tmp_path, proc_fd):
    with pytest.raises(environment.NoShellError, match="No such file"):
        environment.evaluate({}, 1, proc_fd, env_dir=str(tmp_path), shell=str(tmp_path / "sh"))
    (tmp_path / "sh").write_text("not a program")
    with pytest.raises(environment.NoShellError, match="Permission denied"):
        environment.evaluate({}, 1, proc_fd, env_dir=str(tmp_path), shell=str(tmp_path / "sh"))
