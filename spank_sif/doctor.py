"""Is this node ready to run jobs with images? The checks behind ``spank-sif doctor``.

One function per check. Each takes what it looks at (paths, commands, versions) as parameters whose
defaults are the real ones, never raises for what it finds, and returns a ``Result``: so every
check can be pointed at a real broken thing (a file with the wrong mode, a plugstack.conf without
the line, a directory on the wrong file system) and be seen to say what is wrong and what to do.
``run_checks()`` runs them all in order, feeding later checks what earlier ones found (the
plugstack.conf line names the site configuration and the Python the plugin uses).

Checks look as root, like the plugin: they load missing kernel modules the way the first job would
(``modprobe``) and take a free loop device number (which the kernel may create), nothing else.
"""
import fcntl
import glob
import os
import pwd
import re
import shutil
import stat
import struct
import subprocess
from typing import NamedTuple

from spank_sif import dmcrypt, libcryptsetup, loop
from spank_sif.callbacks import plugstack_args
from spank_sif.installation import plugin_path, plugin_python, plugstack_line
from spank_sif.config import CONFIG_VARIABLE, DEFAULT_PATH, SiteConfig, load_config
from spank_sif.errors import ConfigError, SifError, StateError, SystemSetupError


class Result(NamedTuple):
    """What one check found. ``fix`` says what to do when not ``ok``; ``exit_code`` is what
    ``spank-sif doctor`` exits with for this failure (0: a warning, jobs still work)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    exit_code: int = 0

    @property
    def status(self) -> str:
        return "ok" if self.ok else "error" if self.exit_code else "warning"


def passed(name: str, detail: str) -> Result:
    return Result(name, True, detail)


def failed(name: str, detail: str, fix: str, exit_code: int = SystemSetupError.exit_code) -> Result:
    return Result(name, False, detail, fix, exit_code)


def warned(name: str, detail: str, fix: str) -> Result:
    return Result(name, False, detail, fix, 0)


def as_warning(result: Result, why: str) -> Result:
    """A failure that jobs can live with, for a reason only another check knows."""
    return result if result.ok else result._replace(detail=f"{result.detail} ({why})", exit_code=0)


def exit_status(results) -> int:
    """0 if nothing a job needs is broken, else the exit code of the first failure."""
    return next((r.exit_code for r in results if not r.ok and r.exit_code), 0)


def _verdict(name: str, ok_detail: str, errors: list, warnings: list, exit_code: int) -> Result:
    """One result from lists of (detail, fix) problems: any error fails it, warnings alone warn."""
    problems = errors + warnings
    if not problems:
        return passed(name, ok_detail)
    detail = "; ".join(d for d, _ in problems)
    fix = "; ".join(dict.fromkeys(f for _, f in problems))
    return failed(name, detail, fix, exit_code) if errors else warned(name, detail, fix)


# ---------------------------------------------------------------- kernel


KERNEL_MODULES = ("loop", "squashfs", "dm_mod", "dm_crypt")
# A driver in the running kernel shows in /sys/module (loaded modules, and built-ins with
# parameters), in the kernel's list of built-ins, or in the table it registers in.
_REGISTERED_IN = {"loop": ("misc", "loop-control"), "squashfs": ("filesystems", "squashfs"),
                  "dm_mod": ("misc", "device-mapper")}
_KCONFIG = {"loop": "CONFIG_BLK_DEV_LOOP", "squashfs": "CONFIG_SQUASHFS",
            "dm_mod": "CONFIG_BLK_DEV_DM", "dm_crypt": "CONFIG_DM_CRYPT"}


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _last_words(path: str) -> set[str]:
    """The last word of each line: names in /proc/misc and /proc/filesystems."""
    return {line.split()[-1] for line in _read_lines(path) if line.split()}


def _builtin_modules(modules_dir: str) -> set[str]:
    names = (os.path.basename(line)[:-3] for line in _read_lines(os.path.join(modules_dir, "modules.builtin")))
    return {name.replace("-", "_") for name in names}


def _module_present(name: str, proc: str, sys_module: str, builtin: set[str]) -> bool:
    table = _REGISTERED_IN.get(name)
    return (os.path.isdir(os.path.join(sys_module, name)) or name in builtin
            or (table is not None and table[1] in _last_words(os.path.join(proc, table[0]))))


def check_kernel(modules=KERNEL_MODULES, proc="/proc", sys_module="/sys/module",
                 modules_dir: str | None = None, load=True) -> Result:
    """The kernel has each driver a job needs, built in or as a module (loaded here if missing,
    as the plugin and the kernel would on first use)."""
    release = os.uname().release
    modules_dir = modules_dir or f"/lib/modules/{release}"
    modprobe = next((path for path in dmcrypt.MODPROBE if os.path.exists(path)), None)
    builtin = _builtin_modules(modules_dir)
    missing, loaded, why = [], [], ""
    for name in modules:
        if _module_present(name, proc, sys_module, builtin):
            continue
        if load and modprobe:
            out = subprocess.run([modprobe, name], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}, check=False)
            if _module_present(name, proc, sys_module, builtin):
                loaded.append(name)
                continue
            why = why or " ".join(out.stderr.strip().splitlines()[-1:])
        missing.append(name)
    if missing:
        options = ", ".join(_KCONFIG.get(m, m) for m in missing)
        return failed("kernel", f"kernel {release} lacks {', '.join(missing)}" + (f" ({why})" if why else ""),
                      f"install this kernel's modules, or boot a kernel built with {options}")
    now = f" (loaded now: {', '.join(loaded)})" if loaded else ""
    return passed("kernel", f"kernel {release} has {', '.join(modules)}{now}")


# ---------------------------------------------------------------- device-mapper and loop devices


# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags, event_nr,
# padding, dev, name[128], uuid[129], data[7] (linux/dm-ioctl.h).
_DM_IOCTL = struct.Struct("=3I3Ii3IQ128s129s7s")
DM_VERSION = (3 << 30) | (_DM_IOCTL.size << 16) | (0xFD << 8) | 0  # _IOWR(0xfd, DM_VERSION_CMD, ...)
MISC_MAJOR = 10


def _misc_minor(proc_misc: str, driver: str) -> int | None:
    for line in _read_lines(proc_misc):
        words = line.split()
        if len(words) == 2 and words[1] == driver and words[0].isdigit():
            return int(words[0])
    return None


def _dm_version(control: str) -> str:
    """The device-mapper driver's interface version, asked through ``control`` (DM_VERSION)."""
    fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = _DM_IOCTL.size
        buf = bytearray(_DM_IOCTL.pack(4, 0, 0, size, size, 0, 0, 0, 0, 0, 0, b"", b"", b""))
        fcntl.ioctl(fd, DM_VERSION, buf, True)
        return ".".join(str(v) for v in _DM_IOCTL.unpack(buf)[:3])
    finally:
        os.close(fd)


def check_device_mapper(control: str = dmcrypt.DM_CONTROL, proc_misc: str = "/proc/misc") -> Result:
    """``control`` is device-mapper's node and the driver answers through it. The node can exist
    without a driver behind it, so the kernel is asked: /proc/misc, then the DM_VERSION ioctl."""
    name = "device-mapper"
    minor = _misc_minor(proc_misc, "device-mapper")
    if minor is None:
        dead = f"; {control} exists but nothing answers behind it" if os.path.exists(control) else ""
        return failed(name, f"no device-mapper driver in this kernel (not registered in {proc_misc}){dead}",
                      "load it (modprobe dm_mod; the 'kernel' line says whether this kernel has it)")
    try:
        st = os.stat(control)
    except OSError as exc:
        return failed(name, f"{control}: {exc.strerror}", "create it: dmsetup mknodes")
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(MISC_MAJOR, minor):
        return failed(name, f"{control} is not device-mapper's character device {MISC_MAJOR}:{minor}",
                      f"recreate it: rm {control} && dmsetup mknodes")
    try:
        version = _dm_version(control)
    except OSError as exc:
        return failed(name, f"{control} does not answer: {exc.strerror}",
                      "reload device-mapper (modprobe dm_mod) or check the kernel log (dmesg)")
    return passed(name, f"{control} answers (device-mapper interface {version})")


def check_loop_devices(control: str = loop.LOOP_CONTROL) -> Result:
    """The loop driver hands out a free device (LOOP_CTL_GET_FREE, as every image needs one)."""
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return failed("loop", f"cannot open {control}: {exc.strerror}",
                      "load the loop driver (modprobe loop)")
    try:
        number = fcntl.ioctl(fd, loop.LOOP_CTL_GET_FREE)
    except OSError as exc:
        return failed("loop", f"{control} gives no free loop device: {exc.strerror}",
                      "detach unused loop devices (losetup -l), or allow more (loop.max_loop=N on the "
                      "kernel command line, or max_loop=N for the loop module)")
    finally:
        os.close(fd)
    return passed("loop", f"free loop device: /dev/loop{number}")


# ---------------------------------------------------------------- cryptsetup


def _mapped_file(prefix: str) -> str:
    """The file this process mapped whose name starts with ``prefix`` (a library's real file name
    carries its version), or ""."""
    for line in _read_lines("/proc/self/maps"):
        fields = line.split(None, 5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith(prefix):
            return os.path.realpath(fields[5])
    return ""


def check_libcryptsetup(library: str = libcryptsetup.LIBRARY) -> Result:
    """libcryptsetup loads and has every function the plugin calls (it has no other way to open an
    encrypted image)."""
    try:
        _, lib = libcryptsetup.open_library(library)
    except (OSError, ImportError) as exc:
        return failed("libcryptsetup", f"cannot load {library}: {exc}",
                      "install libcryptsetup (Debian: libcryptsetup12)")
    missing = []
    for function in dir(lib):
        try:
            getattr(lib, function)
        except AttributeError:
            missing.append(function)
    if missing:
        return failed("libcryptsetup", f"{library} lacks {', '.join(missing)}",
                      "install cryptsetup 2.x's library (Debian: libcryptsetup12)")
    loaded = _mapped_file(os.path.basename(library).split(".so")[0] + ".so") or library
    return passed("libcryptsetup", f"{os.path.basename(loaded)} loads, with every function spank-sif "
                                   f"calls ({loaded})")


CRYPTSETUP_PROGRAMS = ("/usr/sbin/cryptsetup", "/sbin/cryptsetup")


def check_cryptsetup_program(paths=CRYPTSETUP_PROGRAMS) -> Result:
    """The cryptsetup program admins use on the node (spank-sif itself calls the library): present,
    root's alone, and its version."""
    found = next(((p, st) for p in paths if (st := _stat(p)) is not None), None)
    if found is None:
        return failed("cryptsetup", f"no cryptsetup program at {', '.join(paths)}",
                      "install it (Debian: cryptsetup-bin)")
    path, st = found
    if st.st_uid != 0 or st.st_mode & 0o022:
        return failed("cryptsetup", f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: "
                                    "others can change what root runs to handle keys",
                      f"chown root {path} && chmod go-w {path} (and check who changed it)")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, env={"LC_ALL": "C"}, check=False)
        version = " ".join(out.stdout.split()[:2]) or f"exit status {out.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return failed("cryptsetup", f"{path} does not run: {exc}", "reinstall it (Debian: cryptsetup-bin)")
    if out.returncode != 0:
        return failed("cryptsetup", f"{path} --version failed: {out.stderr.strip() or version}",
                      "reinstall it (Debian: cryptsetup-bin)")
    return passed("cryptsetup", f"{path}: {version}, owned by root, writable by root only")


def _stat(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None


# ---------------------------------------------------------------- Slurm: plugin and plugstack.conf


SLURM_VERSION_COMMANDS = (("slurmd", "-V"), ("srun", "--version"))  # slurmd needs no slurm.conf for -V


def _slurm_version(commands) -> tuple[tuple[int, ...] | None, str]:
    """(major, minor, micro) of the installed Slurm and the command that said so, or (None, why)."""
    search = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"
    tried = []
    for argv in commands:
        exe = shutil.which(argv[0], path=search)
        if not exe:
            tried.append(f"no {argv[0]}")
            continue
        try:
            out = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=15,
                                 stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{' '.join(argv)}: {exc}")
            continue
        match = re.search(r"\b(\d+)\.(\d+)\.(\d+)", out.stdout)
        if out.returncode == 0 and match:
            return tuple(int(x) for x in match.groups()), " ".join(argv)
        tried.append(f"{' '.join(argv)}: exit status {out.returncode}")
    return None, "; ".join(tried)


def _plugin_build_version() -> int:
    import spank_sif._plugin as compiled  # built by pip install
    return int(compiled.lib.shim_slurm_version())


def check_plugin(plugin_version: int | None = None, commands=SLURM_VERSION_COMMANDS) -> Result:
    """The plugin was built for the installed Slurm's major.minor (``plugin_version``: its
    compiled-in SLURM_VERSION_NUMBER); Slurm refuses a plugin built for another."""
    rebuild = ("reinstall spank-sif with its environment's pip against this Slurm's headers "
               "(Debian: libslurm-dev), then restart slurmd")
    if plugin_version is None:
        try:
            plugin_path()
            plugin_version = _plugin_build_version()
        except (SifError, ImportError, OSError) as exc:
            return failed("plugin", f"the SPANK plugin cannot be loaded: {exc}", rebuild)
    built = (plugin_version >> 16 & 0xFF, plugin_version >> 8 & 0xFF)
    installed, source = _slurm_version(commands)
    if installed is None:
        return failed("plugin", f"cannot tell which Slurm this node runs ({source})",
                      "install Slurm here, or run doctor where slurmd -V or srun --version works")
    have = f"{installed[0]}.{installed[1]:02d}.{installed[2]}"
    if installed[:2] != built:
        return failed("plugin", f"built for Slurm {built[0]}.{built[1]:02d}, but this node has Slurm {have} "
                                f"({source}): Slurm will not load it", rebuild)
    return passed("plugin", f"built for Slurm {built[0]}.{built[1]:02d}; this node has {have} ({source})")


class PlugstackLine(NamedTuple):
    file: str
    number: int
    kind: str       # required, optional (anything else: Slurm ignores the line)
    path: str
    args: tuple


def _slurm_conf_values(path: str, depth: int = 0) -> list[tuple[str, str]]:
    """``(key, value)`` settings of slurm.conf, following its ``include`` lines. OSError if unreadable."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    values = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        words = line.split(None, 1)
        if len(words) == 2 and words[0].lower() == "include" and depth < 8:
            target = words[1].strip()
            values += _slurm_conf_values(os.path.join(os.path.dirname(path), target), depth + 1)
        elif "=" in line:
            key, _, value = line.partition("=")
            values.append((key.strip().lower(), value.strip().strip('"')))
    return values


def plugstack_file(slurm_conf: str) -> str:
    """The plugstack.conf Slurm reads: slurm.conf's PlugStackConfig, else the one next to slurm.conf."""
    found = [value for key, value in _slurm_conf_values(slurm_conf) if key == "plugstackconfig"]
    return found[-1] if found else os.path.join(os.path.dirname(slurm_conf), "plugstack.conf")


def plugstack_lines(path: str, depth: int = 0) -> list[PlugstackLine]:
    """Plugin lines of ``path`` and of the files it includes, as Slurm reads them: ``#`` starts a
    comment, ``include`` globs are relative to the including file, a missing file is empty."""
    lines = []
    for number, raw in enumerate(_read_lines(path), 1):
        words = raw.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        if words[0] == "include":
            if depth < 8:
                pattern = os.path.join(os.path.dirname(path), words[1])  # an absolute pattern stays
                for included in sorted(glob.glob(pattern)):
                    lines += plugstack_lines(included, depth + 1)
        else:
            lines.append(PlugstackLine(path, number, words[0], words[1], tuple(words[2:])))
    return lines


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.isabs(a) and os.path.samefile(a, b)
    except OSError:
        return False


def installed_line(slurm_conf: str, plugin: str) -> PlugstackLine | None:
    """The plugstack.conf line that loads ``plugin``, if any (None also if slurm.conf is unreadable)."""
    try:
        lines = plugstack_lines(plugstack_file(slurm_conf))
    except OSError:
        return None
    return next((line for line in lines if _same_file(line.path, plugin)), None)


def _suggested_line() -> str:
    try:
        return plugstack_line()
    except SifError:
        return "the line 'spank-sif plugstack-line' prints"


def check_plugstack(slurm_conf: str, plugin: str) -> Result:
    """The plugstack.conf Slurm uses (with its includes) loads ``plugin``, ``required``, with
    arguments the plugin accepts."""
    try:
        stack = plugstack_file(slurm_conf)
        lines = plugstack_lines(stack)
    except OSError as exc:
        return failed("plugstack", f"cannot read {slurm_conf}: {exc.strerror}",
                      "run doctor with SLURM_CONF set to the slurm.conf this node's Slurm uses")
    line = next((line for line in lines if _same_file(line.path, plugin)), None)
    if line is None:
        others = [ln for ln in lines if "spank_sif" in ln.path or os.path.basename(ln.path).startswith("_plugin.")]
        where = stack if os.path.exists(stack) else f"{stack} (missing)"
        other = (f"; it loads another spank-sif: {others[0].path} ({others[0].file}:{others[0].number})"
                 if others else "")
        return failed("plugstack", f"{where} does not load {plugin}{other}",
                      f"add '{_suggested_line()}' to {stack} or a file it includes, then restart slurmd")
    at = f"{line.file}:{line.number}"
    if line.kind != "required":
        return failed("plugstack", f"{at} loads the plugin '{line.kind}': jobs could run without their image "
                                   "if it fails to load", f"make it 'required' in {at}")
    try:
        plugstack_args(list(line.args))
    except ConfigError as err:
        return failed("plugstack", f"{at}: {err}", f"fix the arguments in {at}", ConfigError.exit_code)
    return passed("plugstack", f"{at}: {' '.join(['required', line.path, *line.args])}")


# ---------------------------------------------------------------- site configuration, state, mount point


def check_site_config(path: str | None, plugin_state_dir: str = "") -> Result:
    """The site configuration loads as the plugin loads it, and names the state directory the
    plugstack line gives the plugin (``plugin_state_dir``; the plugin refuses jobs otherwise)."""
    plugin_state_dir = plugin_state_dir or SiteConfig().state_dir
    try:
        config = load_config(path)
    except ConfigError as err:
        return failed("config", str(err), "fix the file (the admin guide lists every setting)",
                      ConfigError.exit_code)
    if os.path.normpath(config.state_dir) != os.path.normpath(plugin_state_dir):
        return failed("config", f"{config.source}: state_dir is {config.state_dir}, but the plugstack.conf "
                                f"line gives the plugin {plugin_state_dir}: it refuses every job",
                      f"put state_dir={config.state_dir} on the plugstack.conf line "
                      f"(spank-sif plugstack-line --state-dir {config.state_dir})", ConfigError.exit_code)
    found = (f"{config.source} is valid" if config.source != SiteConfig().source
             else f"no {DEFAULT_PATH}: all defaults")
    return passed("config", f"{found} (mount_point {config.mount_point}, state_dir {config.state_dir})")


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the file system that holds ``path`` (or would hold it, if it does not exist)."""
    real = os.path.realpath(_nearest_existing(path))
    best, kind = "", "unknown"
    for line in _read_lines(mountinfo):
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        target = _unescape(fields[4])
        inside = real == target or real.startswith(target.rstrip("/") + "/")
        if inside and len(target) >= len(best):  # the last of equal mount points is on top
            best, kind = target, fields[fields.index("-", 6) + 1]
    return kind


def check_state_dir(path: str, mountinfo: str = "/proc/self/mountinfo") -> Result:
    """The state directory exists or can be created, is root's alone, and is on a tmpfs (records
    must not outlive a reboot, after which the devices they name are gone)."""
    errors, warnings, code = [], [], StateError.exit_code
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:
        return failed("state-dir", f"{path}: {exc.strerror}", "fix state_dir in the site configuration", code)
    if st is None:
        parent = _nearest_existing(path)
        if not os.path.isdir(parent):
            errors.append((f"{path} cannot be created: {parent} is not a directory",
                           "point state_dir at a directory under /run"))
        elif not os.access(parent, os.W_OK):
            errors.append((f"{path} cannot be created: {parent} is not writable",
                           "point state_dir at a directory under /run"))
        found = f"{path} is missing; the plugin creates it (root, 0700) on first use"
    elif stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        errors.append((f"{path} is {'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'not a directory'}",
                       f"remove {path} (the plugin creates the directory) or change state_dir"))
    elif st.st_uid != 0:
        errors.append((f"{path} is owned by uid {st.st_uid}, not root", f"chown root: {path} && chmod 0700 {path}"))
    elif st.st_mode & 0o077:
        warnings.append((f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: other users can look in",
                         f"chmod 0700 {path} (the plugin also tightens it on first use)"))
    if st is not None:
        found = f"{path} is a root-only directory"
    fstype = filesystem_type(path, mountinfo)
    if fstype != "tmpfs":
        warnings.append((f"{path} is on {fstype}, not tmpfs: records would outlive a reboot",
                         ("set state_dir to a directory on a tmpfs (/run is one on most systems), "
                          "or mount a tmpfs there")))
    return _verdict("state-dir", f"{found}, on tmpfs", errors, warnings, code)


def check_mount_point(path: str) -> Result:
    """The site mount point can be used: no symbolic link on the way (the plugin refuses to follow
    one), directories that every job user can pass, and a root-owned directory or one the plugin
    can create."""
    name = "mount-point"
    current = "/"
    parts = [p for p in os.path.normpath(path).split("/") if p]
    for i, part in enumerate(parts):
        here = os.path.join(current, part)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            if not os.access(current, os.W_OK):
                return failed(name, f"{path} cannot be created: {current} is not writable",
                              "create it (a root-owned directory) or choose another mount_point")
            missing = path if here == path else f"{path}: {here}"
            return passed(name, f"{missing} is missing; the plugin creates it (root, 0755) on first use")
        except OSError as exc:
            return failed(name, f"{here}: {exc.strerror}", "choose another mount_point")
        if stat.S_ISLNK(st.st_mode):
            return failed(name, f"{here} is a symbolic link: the plugin does not mount through one",
                          f"set mount_point to a path without symbolic links (e.g. {os.path.realpath(path)})")
        if not stat.S_ISDIR(st.st_mode):
            return failed(name, f"{here} is not a directory", "choose another mount_point")
        last = i == len(parts) - 1
        if not last and not st.st_mode & stat.S_IXOTH:
            return failed(name, f"{here} (mode {stat.S_IMODE(st.st_mode):04o}) is closed to other users: "
                                "jobs could not reach the image", f"chmod o+x {here}")
        if last and st.st_uid != 0:
            return failed(name, f"{path} is owned by uid {st.st_uid}, not root", f"chown root: {path}")
        current = here
    return passed(name, f"{path} is a root-owned directory")


# ---------------------------------------------------------------- Python, as the job's user sees it


def _closed_to_others(path: str, need: int) -> str | None:
    """Why a user with no owner or group rights cannot reach ``path`` with the ``need`` bits
    (stat.S_IROTH, stat.S_IXOTH), following symbolic links as the kernel does; None if they can."""
    pending = [p for p in path.split("/") if p]
    current, hops = "/", 0
    while pending:
        part = pending.pop(0)
        if part in (".", ""):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        here = os.path.join(current, part)
        try:
            st = os.lstat(here)
        except OSError as exc:
            return f"{here}: {exc.strerror}"
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                return f"{path}: too many symbolic links"
            target = os.readlink(here)
            current = "/" if target.startswith("/") else current
            pending = [p for p in target.split("/") if p] + pending
            continue
        mode = stat.S_IMODE(st.st_mode)
        if pending and not mode & stat.S_IXOTH:
            return f"{here} (mode {mode:04o}) is closed to other users"
        if not pending and mode & need != need:
            what = "readable" if need & stat.S_IROTH else "executable"
            return f"{here} (mode {mode:04o}) is not {what} by other users"
        current = here
    return None


# What the plugin does as the job's user: start this Python, import its callbacks, and (in srun)
# load the plugin, which brings libpython with it.
_USER_IMPORT = "import spank_sif.callbacks, spank_sif._plugin"


def check_python(python: str, libpython: str, plugin: str, user: str = "nobody") -> Result:
    """The plugin's Python, libpython and the plugin itself are usable by an ordinary user: the
    plugin runs as the job's user in srun and in task callbacks. Mode bits first (they say which
    directory to open up), then, as root, the real thing: ``user`` starts that Python and imports
    the package."""
    fix = ("make the plugin's Python environment readable by every user, where every user can reach "
           "it: chmod -R a+rX <venv> (not under /root)")
    if not os.path.isfile(python):
        return failed("python", f"the plugin's Python {python} does not exist",
                      "point python= on the plugstack.conf line at the environment's bin/python3 "
                      "(spank-sif plugstack-line prints the line)")
    for path, need in ((python, stat.S_IXOTH), (libpython, stat.S_IROTH), (plugin, stat.S_IROTH)):
        why = _closed_to_others(path, need)
        if why:
            return failed("python", f"{why}: job users cannot start the plugin's Python", fix)
    checked = f"{python} ({os.path.realpath(python)}), {libpython}"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        entry = None
    if os.geteuid() != 0 or entry is None:
        return passed("python", f"{checked}: open to other users (mode bits)")
    try:
        out = subprocess.run([python, "-I", "-c", _USER_IMPORT], user=entry.pw_uid, group=entry.pw_gid,
                             extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
                             capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
        error = out.stderr.strip().splitlines()[-1] if out.returncode else ""
        if out.returncode and not error:
            error = f"exit status {out.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = str(exc)
    if error:
        return failed("python", f"as {user}, {python} cannot import spank-sif: {error}", fix)
    return passed("python", f"{checked}: {user} starts it and imports spank-sif")


# ---------------------------------------------------------------- all of them


def _loaded_libpython() -> str:
    """The libpython the plugin links (loading the plugin maps it into this process)."""
    _plugin_build_version()
    return _mapped_file("libpython")


def run_checks(config: str | None = None, slurm_conf: str | None = None, environ=None) -> list[Result]:
    """Every check, in the order ``spank-sif doctor`` prints them. ``config``: the site
    configuration (default: $SPANK_SIF_CONFIG, else the plugstack line's config=, else the default
    path); ``slurm_conf``: default $SLURM_CONF, else /etc/slurm/slurm.conf."""
    environ = os.environ if environ is None else environ
    slurm_conf = slurm_conf or environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    results = [check_kernel(), check_device_mapper(), check_loop_devices()]

    results += [check_libcryptsetup(),
                as_warning(check_cryptsetup_program(), "jobs do not need it: spank-sif calls the library")]

    plugin_check = check_plugin()
    results.append(plugin_check)
    try:
        plugin, baked_python = plugin_path(), plugin_python()
    except (SifError, ImportError, OSError) as exc:  # the plugin check says why
        plugin = baked_python = ""
        reason = f"the plugin is not usable ({exc})"
    args = {}
    if plugin:
        results.append(check_plugstack(slurm_conf, plugin))
        line = installed_line(slurm_conf, plugin)
        args = dict(a.split("=", 1) for a in line.args if "=" in a) if line else {}
    else:
        results.append(failed("plugstack", f"not checked: {reason}", "see the 'plugin' line"))

    config = config or environ.get(CONFIG_VARIABLE) or args.get("config")
    results.append(check_site_config(config, args.get("state_dir", "")))
    try:
        site = load_config(config)
    except ConfigError:
        site = None
    if site is None:
        skipped = "not checked: the site configuration is invalid"
        results += [warned("state-dir", skipped, "see the 'config' line"),
                    warned("mount-point", skipped, "see the 'config' line")]
    else:
        results += [check_state_dir(site.state_dir), check_mount_point(site.mount_point)]

    if plugin:
        python = args.get("python", baked_python)
        results.append(check_python(python, _loaded_libpython(), plugin))
    else:
        results.append(failed("python", f"not checked: {reason}", "see the 'plugin' line"))
    return results
