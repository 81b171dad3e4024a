"""spank_sif.callbacks through a fake of spank_sif.spank (the one allowed seam).

The engine underneath is the real one: these tests stop at failures it reports before touching the
kernel (missing image, not a SIF, policy); the mounts themselves are tested under real Slurm.
"""
import os

import pytest

from spank_sif import callbacks, options
from spank_sif.errors import SifError
from spank_sif.secret import Secret, dumpable

SECRET = "correct horse battery staple"


class FakeSpank:
    """Records what the callbacks asked of Slurm; the job environment is a dict."""

    def __init__(self, context="remote", option=None, job_env=None, state_dir="/run/spank-sif",
                 uid=None, gid=None, options=None):
        self._context, self._option, self._state_dir = context, option, state_dir
        self.options = dict(options or {})  # the container options given: name -> value
        self.container_active = False
        self.job_env = dict(job_env or {})
        self.job_control = {}
        self.user_lines, self.log_lines, self.private_lines = [], [], []
        self.ids = {"uid": os.getuid() if uid is None else uid,
                    "gid": os.getgid() if gid is None else gid,
                    "job": 42, "step": 0, "task": 0}

    def context(self):
        return self._context

    def option_value(self):
        return self._option

    def option_conflict(self):
        return False

    def option_value_of(self, name):
        return self._option if name == "sif-image" else self.options.get(name)

    def option_conflict_of(self, name):
        return False

    def set_container_active(self, on):
        self.container_active = on

    def job_environment(self, sp):
        return dict(self.job_env)

    def job_control_unsetenv(self, sp, name):
        self.job_control.pop(name, None)

    def state_dir(self):
        return self._state_dir

    def job_id(self, sp):
        return self.ids["job"]

    def step_id(self, sp):
        return self.ids["step"]

    def uid(self, sp):
        return self.ids["uid"]

    def gid(self, sp):
        return self.ids["gid"]

    def task_id(self, sp):
        return self.ids["task"]

    def getenv(self, sp, name):
        return self.job_env.get(name)

    def getenv_secret(self, sp, name):
        value = self.job_env.get(name)
        return None if value is None else Secret(value.encode("utf-8", "surrogateescape"))

    def setenv(self, sp, name, value, overwrite=True):
        self.job_env[name] = value

    def unsetenv(self, sp, name):
        self.job_env.pop(name, None)

    def job_control_setenv(self, sp, name, value):
        self.job_control[name] = value

    def log(self, level, message):
        self.log_lines.append((level, message))

    def log_private(self, message):
        self.private_lines.append(message)

    def tell_user(self, message):
        self.user_lines.append(message)

    def everything_said(self) -> str:
        return "\n".join(self.user_lines + [m for _, m in self.log_lines] + self.private_lines)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    def make(**kw):
        kw.setdefault("state_dir", str(tmp_path / "state"))
        spank = FakeSpank(**kw)
        monkeypatch.setattr(callbacks, "spank", spank)
        monkeypatch.setattr(callbacks, "step", callbacks.Step())
        return spank
    return make


@pytest.fixture
def site(tmp_path):
    """Plugstack args naming a site config in tmp_path (state_dir matching the fake's)."""
    def make(text=""):
        path = tmp_path / "spank_sif.yaml"
        path.write_text(f"state_dir: {tmp_path / 'state'}\n{text}")
        return [f"config={path}"]
    return make


def run_step(spank, args, tasks=1):
    """The remote callbacks of one step, in Slurm's order; returns the task callbacks' results."""
    results = [callbacks.dispatch("init_post_opt", None, args),
               callbacks.dispatch("user_init", None, args)]
    for task in range(tasks):
        spank.ids["task"] = task
        results.append(callbacks.dispatch("task_init_privileged", None, args))
    results.append(callbacks.dispatch("exit", None, args))
    return results


# ------------------------------------------------------------------ submit side

@pytest.mark.parametrize("context", ["local", "allocator"])
def test_submit_side_exports_the_absolute_path(fake, monkeypatch, tmp_path, context):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(options.ENV_DEFAULT, raising=False)
    spank = fake(context=context, option="img/app.sif")
    assert callbacks.dispatch("init_post_opt", None, []) == 0
    assert os.environ[options.ENV_DEFAULT] == str(tmp_path / "img/app.sif")
    assert spank.job_control == {options.OPTION_ENV: str(tmp_path / "img/app.sif")}


def test_submit_side_env_default_needs_no_job_control_entry(fake, site, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(options.ENV_DEFAULT, "a.sif")
    spank = fake(context="local", option=None)
    assert callbacks.dispatch("init_post_opt", None, site("submit_check: off")) == 0  # a.sif is missing
    assert os.environ[options.ENV_DEFAULT] == str(tmp_path / "a.sif")
    assert spank.job_control == {}


def test_submit_side_bad_value_fails_with_one_line(fake, monkeypatch):
    monkeypatch.delenv(options.ENV_DEFAULT, raising=False)
    spank = fake(context="local", option="bad\nname.sif")
    assert callbacks.dispatch("init_post_opt", None, []) == -1
    assert len(spank.user_lines) == 1 and "newline" in spank.user_lines[0]


@pytest.mark.parametrize("context", ["local", "allocator"])
def test_submit_side_refuses_what_the_node_would_refuse(fake, site, monkeypatch, tmp_path, context):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(options.ENV_DEFAULT, raising=False)
    spank = fake(context=context, option="missing.sif")
    assert callbacks.dispatch("init_post_opt", None, site()) == -1
    assert spank.user_lines == [f"image {tmp_path}/missing.sif does not exist"]


def test_submit_side_says_when_it_could_not_check(fake, site, monkeypatch, tmp_path):
    monkeypatch.delenv(options.ENV_DEFAULT, raising=False)
    spank = fake(context="local", option="/nonexistent-dir/app.sif")
    assert callbacks.dispatch("init_post_opt", None, site()) == 0
    assert len(spank.user_lines) == 1 and "not checked at submit" in spank.user_lines[0]


def test_submit_side_site_configuration(fake, monkeypatch, tmp_path):
    """The plugstack line's config= file: absent on this host, the defaults (the check runs);
    unreadable, the check is skipped with one line; invalid, the node's one line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(options.ENV_DEFAULT, raising=False)
    spank = fake(context="allocator", option="missing.sif")
    assert callbacks.dispatch("init_post_opt", None, [f"config={tmp_path}/absent.yaml"]) == -1
    assert spank.user_lines == [f"image {tmp_path}/missing.sif does not exist"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("submit_check: sometimes\n")
    spank = fake(context="allocator", option="missing.sif")
    assert callbacks.dispatch("init_post_opt", None, [f"config={bad}"]) == -1
    assert len(spank.user_lines) == 1 and "'submit_check' must be one of" in spank.user_lines[0]
    bad.chmod(0)
    spank = fake(context="allocator", option="missing.sif")
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(bad))  # root reads anything
    assert callbacks.dispatch("init_post_opt", None, [f"config={bad}"]) == 0
    assert spank.user_lines == [f"image {tmp_path}/missing.sif was not checked at submit: the site "
                                f"configuration {bad} is not readable on this host"]


@pytest.mark.parametrize("context,callback", [("local", "user_init"), ("slurmd", "init"),
                                              ("remote", "task_init"), ("job_script", "job_prolog")])
def test_callbacks_without_a_handler_do_nothing(fake, context, callback):
    spank = fake(context=context)
    assert callbacks.dispatch(callback, None, []) == 0
    assert spank.everything_said() == ""


# ------------------------------------------------------------------ node side

def test_step_without_image_does_nothing(fake, site):
    spank = fake(option=None)
    assert run_step(spank, site(), tasks=2) == [0, 0, 0, 0, 0]
    assert "SIF_IMAGE_ROOT" not in spank.job_env and spank.everything_said() == ""


def test_missing_image_is_reported_once_and_fails_every_task(fake, site, tmp_path):
    image = tmp_path / "missing.sif"
    spank = fake(option=str(image), job_env={"APPTAINER_ENCRYPTION_PASSPHRASE": SECRET})
    results = run_step(spank, site(), tasks=3)
    assert results == [0, 0, -1, -1, -1, 0]  # init_post_opt must not fail: srun would see nothing
    assert len(spank.user_lines) == 1 and str(image) in spank.user_lines[0]
    assert "\n" not in spank.user_lines[0]
    assert "APPTAINER_ENCRYPTION_PASSPHRASE" not in spank.job_env   # stripped from the tasks
    assert SECRET not in spank.everything_said()
    assert not list(tmp_path.glob("state/*/*"))                      # no record left behind


def test_not_a_sif_is_reported(fake, site, tmp_path):
    image = tmp_path / "plain.txt"
    image.write_bytes(b"hello, not a SIF\n" * 100)
    spank = fake(option=str(image))
    assert run_step(spank, site()) == [0, 0, -1, 0]
    assert len(spank.user_lines) == 1 and "SIF" in spank.user_lines[0]


def test_site_may_keep_key_variables(fake, site, tmp_path):
    spank = fake(option=str(tmp_path / "missing.sif"),
                 job_env={"APPTAINER_ENCRYPTION_PASSPHRASE": SECRET})
    run_step(spank, site("strip_key_variables: false\n"))
    assert spank.job_env["APPTAINER_ENCRYPTION_PASSPHRASE"] == SECRET


def test_batch_script_keeps_key_variables_for_its_sruns(fake, site, tmp_path):
    spank = fake(option=str(tmp_path / "missing.sif"),
                 job_env={"APPTAINER_ENCRYPTION_PASSPHRASE": SECRET})
    spank.ids["step"] = callbacks.BATCH_STEP
    run_step(spank, site())
    assert spank.job_env["APPTAINER_ENCRYPTION_PASSPHRASE"] == SECRET
    assert SECRET not in spank.everything_said()


def test_relative_option_uses_the_jobs_absolute_export(fake, site, tmp_path):
    spank = fake(option="gone.sif", job_env={options.ENV_DEFAULT: str(tmp_path / "gone.sif")})
    run_step(spank, site())
    assert str(tmp_path / "gone.sif") in spank.user_lines[0]


CONFIG_ERRORS = [
    # site config text (None: plugstack args below), plugstack args, words in the one line
    ("mount_point: relative\n", [], ["spank_sif.yaml", "mount_point"]),
    ("no_such_key: 1\n", [], ["spank_sif.yaml", "no_such_key"]),
    ("", ["colour=blue"], ["plugstack.conf", "colour=blue"]),
    (None, ["config=/nonexistent/spank_sif.yaml"], ["/nonexistent/spank_sif.yaml", "not found"]),
]


@pytest.mark.parametrize("text,extra,words", CONFIG_ERRORS)
def test_bad_site_config_fails_closed_naming_file_and_key(fake, site, tmp_path, text, extra, words):
    spank = fake(option=str(tmp_path / "app.sif"))
    args = (site(text) if text is not None else []) + extra
    assert run_step(spank, args) == [0, 0, -1, 0]
    assert len(spank.user_lines) == 1
    for word in words:
        assert word in spank.user_lines[0]


def test_state_dir_must_match_what_the_shim_checks(fake, site, tmp_path):
    spank = fake(option=str(tmp_path / "app.sif"), state_dir="/somewhere/else")
    assert run_step(spank, site()) == [0, 0, -1, 0]
    assert "state_dir=" in spank.user_lines[0]


def test_bug_is_logged_with_traceback_but_user_sees_one_generic_line(fake, site, tmp_path):
    spank = fake(option=str(tmp_path / "app.sif"))

    def broken(sp):
        raise ZeroDivisionError("a bug")
    spank.uid = broken
    assert run_step(spank, site()) == [0, 0, -1, 0]
    assert spank.user_lines == [callbacks.INTERNAL_ERROR]
    assert any("ZeroDivisionError" in m for m in spank.private_lines)
    assert not any("Traceback" in m or "ZeroDivisionError" in m for _, m in spank.log_lines)


@pytest.mark.root
def test_a_bug_in_user_init_fails_every_task(fake, site, monkeypatch, tmp_path):
    """A bug in user_init, on a step whose image unlocked: the user gets the one fixed line and
    every task_init_privileged fails, so no task runs without its image (the step runs in a child:
    a task that went on would mount the image in a namespace of its own)."""
    import reftools
    from engine_helpers import in_child
    from spank_sif import sif
    if os.geteuid() != 0:
        pytest.skip("unlocks a real plain image (loop device)")
    sqfs = reftools.make_squashfs(tmp_path / "tree", tmp_path / "root.sqfs", {"hello.txt": b"hi\n"})
    image = tmp_path / "plain.sif"
    sif.write_sif(str(image), sif.apptainer_layout(sqfs.read_bytes(), sif.FsType.SQUASHFS))
    spank = fake(option=str(image))

    def broken(sp, args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setitem(callbacks.HANDLERS, ("remote", "user_init"), broken)
    args = site(f"mount_point: {tmp_path / 'sif'}\n")
    status, (results, told) = in_child(lambda: (run_step(spank, args, tasks=2), spank.user_lines))
    assert status == 0 and results == [0, -1, -1, -1, 0], (results, told)
    assert told == [callbacks.INTERNAL_ERROR]
    assert not list(tmp_path.glob("state/*/*"))  # released by exit

def test_job_epilog_sweeps_what_the_job_left(fake, site, tmp_path):
    """Records as a step SIGKILLed right after it started leaves them; the real engine sweeps this
    job's and leaves another job's alone."""
    from spank_sif.state import StateDir
    fake(context="job_script")
    state = StateDir(str(tmp_path / "state"))
    for job in ("42.0", "43.0"):
        state.record("session", job, f"spank-sif-{job}-0badc0de",
                     {"image": "/images/app.sif", "user": "u", "uid": 1000, "pid": 2 ** 22 + 1,
                      "encrypted": False, "status": "opening"})
    assert callbacks.dispatch("job_epilog", None, site()) == 0
    assert state.records("42") == []
    assert [r.job for r in state.records("43")] == ["43.0"]


def test_step_labels_name_special_steps(fake):
    spank = fake()
    for step_id, label in [(0, "42.0"), (7, "42.7"), (0xFFFFFFFB, "42.batch"),
                           (0xFFFFFFFA, "42.interactive")]:
        spank.ids["step"] = step_id
        assert callbacks.step_label(None) == label


def test_output_router_sends_lines_to_the_log(fake):
    spank = fake()
    writer = callbacks._LogWriter()
    writer.write("one\ntwo")
    writer.flush()
    assert spank.private_lines == ["one", "two"] and spank.log_lines == []


def test_errors_are_sif_errors():
    assert issubclass(callbacks.spank.SpankCallError, SifError)


# ------------------------------------------------------------------ the key while it is held

class RecordingSpank(FakeSpank):
    """Also records, for every call, whether this process was dumpable (the kernel's answer)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.str_reads, self.secrets, self.dumpable_at = [], [], []

    def getenv(self, sp, name):
        self.str_reads.append(name)
        return super().getenv(sp, name)

    def getenv_secret(self, sp, name):
        self.dumpable_at.append((f"read {name}", dumpable()))
        value = super().getenv_secret(sp, name)
        if value is not None:
            self.secrets.append(value)
        return value

    def log(self, level, message):
        self.dumpable_at.append((message, dumpable()))
        super().log(level, message)


@pytest.mark.root
def test_key_variables_are_read_into_secrets_and_held_undumpable(monkeypatch, site, tmp_path):
    """On a node, the key variables are read straight into Secrets (never a str) and wiped after
    the unlock; slurmstepd is not dumpable from reading them until the unlock is done (the engine's
    own log line from inside the unlock shows it), and dumpable again afterwards."""
    import reftools
    from spank_sif import sif
    if os.geteuid() != 0:
        pytest.skip("unlocks a real plain image (loop device)")
    sqfs = reftools.make_squashfs(tmp_path / "tree", tmp_path / "root.sqfs", {"hello.txt": b"hi\n"})
    image = tmp_path / "plain.sif"
    sif.write_sif(str(image), sif.apptainer_layout(sqfs.read_bytes(), sif.FsType.SQUASHFS))
    spank = RecordingSpank(option=str(image), state_dir=str(tmp_path / "state"),
                           job_env={"APPTAINER_ENCRYPTION_PASSPHRASE": SECRET,
                                    "SINGULARITY_ENCRYPTION_PEM_DATA": SECRET})
    monkeypatch.setattr(callbacks, "spank", spank)
    monkeypatch.setattr(callbacks, "step", callbacks.Step())
    args = site("log_level: verbose\n")
    assert dumpable() == 1
    try:
        assert callbacks.dispatch("init_post_opt", None, args) == 0, spank.everything_said()
        assert callbacks.step.unlocked is not None, spank.everything_said()
        assert dumpable() == 1
    finally:
        callbacks.dispatch("exit", None, args)
    assert not set(spank.str_reads) & set(callbacks.step.config.key_variables)
    assert len(spank.secrets) == 2 and all(bytes(s._buf) == bytes(len(s)) for s in spank.secrets)
    during = dict(spank.dumpable_at)
    opened = [dumped for message, dumped in spank.dumpable_at if "opened as" in message]
    assert opened == [0], spank.dumpable_at
    assert during["read APPTAINER_ENCRYPTION_PASSPHRASE"] == 0
    assert SECRET not in spank.everything_said()


# ------------------------------------------------------------------ container mode

def test_sbatch_exports_the_container_options_as_defaults_not_as_options(fake, site, monkeypatch, tmp_path):
    """sbatch --sif-container --sif-binds=data:/in: the job's sruns inherit them as environment
    defaults (which they may switch off), not as options given on their own command line."""
    monkeypatch.chdir(tmp_path)
    for name in ("SLURM_SIF_CONTAINER", "SLURM_SIF_BINDS", "SLURM_SIF_WORKDIR"):
        monkeypatch.delenv(name, raising=False)
    spank = fake(context="allocator", option="app.sif", options={"sif-container": "", "sif-binds": "data:/in"})
    spank.job_control = {options.option_env("sif-container"): "", options.option_env("sif-binds"): "data:/in"}
    assert callbacks.dispatch("init_post_opt", None, site("submit_check: off")) == 0  # app.sif is missing
    assert os.environ["SLURM_SIF_CONTAINER"] == "1"
    assert os.environ["SLURM_SIF_BINDS"] == f"{tmp_path}/data:/in"
    assert spank.job_control == {options.OPTION_ENV: str(tmp_path / "app.sif")}


def test_container_options_without_container_mode_are_one_line(fake, site, tmp_path):
    spank = fake(option=str(tmp_path / "missing.sif"), options={"sif-binds": "/a:/b"})
    assert run_step(spank, site()) == [0, 0, -1, 0]
    assert spank.user_lines == ["--sif-binds only applies with --sif-container"]


def test_a_missing_bind_source_stops_the_step_before_the_image_is_opened(fake, site, tmp_path):
    image = tmp_path / "app.sif"
    spank = fake(option=str(image), options={"sif-container": "", "sif-binds": f"{tmp_path}/nope:/x"})
    assert run_step(spank, site(), tasks=2) == [0, 0, -1, -1, 0]
    assert spank.user_lines == [f"bind source {tmp_path}/nope does not exist"]  # not the missing image
    assert not spank.container_active and callbacks.step.plan is None
    assert not list(tmp_path.glob("state/*/*"))


def test_the_batch_step_stays_on_the_host(fake, site, tmp_path):
    spank = fake(option=str(tmp_path / "missing.sif"), options={"sif-container": "", "sif-binds": "/a:/b"},
                 job_env={"SLURM_SIF_CONTAINER": "1"})
    spank.ids["step"] = callbacks.BATCH_STEP
    run_step(spank, site())
    assert "does not exist" in spank.user_lines[0] and not spank.container_active


def test_site_default_turns_container_mode_on_and_the_job_can_turn_it_off(fake, site, tmp_path):
    """Seen by what fails first: in container mode the bind sources are checked before the image."""
    image, binds = tmp_path / "missing.sif", {"SLURM_SIF_BINDS": f"{tmp_path}/nope:/x"}
    for job_env, first_error in (({}, "bind source"), ({"SLURM_SIF_CONTAINER": "0"}, "image")):
        spank = fake(option=str(image), job_env={**binds, **job_env})
        run_step(spank, site("container_default: true\n"))
        assert spank.user_lines[0].startswith(first_error), spank.user_lines
