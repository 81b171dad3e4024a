"""cffi build script of the SPANK plugin: one shared object, ``spank_sif/_plugin.<ext>``.

It is at once the plugin Slurm dlopen()s and the extension module Python imports. Used by
``setup.py`` (``cffi_modules``); run it directly (``python csrc/build_plugin.py``) to build in place.

``cffi_modules`` skips cffi's own embedding link fix, so the link options are explicit here:
link libpython with a DT_RPATH (searched before LD_LIBRARY_PATH, unlike DT_RUNPATH), and no
limited API (the embedding code needs the full one; it would also name the file ``.abi3.so``).
Headers needed: Slurm's ``slurm/spank.h`` (Debian: libslurm-dev) and Python's (python3-dev).

The object is loaded into root daemons (every slurmstepd, the job epilog), so it is built with the
usual hardening whatever the interpreter's own flags say (``HARDENING_*``: fortified libc calls,
stack protector, a read-only GOT bound at load time), and exports only what its two loaders look up
(``exports.map``): Slurm dlsym()s the SPANK symbols, Python the module's ``PyInit__plugin``. The
``shim_*`` functions need no export: cffi's generated code calls them directly, in the same object.
"""
import hashlib
import os
import sys
import sysconfig

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
EXPORTS = os.path.join(HERE, "exports.map")
# -U first: an interpreter's CFLAGS may define another level. Fortify needs optimisation (-O2).
HARDENING_COMPILE = ["-O2", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong"]
HARDENING_LINK = ["-Wl,-z,relro", "-Wl,-z,now", "-Wl,--version-script=" + EXPORTS]

CDEF = """
typedef struct spank_handle *spank_t;

static const int S_CTX_ERROR, S_CTX_LOCAL, S_CTX_REMOTE, S_CTX_ALLOCATOR, S_CTX_SLURMD,
                 S_CTX_JOB_SCRIPT;
static const int S_JOB_ID, S_JOB_STEPID, S_TASK_ID;
static const int ESPANK_SUCCESS, ESPANK_ERROR, ESPANK_BAD_ARG, ESPANK_NOT_TASK, ESPANK_ENV_EXISTS,
                 ESPANK_ENV_NOEXIST, ESPANK_NOSPACE, ESPANK_NOT_REMOTE, ESPANK_NOEXIST,
                 ESPANK_NOT_EXECD, ESPANK_NOT_AVAIL, ESPANK_NOT_LOCAL;

extern "Python" int py_dispatch(const char *cb, spank_t sp, int ac, char **av);

void log_line(int level, const char *msg);
void log_private(const char *msg);
void user_line(const char *msg);
void shim_python_broken(void);
int shim_context(void);
const char *shim_option_value(void);
int shim_option_conflict(void);
const char *shim_option_value_of(int which);
int shim_option_conflict_of(int which);
void shim_set_container_active(int on);
const char *shim_state_dir(void);
const char *shim_python(void);
int shim_slurm_version(void);
int shim_item_u32(spank_t sp, int item, uint32_t *out);
int shim_item_uid(spank_t sp, uint32_t *out);
int shim_item_gid(spank_t sp, uint32_t *out);
int shim_item_int(spank_t sp, int item, int *out);
int shim_getenv(spank_t sp, const char *name, char *buf, int len);
int shim_setenv(spank_t sp, const char *name, const char *value, int overwrite);
int shim_unsetenv(spank_t sp, const char *name);
int shim_job_control_setenv(spank_t sp, const char *name, const char *value, int overwrite);
int shim_job_control_unsetenv(spank_t sp, const char *name);
char **shim_job_env(spank_t sp);
"""

# Frozen into the .so and run once when Python starts inside Slurm. Kept minimal: everything else
# is ordinary, tested package code. A failed import is logged through Slurm and reported to the
# shim, which fails the callback (cffi alone would print to stderr and then return 0: jobs would
# run without the image being handled).
INIT_CODE = """
from spank_sif._plugin import ffi, lib
import sys

def _log(where, exc_info):
    # Only to slurmd's log (log_private): in a task, a logged error would also reach the user.
    import traceback  # only for bugs: every job step would pay for importing it
    text = "".join(traceback.format_exception(*exc_info))
    for line in text.splitlines():
        lib.log_private(("%s: %s" % (where, line)).encode("unicode_escape"))  # printable ASCII

try:
    import spank_sif.callbacks as _callbacks   # imports everything later callbacks need, as root
    _callbacks.route_output()
except BaseException:
    # Logged through Slurm, not cffi's stderr dump; the shim then fails the callback.
    _callbacks = None
    _log("import", sys.exc_info())
    lib.shim_python_broken()

@ffi.def_extern(error=-1, onerror=lambda e, v, t: _log("callback", (e, v, t)))
def py_dispatch(cb, sp, ac, av):
    if _callbacks is None:
        return -1
    args = [ffi.string(av[i]).decode("utf-8", "replace") for i in range(ac)]
    return _callbacks.dispatch(ffi.string(cb).decode(), sp, args)
"""


def _python_executable() -> str:
    # The interpreter whose environment the plugin runs in: the venv's python (not its realpath,
    # which would lose pyvenv.cfg). Overridable at run time with a python= plugstack argument.
    return os.environ.get("SPANK_SIF_PYTHON") or sys.executable


def _c_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def make_builder() -> FFI:
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") and not os.path.exists(
            os.path.join(libdir, soname)):
        raise SystemExit(f"spank-sif needs a shared libpython ({libdir}/{soname}); on Debian "
                         f"install libpython3.{sys.version_info[1]}")
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.embedding_init_code(INIT_CODE)
    with open(os.path.join(HERE, "shim.c"), encoding="utf-8") as f:
        source = f.read()
    # The paths go into the C text, not define_macros: building for another interpreter must change
    # the generated file, or a build directory left by an earlier build hands back its plugin,
    # baked for that other environment.
    # The flags and the export list too: a build directory must never hand back an object built
    # without them.
    with open(EXPORTS, "rb") as f:
        exports = hashlib.sha256(f.read()).hexdigest()[:16]
    paths = (f"#define SHIM_LIBPYTHON {_c_string(os.path.join(libdir, soname))}\n"
             f"#define SHIM_PYTHON {_c_string(_python_executable())}\n"
             f"/* built with {' '.join(HARDENING_COMPILE + HARDENING_LINK)}; exports.map {exports} */\n")
    ffi.set_source(
        "spank_sif._plugin", paths + source,
        libraries=["python" + sysconfig.get_config_var("LDVERSION")],
        library_dirs=[libdir],
        extra_link_args=["-Wl,--disable-new-dtags", "-Wl,-rpath," + libdir, *HARDENING_LINK],
        extra_compile_args=["-Wall", "-Wno-unused-function", *HARDENING_COMPILE],
        py_limited_api=False,
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(HERE, ".."), verbose=True)
