"""``python3 -m fuzz``: fuzz a target, minimize its corpus, replay inputs, rebuild the seeds.

  run TARGET [--runs N | --seconds S] [--work DIR] [-- LIBFUZZER-FLAGS...]
  merge TARGET [--work DIR]        minimize the corpus in the repository plus the run's new inputs
  replay TARGET FILE...            each input's outcome, without atheris (a finding raises)
  seed [TARGET...]                 add the seed inputs (reference images, real cryptsetup) to the corpus

A run reads the target's corpus from the repository and writes what it adds,
and any crash, hang or memory blow-up (``crash-*``, ``timeout-*``, ``oom-*``), under --work.
"""
import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import fuzz

DEFAULT_WORK = Path(tempfile.gettempdir()) / "spank-sif-fuzz"
TIMEOUT_S = 10        # one input running longer than this is a hang
RSS_LIMIT_MB = 1024   # the whole process (Python, cryptography, yaml) stays near 100 MB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fuzz a target")
    run.add_argument("target", choices=fuzz.TARGETS)
    limit = run.add_mutually_exclusive_group()
    limit.add_argument("--runs", type=int, help="stop after this many executions")
    limit.add_argument("--seconds", type=int, help="stop after this long (default 60)")
    run.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"default {DEFAULT_WORK}")
    run.add_argument("flags", nargs="*", help="more libFuzzer flags, after --")
    merge = sub.add_parser("merge", help="minimize the corpus (repository + a run's new inputs)")
    merge.add_argument("target", choices=fuzz.TARGETS)
    merge.add_argument("--work", type=Path, default=DEFAULT_WORK)
    replay = sub.add_parser("replay", help="run inputs without the fuzzer and show their outcomes")
    replay.add_argument("target", choices=fuzz.TARGETS)
    replay.add_argument("files", nargs="+", type=Path)
    seed = sub.add_parser("seed", help="add the seed inputs to the corpus in the repository")
    seed.add_argument("targets", nargs="*", metavar="TARGET", help="default: all")
    inner = sub.add_parser("libfuzzer", help=argparse.SUPPRESS)  # what libFuzzer re-executes to merge
    inner.add_argument("target", choices=fuzz.TARGETS)
    inner.add_argument("flags", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.command == "run":
        work = _work(args.work, args.target)
        stop = f"-runs={args.runs}" if args.runs is not None else f"-max_total_time={args.seconds or 60}"
        # Not the regression inputs: tests/test_fuzz.py replays them, and the slow ones (a YAML
        # nested 600 deep) would make libFuzzer spend its time on their variants.
        corpora = [work / "corpus", fuzz.CORPUS / args.target]
        libfuzzer(args.target, [stop, f"-artifact_prefix={work}/", *args.flags,
                                *(str(d) for d in corpora if d.is_dir())], work)
    if args.command == "merge":
        return _merge(args.target, _work(args.work, args.target))
    if args.command == "replay":
        module = fuzz.target(args.target)
        for path in args.files:
            print(f"{path}: {module.run(path.read_bytes())}")
        return 0
    if args.command == "seed":
        from fuzz import seeds
        for name in args.targets or fuzz.TARGETS:
            made = seeds.write(name)
            print(f"{name}: {len(made)} seed inputs in {fuzz.CORPUS / name}")
        return 0
    if args.command == "libfuzzer":
        libfuzzer(args.target, args.flags, None)
    return 0


def _work(work: Path, target: str) -> Path:
    (work / target / "corpus").mkdir(parents=True, exist_ok=True)
    return work / target


def _command(target: str) -> str:
    """How libFuzzer starts this fuzzer again (it runs the command through the shell to merge)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fuzz.REPO), os.environ.get("PYTHONPATH")]))
    return shlex.join([sys.executable, "-m", "fuzz", "libfuzzer", target])


def libfuzzer(target: str, flags: list[str], work: Path | None):
    """Run libFuzzer on ``target`` in this process (it exits when done). ``work``: where the
    libFuzzer dictionary goes (None: the flags already name one)."""
    import atheris
    with atheris.instrument_imports(include=["spank_sif", "yaml"]):
        module = fuzz.target(target)
        import yaml  # noqa: F401  (config.py imports it on first use: instrument it now)
    given = {f.split("=", 1)[0] for f in flags}
    defaults = {"-max_len": module.MAX_LEN, "-timeout": getattr(module, "TIMEOUT_S", TIMEOUT_S),
                "-rss_limit_mb": RSS_LIMIT_MB, "-print_final_stats": 1}
    if work is not None:
        defaults["-dict"] = _dictionary(module.TOKENS, work / "tokens.dict")
    argv = [_command(target), *(f"{k}={v}" for k, v in defaults.items() if k not in given), *flags]
    atheris.Setup(argv, module.run, custom_mutator=getattr(module, "mutate", None))
    atheris.Fuzz()


def _dictionary(tokens, path: Path) -> Path:
    """A libFuzzer dictionary: one quoted token a line, bytes outside printable ASCII as \\xNN."""
    def quoted(token: bytes) -> str:
        return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token)
    path.write_text("".join(f'"{quoted(t)}"\n' for t in tokens))
    return path


def _merge(target: str, work: Path) -> int:
    """libFuzzer's merge: the smallest set of inputs that keeps every feature of the repository's
    corpus and the run's, then that set becomes the repository's corpus."""
    corpus = fuzz.CORPUS / target
    corpus.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f"merge-{target}-", dir=work))
    rc = subprocess.run([sys.executable, "-m", "fuzz", "libfuzzer", target, "-merge=1",
                         f"-artifact_prefix={work}/", str(out), str(corpus), str(work / "corpus")],
                        cwd=fuzz.REPO, check=False).returncode
    kept = fuzz.inputs(out)
    if rc != 0 or not kept:
        print(f"merge failed (exit {rc}); the corpus is unchanged", file=sys.stderr)
        return rc or 1
    size = sum(p.stat().st_size for p in kept)
    for old in fuzz.inputs(corpus):
        old.unlink()
    for new in kept:
        new.rename(corpus / new.name)
    out.rmdir()
    print(f"{target}: {len(kept)} inputs, {size} bytes in {corpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
