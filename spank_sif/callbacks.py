"""What each SPANK callback does, per context. Called by the C shim through ``dispatch()``.

The shim only calls in when there is work: a step or command with an image, or the epilog of a job
that left state on this node. On a node (slurmstepd, root) a step goes through:

  init_post_opt         before any task is forked: resolve the image, load the site config, take
                        the key from the job environment (and strip it from the tasks'), unlock
                        once for the whole step. Errors cannot reach the user yet: they are kept.
  user_init             the first callback whose output reaches srun: report a kept error (once).
  task_init_privileged  per task, as root, after it joined any job container: fail the task if
                        there was an error; else a private mount namespace, the image mounted at
                        the site's mount point, SIF_IMAGE_ROOT exported to that task.
  exit                  release the step's mapping.
  job_epilog            sweep whatever the job left on the node (crashed or killed steps).

In container mode (--sif-container, spank_sif/container.py) init_post_opt also opens the bind
sources, task_init_privileged builds the container and enters it instead of mounting the image at
the mount point, and task_init (as the user, inside) sets the working directory and the image's
environment.

Everything a user can cause ends as ONE line prefixed ``sif-image:`` on the user's stderr and a
non-zero task exit. A bug's traceback goes to slurmd's log only (``spank.log_private``): once a
step's I/O is set up, slurmstepd and its tasks copy what they log to the job's stderr (errors
always, the rest with ``srun --slurmd-debug``), so an ordinary log line in user_init or a task
callback would reach the user. The user gets the fixed INTERNAL_ERROR line.

The key variables are read into wipeable buffers, never strings, and the process is not dumpable
while it holds them (``secret.Undumpable``): from reading them until the unlock is done.
"""
import os
import sys

from spank_sif import log, options, spank
from spank_sif.errors import ConfigError, SifError, UsageError


def import_node_modules() -> None:
    """Import the node engine now: in the first callback of a step on a node, as root. Later
    callbacks run as the user or in forked tasks, where importing is slower or not allowed (they
    find the modules in sys.modules); the submit side (srun, sbatch) never needs them."""
    import spank_sif.config
    import spank_sif.lifecycle
    import spank_sif.userfiles  # noqa: F401

ENV_IMAGE_ROOT = "SIF_IMAGE_ROOT"
PLUGSTACK_KEYS = ("config", "python", "state_dir")
SUBMIT_CONTEXTS = ("local", "allocator")
INTERNAL_ERROR = "internal error on this node; the admin finds the details in slurmd's log"
INTERNAL_ERROR_SUBMIT = "internal error; the admin finds the details in this host's system log"


class Step:
    """What this process knows about its step between callbacks (one step per slurmstepd)."""

    def __init__(self):
        self.config = None      # the site configuration, once loaded
        self.unlocked = None    # the step's lifecycle.Unlocked image
        self.plan = None        # container mode: the step's container.Plan
        self.error = None       # one-line message kept for the user
        self.reported = False


step = Step()


# ------------------------------------------------------------------ plumbing

class _LogWriter:
    """sys.stdout/sys.stderr replacement: in task context the process's stderr is the user's, and
    what Python writes there unasked (warnings, "Exception ignored in ..." tracebacks) is for the
    admin: slurmd's log only."""

    def __init__(self):
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            spank.log_private(line)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            spank.log_private(self.pending)
            self.pending = ""


def route_output() -> None:
    """Send stray prints, warnings and tracebacks to slurmd's log instead of the job's output."""
    sys.stdout = _LogWriter()
    sys.stderr = _LogWriter()


def plugstack_args(args: list) -> dict:
    """``key=value`` arguments from the plugstack.conf line; unknown keys are errors (typos in a
    security setting must not pass silently)."""
    values = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in PLUGSTACK_KEYS:
            raise ConfigError(f"plugstack.conf: unknown argument {arg!r} for spank-sif "
                              f"(known: {', '.join(k + '=' for k in PLUGSTACK_KEYS)})")
        values[key] = value
    return values


def load_site_config(args: list):
    """The site configuration named by ``config=`` (default /etc/slurm/spank_sif.yaml). From here
    on, what the node engine does goes to slurmd's log at the site's ``log_level``."""
    from spank_sif.config import load_config
    config = load_config(plugstack_args(args).get("config"))
    log.configure(spank.log, config.log_level)
    if os.path.normpath(config.state_dir) != os.path.normpath(spank.state_dir()):
        raise ConfigError(f"{config.source}: 'state_dir' is {config.state_dir} but the plugin "
                          f"checks {spank.state_dir()} in the epilog; put state_dir="
                          f"{config.state_dir} on the plugstack.conf line")
    return config


def _internal_error(where: str) -> str:
    """Log the bug being handled, traceback and all, where only the admin sees it; the line for
    the user."""
    try:
        import traceback  # only for bugs: every job step would pay for importing it
    except ImportError as exc:  # inside a container the package's files are out of reach
        spank.log_private(f"{where}: {exc.__context__!r} (no traceback inside a container)")
        return INTERNAL_ERROR
    for line in traceback.format_exc().splitlines():
        spank.log_private(f"{where}: {line}")
    return INTERNAL_ERROR_SUBMIT if spank.context() in SUBMIT_CONTEXTS else INTERNAL_ERROR


# ------------------------------------------------------------------ submit side (srun, sbatch, salloc)

def submit_init_post_opt(sp, args) -> None:
    image = options.submit_side_image(spank.option_value(), os.environ, os.getcwd())
    if image is None:
        return
    # Exported into the command's environment, which becomes the job's: nodes resolve relative
    # paths with it and nested sruns inherit it as their default.
    os.environ[options.ENV_DEFAULT] = image
    if spank.option_value() is not None:
        # sbatch/salloc hand the option to the batch step and nested sruns from here: absolute.
        spank.job_control_setenv(sp, options.OPTION_ENV, image)
    submit_container_options(sp)
    submit_check(image, args)


def submit_check(image: str, args) -> None:
    """Refuse here, before a job ID exists, what the nodes would refuse (spank_sif.submit)."""
    from spank_sif.config import DEFAULT_PATH, SiteConfig, load_config
    path = plugstack_args(args).get("config") or DEFAULT_PATH
    if not os.path.exists(path):  # no copy on this host: the defaults (the admin guide says to copy it)
        config = SiteConfig()
    elif not os.access(path, os.R_OK):
        # The nodes enforce everything anyway: a login node's unreadable copy must not stop jobs.
        spank.tell_user(f"image {image} was not checked at submit: the site configuration {path} "
                        "is not readable on this host")
        return
    else:
        config = load_config(path)
    from spank_sif import submit
    mode = submit.mode_for(config.submit_check, spank.context(), os.environ)
    note = submit.check(image, os.environ, config, mode)
    if note:
        spank.tell_user(note)


def submit_container_options(sp) -> None:
    """The container options travel as environment defaults (spank_sif.options says why): export
    what was given, and keep sbatch/salloc from handing them to every srun as given options."""
    given = {name: spank.option_value_of(name) for name in options.CONTAINER_OPTIONS}
    os.environ.update(options.submit_side_container(given, os.environ, os.getcwd()))
    if spank.context() == "allocator":
        for name, value in given.items():
            if value is not None:
                spank.job_control_unsetenv(sp, options.option_env(name))


# ------------------------------------------------------------------ node side (slurmstepd, root)

def _step_user(sp):
    from spank_sif.userfiles import User
    return User.from_uid(spank.uid(sp), spank.gid(sp))


def take_key_variables(sp, config, strip: bool) -> dict:
    """The key variables present in the job environment, as ``Secret``s (the caller wipes them),
    removed from it (the tasks' env) if ``strip``. They never go anywhere else: not argv, not logs,
    not files, not a Python string."""
    found = {}
    try:
        for name in config.key_variables:
            value = spank.getenv_secret(sp, name)
            if value is None:
                continue
            found[name] = value
            if strip:
                spank.unsetenv(sp, name)
    except BaseException:
        _wipe_all(found)
        raise
    return found


def _wipe_all(secrets: dict) -> None:
    for value in secrets.values():
        value.wipe()
    secrets.clear()


def strips_keys(sp, config) -> bool:
    # The batch script keeps them: its sruns take the key from its environment (the user's own
    # script, and slurmctld holds that environment anyway). Every step's tasks lose them.
    return config.strip_key_variables and spank.step_id(sp) != BATCH_STEP


def node_init_post_opt(sp, args) -> None:
    try:
        import_node_modules()
        step.config = load_site_config(args)
        image = options.node_side_image(spank.option_value(), spank.getenv(sp, options.ENV_DEFAULT),
                                        spank.option_conflict())
        if image is None:
            return
        from spank_sif import lifecycle
        from spank_sif.secret import Undumpable
        step.plan = _container_plan(sp, step.config)  # before the key and the unlock: fail early
        try:
            with Undumpable():  # no core dump of slurmstepd while it holds the user's key
                env = take_key_variables(sp, step.config, strips_keys(sp, step.config))
                try:
                    step.unlocked = lifecycle.unlock(image, _step_user(sp), env, step_label(sp),
                                                     step.config, cwd=_job_cwd(sp))
                finally:
                    _wipe_all(env)
        except BaseException:
            if step.plan is not None:
                step.plan.close()
                step.plan = None
            raise
        if step.plan is not None:
            spank.set_container_active(True)
    except SifError as err:
        step.error = str(err)
        spank.log("error", f"job {_job_text(sp)}: {err}")
    except Exception:
        step.error = _internal_error("init_post_opt")


def _container_plan(sp, config):
    """Container mode's per-step preparation, or None for mount mode. The batch script and an
    interactive step stay on the host (they start the job's sruns)."""
    given = {name: spank.option_value_of(name) for name in options.CONTAINER_OPTIONS}
    for name in given:
        if spank.option_conflict_of(name):
            raise UsageError(f"--{name} reached this node with two different values; give it once")
    on_host = spank.step_id(sp) in (BATCH_STEP, INTERACTIVE_STEP)
    wanted = options.node_side_container(given[options.CONTAINER_OPTION] is not None,
                                         spank.getenv(sp, options.CONTAINER_ENV), config.container_default)
    if on_host or not wanted:
        for name in (options.BINDS_OPTION, options.WORKDIR_OPTION):
            if given[name] is not None and not on_host:
                raise UsageError(f"--{name} only applies with --{options.CONTAINER_OPTION}")
        return None
    user_binds = options.node_side_value(given[options.BINDS_OPTION], spank.getenv(sp, options.BINDS_ENV),
                                         options.BINDS_OPTION)
    workdir = options.node_side_value(given[options.WORKDIR_OPTION], spank.getenv(sp, options.WORKDIR_ENV),
                                      options.WORKDIR_OPTION)
    from spank_sif import container
    return container.prepare(config, _step_user(sp), options.parse_binds(user_binds or ""),
                             options.check_workdir(workdir or ""))


# Slurm's special step ids (slurm.h), named as squeue shows them.
BATCH_STEP = 0xFFFFFFFB
INTERACTIVE_STEP = 0xFFFFFFFA
SPECIAL_STEPS = {BATCH_STEP: "batch", INTERACTIVE_STEP: "interactive", 0xFFFFFFFC: "extern"}


def step_label(sp) -> str:
    """``<job>.<step>`` (e.g. ``42.0``, ``42.batch``): labels the step's objects on the node."""
    step_id = spank.step_id(sp)
    return f"{spank.job_id(sp)}.{SPECIAL_STEPS.get(step_id, step_id)}"


def _job_cwd(sp) -> str | None:
    # Relative key file paths are relative to where the user ran srun/sbatch (tasks start there).
    cwd = spank.getenv(sp, "PWD")
    return cwd if cwd and os.path.isabs(cwd) else None


def _job_text(sp) -> str:
    try:
        return step_label(sp)
    except SifError:
        return "?"


def node_user_init(sp, args) -> None:
    # The earliest callback whose output reaches srun's stderr (remote init_post_opt's go only to
    # slurmd's log). Once per step, not once per task.
    if step.error and not step.reported:
        spank.tell_user(step.error)
        step.reported = True


def node_task_init_privileged(sp, args) -> None:
    if step.error:
        raise _AlreadyReported()
    unlocked, config = step.unlocked, step.config
    if unlocked is None or config is None:
        return
    from spank_sif import lifecycle
    target = config.mount_point
    try:
        if step.plan is not None:
            from spank_sif import container
            container.enter(step.plan, unlocked, config)
            target = "/"
        else:
            lifecycle.mount(unlocked, target, private=True)
    except SifError as err:
        _tell_once(sp, str(err))
        raise _AlreadyReported() from err
    spank.setenv(sp, ENV_IMAGE_ROOT, target)


def _tell_once(sp, message: str) -> None:
    # Every task of the node meets the same error: one line per node, not one per task.
    if spank.task_id(sp) == 0:
        spank.tell_user(message)


def node_task_init(sp, args) -> None:
    """Container mode, in each task, as the user, inside the container: the working directory,
    then the image's environment (Slurm then looks the command up in that PATH, inside)."""
    plan = step.plan
    if plan is None:
        return
    from spank_sif import container
    try:
        where = container.workdir(plan)
        job_env = spank.job_environment(sp)
        job_env["PWD"] = where
        to_set, to_unset, warning = container.environment_changes(plan, job_env)
    except SifError as err:
        _tell_once(sp, str(err))
        raise _AlreadyReported() from err
    if warning:
        _tell_once(sp, warning)
    spank.setenv(sp, "PWD", where)
    for name, value in to_set.items():
        spank.setenv(sp, name, value)
    for name in to_unset:
        spank.unsetenv(sp, name)


def node_exit(sp, args) -> None:
    if step.plan is not None:
        step.plan.close()
    unlocked, config = step.unlocked, step.config
    if unlocked is not None and config is not None:
        from spank_sif import lifecycle
        step.unlocked = None
        lifecycle.release(unlocked, config)


def job_epilog(sp, args) -> None:
    import_node_modules()
    from spank_sif import lifecycle
    lifecycle.sweep_job(str(spank.job_id(sp)), load_site_config(args))


class _AlreadyReported(Exception):
    """Fail the callback without a further message."""


HANDLERS = {
    ("local", "init_post_opt"): submit_init_post_opt,
    ("allocator", "init_post_opt"): submit_init_post_opt,
    ("remote", "init_post_opt"): node_init_post_opt,
    ("remote", "user_init"): node_user_init,
    ("remote", "task_init_privileged"): node_task_init_privileged,
    ("remote", "task_init"): node_task_init,
    ("remote", "exit"): node_exit,
    ("job_script", "job_epilog"): job_epilog,
}


def dispatch(callback: str, sp, args: list) -> int:
    """Run the handler of ``callback`` in the current context: 0 on success, -1 to fail it."""
    handler = HANDLERS.get((spank.context(), callback))
    if handler is None:
        return 0
    try:
        handler(sp, args)
        return 0
    except _AlreadyReported:
        return -1
    except SifError as err:
        # srun/sbatch: the user's terminal is the log. Nodes: step errors are kept and told by the
        # handlers above; what gets here (exit, epilog) has no user to tell.
        if spank.context() in SUBMIT_CONTEXTS:
            spank.tell_user(str(err))
        else:
            spank.log("error", f"{callback}: {err}")
        return -1
    except Exception:
        message = _internal_error(callback)
        if spank.context() == "remote" and callback == "init_post_opt":
            step.error = step.error or message  # told in user_init, as every error of this callback
            return 0
        if spank.context() == "remote" and callback == "user_init":
            step.error, step.reported = step.error or message, True  # fail closed: no task runs
        spank.tell_user(message)
        return -1
