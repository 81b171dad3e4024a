"""``spank-sif doctor``: is this node ready for jobs with images? One line per check (what to do
when it fails), ``--json`` for machines, an exit status for health-check scripts. The checks are
in ``spank_sif.doctor``, imported only when the command runs."""
import argparse
import json
import os
import sys

from spank_sif.errors import ConfigError, StateError, SystemSetupError, UsageError

STATUS_WORDS = {"ok": "ok", "warning": "WARN", "error": "FAIL"}

DESCRIPTION = """\
Check that this node can run jobs with images: kernel modules, device-mapper, loop devices,
libcryptsetup and the cryptsetup program, the plugin's Slurm version, plugstack.conf, the site
configuration, the state directory, the mount point, and that job users can start the plugin's
Python. Prints one line per check (ok, WARN or FAIL, and what to do). Missing kernel modules are
loaded as the first job would load them. Slurm's configuration is read from $SLURM_CONF (default
/etc/slurm/slurm.conf)."""

EPILOG = f"""exit status:
  0   every check passed (warnings allowed: jobs still work)
  1   internal error (a bug: please report it)
  {ConfigError.exit_code}   the site configuration is invalid, or the plugstack.conf arguments are
  {SystemSetupError.exit_code}   something else jobs need is broken on this node: kernel, devices, cryptsetup,
      plugin, plugstack.conf, mount point, Python
  {StateError.exit_code}   the state directory is unusable
  64  usage error (e.g. not run as root)
When several checks fail, doctor exits with the code of the first one it lists.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor", help="check that this node can run jobs with images (root)",
        description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH",
                   help="site configuration (default $SPANK_SIF_CONFIG, else the config= of the "
                        "plugstack.conf line, else /etc/slurm/spank_sif.yaml)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    if os.geteuid() != 0:
        raise UsageError("spank-sif doctor needs root (it checks devices and files only root can open)")
    from spank_sif import doctor
    results = doctor.run_checks(config=args.config)
    status = doctor.exit_status(results)
    if args.json:
        checks = [{**r._asdict(), "status": r.status} for r in results]
        json.dump({"ok": status == 0, "exit_code": status, "checks": checks}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            fix = f"; fix: {r.fix}" if not r.ok and r.fix else ""
            print(f"{STATUS_WORDS[r.status]:<4}  {r.name:<{width}}  {r.detail}{fix}")
        print(_summary(results, status))
    return status


def _summary(results, status: int) -> str:
    errors = sum(r.status == "error" for r in results)
    warnings = sum(r.status == "warning" for r in results)
    if status:
        return (f"{errors} of {len(results)} checks failed"
                + (f", {warnings} warned" if warnings else "")
                + f": jobs with --sif-image cannot run on this node (exit status {status})")
    if warnings:
        return f"{len(results) - warnings} of {len(results)} checks passed, {warnings} warned: jobs can run"
    return f"all {len(results)} checks passed"
