"""The fuzz targets (fuzz/): each runs briefly under libFuzzer, every saved regression input replays
with the outcome it is named after, the corpus replays, and the harnesses reach deep code."""
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import fuzz  # noqa: E402  (the repository's top-level fuzz package)

BRIEF_RUNS = 5000  # per target, after the corpus: seconds each


@pytest.mark.parametrize("name", fuzz.TARGETS)
def test_target_runs_briefly_without_findings(name, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fuzz", "run", name, "--runs", str(BRIEF_RUNS),
                           "--work", str(tmp_path)], check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, tail
    assert f"Done {BRIEF_RUNS} runs" in proc.stderr, tail
    assert not list(tmp_path.glob(f"{name}/crash-*")) and not list(tmp_path.glob(f"{name}/timeout-*")), tail
    # Coverage was measured (the code under test is instrumented), not just the inputs counted.
    assert " cov: " in proc.stderr, tail


REGRESSIONS = [p for name in fuzz.TARGETS for p in fuzz.inputs(fuzz.REGRESSIONS / name)]


@pytest.mark.parametrize("path", REGRESSIONS, ids=[f"{p.parent.name}/{p.name}" for p in REGRESSIONS])
def test_regression_input(path):
    """A regression input is named ``<what>.<outcome>``: what it once broke, what it must give now."""
    expected = path.name.rsplit(".", 1)[1]
    assert fuzz.target(path.parent.name).run(path.read_bytes()) == expected


# What the seeds and the minimized corpus of each target must reach: acceptance ("ok"), and refusals
# from deep inside the parser, not only at its door.
DEEP = {
    "sif": {"ok", "ImageError", "UnsupportedImageError"},
    "luks2": {"ok", "ImageError", "UnsupportedImageError", "PolicyError"},
    "keys": {"ok", "KeyMaterialError", "ImageError", "WrongKeyError"},
    "config": {"ok", "ConfigError"},
}


@pytest.mark.parametrize("name", fuzz.TARGETS)
def test_corpus_replays_and_reaches_deep_code(name):
    module = fuzz.target(name)
    outcomes = Counter(module.run(p.read_bytes()) for p in fuzz.inputs(fuzz.CORPUS / name))
    assert DEEP[name] <= set(outcomes), outcomes


def test_corpus_stays_small():
    sizes = {name: sum(p.stat().st_size for p in fuzz.inputs(fuzz.CORPUS / name)) for name in fuzz.TARGETS}
    assert sum(sizes.values()) < 512 * 1024, sizes


@pytest.mark.parametrize("name", fuzz.TARGETS)
def test_seeds_are_what_they_claim(name, monkeypatch, tmp_path):
    """The seed builders run on a fresh machine (reference images, cryptsetup) and their inputs are
    accepted by the harness where they stand for valid objects."""
    from fuzz import seeds
    monkeypatch.setattr(fuzz, "CORPUS", tmp_path)
    made = seeds.write(name)
    outcomes = Counter(fuzz.target(name).run(p.read_bytes()) for p in made)
    assert outcomes["ok"] >= 3, outcomes
