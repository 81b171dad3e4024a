"""Coverage-guided fuzzing of the parsers that read hostile input (atheris, i.e. libFuzzer for Python).

One module per target; each has ``run(data) -> str``, which feeds one input to the code under test
and returns ``"ok"`` or the name of the ``SifError`` subclass it ended in. Anything else (another
exception, a broken invariant, a hang, runaway memory) is a finding. Targets:

- ``sif``: the SIF reader and what ``inspect`` does with an image (``target_sif``);
- ``luks2``: the LUKS2 binary headers and JSON metadata, keyslot order, KDF cap (``target_luks2``);
- ``keys``: PEM private keys, crypto messages, key variables (``target_keys``);
- ``config``: the site configuration file (``target_config``).

``python3 -m fuzz run TARGET --runs N`` fuzzes; see docs/testing.md for the rest.
"""
import importlib
from pathlib import Path

TARGETS = ("sif", "luks2", "keys", "config")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CORPUS = HERE / "corpus"            # minimized, one directory per target
REGRESSIONS = HERE / "regressions"  # inputs that once found a bug, one directory per target


def target(name: str):
    """The module of target ``name``."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r} (targets: {', '.join(TARGETS)})")
    return importlib.import_module(f"fuzz.target_{name}")


def inputs(directory: Path) -> list[Path]:
    """The input files of a corpus or regression directory, in a stable order."""
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
