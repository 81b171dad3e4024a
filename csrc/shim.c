/*
 * spank-sif: the C side of the SPANK plugin.
 *
 * This file is pasted into the cffi-generated module `spank_sif._plugin` (see build_plugin.py), so
 * one shared object is both the plugin Slurm loads and the extension module Python imports. It does
 * as little as possible:
 *   - exports the SPANK symbols and registers the options (--sif-image, --sif-container,
 *     --sif-binds, --sif-workdir; in C, so --help and option parsing never start Python);
 *   - decides in C whether anything has to happen: a step without an image, slurmd, the extern step
 *     and the epilog of a job that left no state never start Python (zero cost when unused);
 *   - starts an isolated interpreter bound to the plugin's own virtual environment, and forwards the
 *     callback to spank_sif.callbacks.dispatch() through one extern "Python" function;
 *   - gives Python typed wrappers around the variadic/host-only SPANK API.
 * Each choice is explained where it is made, below; what it means for a site is in docs/admin-guide.md.
 * Python.h (and with it _GNU_SOURCE, needed by dladdr) is included first by cffi's generated code.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>
#include <slurm/spank.h>

/* Weak: the host (srun, sbatch, slurmstepd) provides these from libslurmfull; a plain Python that
 * imports the module for unit tests has none of them, and every wrapper then says ESPANK_NOT_AVAIL. */
#pragma weak spank_context
#pragma weak spank_remote
#pragma weak spank_get_item
#pragma weak spank_getenv
#pragma weak spank_setenv
#pragma weak spank_unsetenv
#pragma weak spank_job_control_setenv
#pragma weak spank_job_control_unsetenv
#pragma weak spank_option_register
#pragma weak slurm_error
#pragma weak slurm_info
#pragma weak slurm_verbose
#pragma weak slurm_debug
#pragma weak slurm_spank_log

/* The name is part of the option's environment names (_SLURM_SPANK_OPTION_sif_sif_image). Slurm's
 * loader refuses the plugin when SLURM_VERSION_NUMBER's major.minor differs from its own. */
SPANK_PLUGIN(sif, 1);

#ifndef SHIM_PYTHON
#error "SHIM_PYTHON (the virtual environment's python executable) must be defined by the build"
#endif
#ifndef SHIM_LIBPYTHON
#error "SHIM_LIBPYTHON (the libpython the module was linked against) must be defined by the build"
#endif

#define SHIM_DEFAULT_STATE_DIR "/run/spank-sif"
#define SHIM_IMAGE_ENV "SLURM_SIF_IMAGE"
#define SHIM_CONTAINER_ENV "SLURM_SIF_CONTAINER"
#define SHIM_ROOT_ENV "SIF_IMAGE_ROOT"
#define SHIM_EXTERN_STEP 0xfffffffcU /* SLURM_EXTERN_CONT in slurm.h */

static int py_dispatch(const char *cb, spank_t sp, int ac, char **av); /* extern "Python" (cdef) */
int shim_context(void);

/* ---------------------------------------------------------------- logging ---------------------- */

/* Text is never used as a format string. Levels: 0 error, 1 info, 2 verbose, 3 debug. */
void log_line(int level, const char *msg)
{
    if (level <= 0 && slurm_error)
        slurm_error("sif-image: %s", msg);
    else if (level == 1 && slurm_info)
        slurm_info("sif-image: %s", msg);
    else if (level == 2 && slurm_verbose)
        slurm_verbose("sif-image: %s", msg);
    else if (level >= 3 && slurm_debug)
        slurm_debug("sif-image: %s", msg);
    else if (!spank_context)
        fprintf(stderr, "sif-image: %s\n", msg); /* plain Python (tests): nowhere else to go */
}

/* A line for the admin alone, never for a user's eyes: a bug's traceback, stray output of the
 * plugin's Python. Once a step's I/O is set up, slurmstepd (and every task it forks) has the job's
 * stderr as fd 2 and copies its log lines there: errors always, more with srun --slurmd-debug. So
 * fd 2 points to /dev/null while the line is logged, and it reaches slurmd's log file only. If that
 * cannot be arranged the line is dropped. srun, sbatch and salloc log to the user's terminal and
 * nowhere else: there the line goes to the system log. */
void log_private(const char *msg)
{
    int ctx = shim_context(), saved, null;
    if (ctx == S_CTX_LOCAL || ctx == S_CTX_ALLOCATOR) {
        syslog(LOG_USER | LOG_ERR, "spank-sif: %s", msg);
        return;
    }
    if (!slurm_error) {
        fprintf(stderr, "sif-image: %s\n", msg); /* plain Python (tests): nowhere else to go */
        return;
    }
    fflush(stderr);
    saved = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
    if (saved < 0) {
        if (errno == EBADF) /* no fd 2 at all: nothing of the user's to protect */
            slurm_error("sif-image: %s", msg);
        return;
    }
    null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (null >= 0 && dup2(null, STDERR_FILENO) == STDERR_FILENO) {
        slurm_error("sif-image: %s", msg);
        dup2(saved, STDERR_FILENO);
    }
    if (null >= 0)
        close(null);
    close(saved);
}

/* One line for the user: on srun's (or the batch job's) stderr, without Slurm's "error:" prefix. */
void user_line(const char *msg)
{
    if (slurm_spank_log)
        slurm_spank_log("sif-image: %s", msg);
    else
        fprintf(stderr, "sif-image: %s\n", msg);
}

/* ---------------------------------------------------------------- plugstack arguments ---------- */

/* Value of "key=" among the plugstack arguments, or NULL. */
static const char *plugstack_arg(int ac, char **av, const char *key)
{
    size_t n = strlen(key);
    for (int i = 0; i < ac; i++)
        if (av[i] && strncmp(av[i], key, n) == 0 && av[i][n] == '=')
            return av[i] + n + 1;
    return NULL;
}

/* ---------------------------------------------------------------- the options ------------------ */

/* Indexes into option_states; also the `val` Slurm hands back to option_cb. spank_sif.options
 * names the same indexes. */
enum { OPT_IMAGE, OPT_CONTAINER, OPT_BINDS, OPT_WORKDIR, OPT_COUNT };

/* The value Slurm gave each option's callback, last one wins (local: environment, then command
 * line). Slurm 22.05 calls the remote callback twice with the same value; a different value there
 * is a conflict that Python reports. */
static struct {
    char *value;
    int given;
    int conflict;
} option_states[OPT_COUNT];

static int option_cb(int val, const char *arg, int remote)
{
    char *copy;
    if (val < 0 || val >= OPT_COUNT)
        return -1;
    copy = strdup(arg ? arg : "");
    if (!copy)
        return -1;
    if (option_states[val].given && remote && strcmp(copy, option_states[val].value) != 0)
        option_states[val].conflict = 1;
    free(option_states[val].value);
    option_states[val].value = copy;
    option_states[val].given = 1;
    return 0;
}

static struct spank_option sif_options[OPT_COUNT] = {
    {"sif-image", "PATH",
     "Run the tasks with this Singularity/Apptainer SIF image (encrypted or not) mounted read-only "
     "at the site's mount point ($SIF_IMAGE_ROOT). The key is read from APPTAINER_ENCRYPTION_* "
     "variables. Default: $" SHIM_IMAGE_ENV "; an empty value disables it.",
     1, OPT_IMAGE, option_cb},
    {"sif-container", NULL,
     "Run each task inside the --sif-image image: the image is the task's root file system, with "
     "its own environment and PATH (the batch script stays on the host). Default: "
     "$" SHIM_CONTAINER_ENV "=1, or the site's choice.",
     0, OPT_CONTAINER, option_cb},
    {"sif-binds", "SRC[:DST[:ro]],...",
     "With --sif-container: also bind these host paths into the container (DST defaults to SRC; "
     "ro makes it read-only). Default: $SLURM_SIF_BINDS.",
     1, OPT_BINDS, option_cb},
    {"sif-workdir", "PATH",
     "With --sif-container: start the tasks in this directory of the container (default: the "
     "submit directory, else your home, else /). Default: $SLURM_SIF_WORKDIR.",
     1, OPT_WORKDIR, option_cb},
};

/* Python reads these to resolve the options (spank_sif.options). */
const char *shim_option_value_of(int which)
{
    return which >= 0 && which < OPT_COUNT && option_states[which].given
               ? option_states[which].value
               : NULL;
}
int shim_option_conflict_of(int which)
{
    return which >= 0 && which < OPT_COUNT && option_states[which].conflict;
}
const char *shim_option_value(void) { return shim_option_value_of(OPT_IMAGE); }
int shim_option_conflict(void) { return shim_option_conflict_of(OPT_IMAGE); }

/* Set by Python once a step on this node runs its tasks inside the image: only then does the
 * per-task task_init callback start Python work (mount mode never pays for it). */
static int container_active;
void shim_set_container_active(int on) { container_active = on; }

/* ---------------------------------------------------------------- typed SPANK wrappers --------- */

int shim_context(void) { return spank_context ? (int)spank_context() : (int)S_CTX_ERROR; }

int shim_item_u32(spank_t sp, int item, uint32_t *out)
{
    return spank_get_item ? (int)spank_get_item(sp, (spank_item_t)item, out) : ESPANK_NOT_AVAIL;
}

int shim_item_uid(spank_t sp, uint32_t *out)
{
    uid_t v = 0;
    int rc = spank_get_item ? (int)spank_get_item(sp, S_JOB_UID, &v) : ESPANK_NOT_AVAIL;
    *out = (uint32_t)v;
    return rc;
}

int shim_item_gid(spank_t sp, uint32_t *out)
{
    gid_t v = 0;
    int rc = spank_get_item ? (int)spank_get_item(sp, S_JOB_GID, &v) : ESPANK_NOT_AVAIL;
    *out = (uint32_t)v;
    return rc;
}

int shim_item_int(spank_t sp, int item, int *out)
{
    return spank_get_item ? (int)spank_get_item(sp, (spank_item_t)item, out) : ESPANK_NOT_AVAIL;
}

int shim_getenv(spank_t sp, const char *name, char *buf, int len)
{
    return spank_getenv ? (int)spank_getenv(sp, name, buf, len) : ESPANK_NOT_AVAIL;
}

int shim_setenv(spank_t sp, const char *name, const char *value, int overwrite)
{
    return spank_setenv ? (int)spank_setenv(sp, name, value, overwrite) : ESPANK_NOT_AVAIL;
}

int shim_unsetenv(spank_t sp, const char *name)
{
    return spank_unsetenv ? (int)spank_unsetenv(sp, name) : ESPANK_NOT_AVAIL;
}

int shim_job_control_setenv(spank_t sp, const char *name, const char *value, int overwrite)
{
    return spank_job_control_setenv ? (int)spank_job_control_setenv(sp, name, value, overwrite)
                                    : ESPANK_NOT_AVAIL;
}

int shim_job_control_unsetenv(spank_t sp, const char *name)
{
    return spank_job_control_unsetenv ? (int)spank_job_control_unsetenv(sp, name)
                                      : ESPANK_NOT_AVAIL;
}

/* The job's (in a task: the task's) environment, owned by Slurm: read it during the callback only.
 * NULL if unavailable. */
char **shim_job_env(spank_t sp)
{
    char **env = NULL;
    if (!spank_get_item || spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS)
        return NULL;
    return env;
}

/* The state directory the C side checks in the job epilog ("state_dir=" or the default); Python
 * insists it matches the site configuration. */
static const char *state_dir_arg = SHIM_DEFAULT_STATE_DIR;
const char *shim_state_dir(void) { return state_dir_arg; }

/* Every callback sees the plugstack arguments; remember those C needs (the epilog gets no init). */
static void remember_args(int ac, char **av)
{
    const char *dir = plugstack_arg(ac, av, "state_dir");
    if (dir && dir[0] == '/')
        state_dir_arg = dir;
}
const char *shim_python(void) { return SHIM_PYTHON; }
int shim_slurm_version(void) { return SLURM_VERSION_NUMBER; }

/* ---------------------------------------------------------------- Python start-up -------------- */

/* Make the shared object holding `sym` RTLD_NODELETE (and optionally RTLD_GLOBAL). */
static int pin(const void *sym, int flags, char *path, size_t len)
{
    Dl_info info;
    if (!dladdr(sym, &info) || !info.dli_fname)
        return -1;
    if (path)
        snprintf(path, len, "%s", info.dli_fname);
    return dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE | flags) ? 0 : -1;
}

static int start_failed(const char *what)
{
    char msg[PATH_MAX + 256];
    snprintf(msg, sizeof(msg), "cannot start the plugin's Python: %s", what);
    log_line(0, msg);
    return -1;
}

/* Set by the frozen init code when importing spank_sif.callbacks failed (already logged). */
static int python_broken;
void shim_python_broken(void) { python_broken = 1; }

/* 0 once Python runs and spank_sif.callbacks imported; -1 (for good) otherwise. Never finalized:
 * re-initialising CPython in one process breaks extension modules. */
static int ensure_python(int ac, char **av)
{
    static int state; /* 0 untried, 1 running, -1 failed for good */
    char libpython[PATH_MAX], want[PATH_MAX], got[PATH_MAX];
    const char *exe = plugstack_arg(ac, av, "python");

    if (state)
        return state > 0 ? 0 : -1;
    state = -1;
    if (!exe)
        exe = SHIM_PYTHON;
    /* Extension modules are not linked against libpython: it must be in the global scope, and
     * Slurm dlopen()s plugins RTLD_LOCAL. Pin ourselves too, so a dlclose never unmaps Python. */
    if (pin((void *)&Py_IsInitialized, RTLD_GLOBAL, libpython, sizeof(libpython)) ||
        pin((void *)&ensure_python, 0, NULL, 0))
        return start_failed("dlopen(RTLD_NOLOAD) of libpython or of the plugin failed");
    /* Same soname, another file (LD_LIBRARY_PATH, unreadable RPATH dir): refuse rather than run
     * a different interpreter with our site-packages. */
    if (!realpath(libpython, got) || !realpath(SHIM_LIBPYTHON, want) || strcmp(got, want) != 0)
        return start_failed("loaded libpython is " SHIM_LIBPYTHON "'s namesake, not the same file");
    if (!Py_IsInitialized()) {
        PyConfig config;
        PyStatus st;
        /* A nonexistent program_name is no error to CPython (it falls back to its build prefix),
         * so check it here. */
        if (access(exe, X_OK) != 0) {
            snprintf(got, sizeof(got), "python=%s is not an executable this user can run", exe);
            return start_failed(got);
        }
        PyConfig_InitIsolatedConfig(&config); /* ignores PYTHON* and the user's site-packages */
        config.install_signal_handlers = 0;
        config.write_bytecode = 0;
        st = PyConfig_SetBytesString(&config, &config.program_name, exe);
        if (!PyStatus_Exception(st))
            st = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(st))
            return start_failed(st.err_msg ? st.err_msg : "Py_InitializeFromConfig failed");
        PyEval_SaveThread(); /* cffi takes the GIL around each call */
    }
    if (cffi_start_python() != 0 || python_broken)
        return start_failed("importing spank_sif.callbacks failed (the traceback is in slurmd's log, "
                            "or in the system log where srun, sbatch or salloc ran)");
    state = 1;
    return 0;
}

/* ---------------------------------------------------------------- dispatch --------------------- */

static int step_active; /* this process handles an image: Python was asked to */

static int call_python(const char *cb, spank_t sp, int ac, char **av)
{
    struct sigaction old;
    int rc;
    if (ensure_python(ac, av))
        return -1;
    /* `import signal` installs Python's SIGINT handler whatever PyConfig says: keep the host's. */
    sigaction(SIGINT, NULL, &old);
    rc = py_dispatch(cb, sp, ac, av);
    sigaction(SIGINT, &old, NULL);
    return rc ? -1 : 0; /* Slurm <= 24.11 only counts negative values as failures */
}

/* Running Slurm's major.minor must be the one we were built for. Slurm's loader checks this too
 * (since 21.08, "Incompatible Slurm plugin ... version"); this message says what to do. */
static int check_slurm_version(spank_t sp)
{
    char *running = NULL, msg[256];
    unsigned major = 0, minor = 0;
    if (!spank_get_item || spank_get_item(sp, S_SLURM_VERSION, &running) != ESPANK_SUCCESS ||
        !running || sscanf(running, "%u.%u", &major, &minor) != 2)
        return 0;
    if (major == SLURM_VERSION_MAJOR(SLURM_VERSION_NUMBER) &&
        minor == SLURM_VERSION_MINOR(SLURM_VERSION_NUMBER))
        return 0;
    snprintf(msg, sizeof(msg),
             "plugin built for Slurm %u.%02u but this is Slurm %s: rebuild spank-sif against this "
             "Slurm's headers (libslurm-dev) and reinstall it",
             (unsigned)SLURM_VERSION_MAJOR(SLURM_VERSION_NUMBER),
             (unsigned)SLURM_VERSION_MINOR(SLURM_VERSION_NUMBER), running);
    log_line(0, msg);
    return -1;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    int ctx = shim_context();
    remember_args(ac, av);
    /* slurmd is multi-threaded and forks from RPC threads: CPython must never live there. */
    if (ctx == S_CTX_SLURMD || ctx == S_CTX_JOB_SCRIPT)
        return 0;
    if (check_slurm_version(sp))
        return -1;
    for (int i = 0; i < OPT_COUNT; i++) {
        if (spank_option_register(sp, &sif_options[i]) != ESPANK_SUCCESS) {
            char msg[128];
            snprintf(msg, sizeof(msg), "cannot register --%s (another plugin already has it?)",
                     sif_options[i].name);
            log_line(0, msg);
            return -1;
        }
    }
    return 0;
}

/* Is an image wanted here? Decided without Python: the option, else $SLURM_SIF_IMAGE. */
static int image_wanted(spank_t sp, int ctx)
{
    char buf[8];
    int rc;
    uint32_t step = 0;
    if (ctx == S_CTX_REMOTE && shim_item_u32(sp, S_JOB_STEPID, &step) == ESPANK_SUCCESS &&
        step == SHIM_EXTERN_STEP)
        return 0; /* the extern step runs no user tasks */
    if (option_states[OPT_IMAGE].given)
        return option_states[OPT_IMAGE].value[0] != '\0';
    if (ctx == S_CTX_REMOTE) {
        rc = shim_getenv(sp, SHIM_IMAGE_ENV, buf, sizeof(buf));
        return rc == ESPANK_SUCCESS ? buf[0] != '\0' : rc == ESPANK_NOSPACE;
    }
    return getenv(SHIM_IMAGE_ENV) && getenv(SHIM_IMAGE_ENV)[0];
}

/* srun/sbatch/salloc: a container option given on the command line without an image is a mistake
 * to report at once (in C: no image means no Python). Inherited defaults ($SLURM_SIF_CONTAINER in a
 * step that switched its image off) are not. */
static int container_option_without_image(void)
{
    for (int i = OPT_CONTAINER; i < OPT_COUNT; i++) {
        if (option_states[i].given) {
            char msg[256];
            snprintf(msg, sizeof(msg),
                     "--%s needs an image: give --sif-image=PATH as well (or set " SHIM_IMAGE_ENV
                     ")",
                     sif_options[i].name);
            user_line(msg);
            return 1;
        }
    }
    return 0;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
    int ctx = shim_context();
    if (ctx != S_CTX_LOCAL && ctx != S_CTX_ALLOCATOR && ctx != S_CTX_REMOTE)
        return 0;
    if (!image_wanted(sp, ctx)) {
        if (ctx != S_CTX_REMOTE && container_option_without_image())
            return -1;
        /* "--sif-image=" switches an inherited default off for this command and its steps. */
        if (option_states[OPT_IMAGE].given && ctx != S_CTX_REMOTE)
            unsetenv(SHIM_IMAGE_ENV);
        /* A step without image inside a batch job that has one: don't point at an empty dir. */
        if (ctx == S_CTX_REMOTE && spank_unsetenv)
            spank_unsetenv(sp, SHIM_ROOT_ENV);
        return 0;
    }
    step_active = 1;
    return call_python("init_post_opt", sp, ac, av);
}

/* The remaining step callbacks only matter once init_post_opt took the image on. */
#define ACTIVE_ONLY(name)                                                    \
    int slurm_spank_##name(spank_t sp, int ac, char **av)                     \
    {                                                                         \
        return step_active && shim_context() == S_CTX_REMOTE                  \
                   ? call_python(#name, sp, ac, av)                           \
                   : 0;                                                       \
    }
ACTIVE_ONLY(user_init)
ACTIVE_ONLY(task_init_privileged)
ACTIVE_ONLY(exit)

/* In each task, as the user, inside the container: only container mode has work here. */
int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
    return step_active && container_active && shim_context() == S_CTX_REMOTE
               ? call_python("task_init", sp, ac, av)
               : 0;
}

/* Runs for every job on every node (a fresh `slurmstepd spank epilog`): start Python only when
 * the job left a record in the state directory, i.e. some step of it used an image here. */
int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
    char path[PATH_MAX];
    struct stat st;
    uint32_t job = 0;
    remember_args(ac, av);
    if (shim_item_u32(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
        return 0;
    snprintf(path, sizeof(path), "%s/%u", state_dir_arg, job);
    if (lstat(path, &st) != 0 && errno == ENOENT)
        return 0;
    return call_python("job_epilog", sp, ac, av);
}
