"""Container mode (``--sif-container``): each task runs with the image as its root file system.

Slurm 22.05 has no way for a plugin to change a task's command line, so the task itself enters the
container, from the SPANK callbacks, at the points where Slurm's task child has the right powers
(src/slurmd/slurmstepd/mgr.c and task.c):

  per step, root, before any task forks (init_post_opt)  ``prepare``: the bind sources opened (as
      the user where they are the user's), the user's host identity looked up; errors here stop the
      step before any task runs.
  per task, root (task_init_privileged)  ``enter``: a mount namespace of its own, the image and the
      binds, the generated /etc/passwd and /etc/group, ``pivot_root``, ``no_new_privs``. This is
      the last callback with root: Slurm then drops to the user and changes into the job's working
      directory, *inside* the new root.
  per task, as the user, inside (task_init)  ``start``: the working directory, then the image's
      environment. Slurm then runs the TaskProlog, looks argv[0] up in the (new) PATH, in the new
      root, and execs it: a command that only the image has is found.

Everything the container is made of lives in the task's mount namespace and dies with the task.
"""
import os

from spank_sif import binds, environment, identity, lifecycle, log, mounts, rootfs
from spank_sif.config import SiteConfig
from spank_sif.errors import UsageError
from spank_sif.options import WORKDIR, BindSpec
from spank_sif.userfiles import User



class Plan:
    """What every task of a step needs to build its container (made once per step)."""

    __slots__ = ("binds", "identity", "workdir", "host_only", "timeout", "submit_dir", "proc_fd")

    def __init__(self, bind_list: list, who: identity.Identity, workdir: str, host_only: tuple,
                 timeout: float):
        self.binds, self.identity, self.workdir = bind_list, who, workdir
        self.host_only, self.timeout = host_only, timeout
        self.submit_dir: str | None = None  # per task: the directory Slurm started the task in
        self.proc_fd: int | None = None     # per task: the host's /proc, for reading the environment

    def close(self) -> None:
        binds.close(self.binds)
        self.binds = []


def prepare(config: SiteConfig, user: User, user_binds: list[BindSpec], workdir: str) -> Plan:
    """Per step, as root on the host: open the bind sources and look the user up."""
    who = identity.Identity.of(user.uid, user.gid, user.groups)
    opened = binds.open_binds(config.container_binds, user_binds, user, who.home,
                              config.allowed_bind_paths)
    log.verbose(f"container: {len(opened)} binds ready for {user.name}")
    return Plan(opened, who, workdir, tuple(config.host_only_variables), config.container_env_timeout)


# ---------------------------------------------------------------- per task, root


def enter(plan: Plan, unlocked, config: SiteConfig) -> None:
    """Build the container in this task's own mount namespace and make it the task's root."""
    old_umask = os.umask(0o022)
    try:
        _build_and_enter(plan, unlocked, config)
    finally:
        os.umask(old_umask)
        plan.close()  # the task's copies of the step's descriptors: the program never sees them


def _build_and_enter(plan: Plan, unlocked, config: SiteConfig) -> None:
    mounts.enter_private_namespace()
    builder = rootfs.RootBuilder(config.mount_point)
    try:
        builder.prepare()
        lifecycle.mount(unlocked, builder.root, private=False, create=True)
        builder.image_mounted()
        files = _identity_files(builder, plan.identity)  # from the image alone, before any bind
        plan.submit_dir = _submit_dir()
        same_place: list[str] = []  # sources bound at their own path, so far
        for bind in plan.binds:
            _bind(builder, bind, plan, same_place)
        for target, data in files:
            fd = builder.add_file(os.path.basename(target), data)
            try:
                builder.bind(fd, target, target, readonly=True)
            except UsageError as err:  # e.g. the image's /etc/passwd is a symbolic link
                log.verbose(f"container: {target} not generated: {err}")
            finally:
                os.close(fd)
        plan.proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        builder.enter()
    finally:
        builder.close()
    rootfs.set_no_new_privs()


def _identity_files(builder: rootfs.RootBuilder, who: identity.Identity) -> list[tuple[str, bytes]]:
    return [("/etc/passwd", identity.passwd(builder.read_image_file("/etc/passwd", identity.MAX_FILE), who)),
            ("/etc/group", identity.group(builder.read_image_file("/etc/group", identity.MAX_FILE), who))]


def _bind(builder: rootfs.RootBuilder, bind: binds.Bind, plan: Plan, same_place: list[str]) -> None:
    if bind.source == WORKDIR:
        if plan.submit_dir is None or _covered(plan.submit_dir, same_place):
            return
        source, target = plan.submit_dir, plan.submit_dir
        fd: int | None = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        source, target, fd = bind.source, bind.target, binds.open_in_task(bind)
    if fd is None:
        return
    try:
        builder.bind(fd, source, target, bind.readonly, bind.users)
    except UsageError as err:
        if bind.required:
            raise
        log.verbose(f"container: site bind {source} skipped: {err}")
        return
    finally:
        os.close(fd)
    if source == target:
        same_place.append(source)


def _submit_dir() -> str | None:
    """The directory Slurm started this task in (the job's working directory, entered as the user),
    unless it is / (a job container plugin may have moved the task there)."""
    try:
        path = os.getcwd()
    except OSError:
        return None
    return None if path == "/" else path


def _covered(path: str, same_place: list[str]) -> bool:
    """Whether ``path`` already shows at its own place through an earlier bind (the home, or /tmp,
    usually holds the submit directory)."""
    return any(os.path.commonpath([path, p]) == p for p in same_place)


# ---------------------------------------------------------------- per task, the user, inside


def workdir(plan: Plan) -> str:
    """Change to the task's working directory inside the container and return it: --sif-workdir,
    else the submit directory if Slurm could enter it inside, else the home, else /."""
    if plan.workdir:
        try:
            os.chdir(plan.workdir)
        except OSError as exc:
            raise UsageError(f"--sif-workdir={plan.workdir}: {exc.strerror} in the container") from exc
        return plan.workdir
    # Slurm 22.05 enters the job's directory after pivot_root, and /tmp if it cannot: that is how a
    # submit directory missing inside the container shows.
    here = _getcwd()
    if here is not None and (here != "/tmp" or plan.submit_dir == "/tmp"):
        return here
    for candidate in (plan.identity.home, "/"):
        try:
            os.chdir(candidate)
            return candidate
        except OSError:
            continue
    raise UsageError("the container has neither your home directory nor /: cannot start the task")


def _getcwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


def environment_changes(plan: Plan, job_env: dict[str, str]) -> tuple[dict[str, str], list[str], str | None]:
    """What the task's environment becomes (to set, to unset) and a warning for the user, if any."""
    evaluated = {"PATH": environment.DEFAULT_PATH}
    warning = None
    try:
        if environment.has_scripts() and plan.proc_fd is not None:
            try:
                evaluated = environment.evaluate(environment.shell_input(job_env, plan.host_only),
                                                 plan.timeout, plan.proc_fd)
            except environment.NoShellError as err:
                warning = (f"{err}: the image's environment scripts ({environment.ENV_DIR}) cannot run; "
                           f"the tasks run with the job's environment and PATH={environment.DEFAULT_PATH}")
    finally:
        if plan.proc_fd is not None:
            os.close(plan.proc_fd)
            plan.proc_fd = None
    to_set, to_unset = environment.changes(job_env, evaluated, plan.host_only)
    return to_set, to_unset, warning
