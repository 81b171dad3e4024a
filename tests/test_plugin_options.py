"""--sif-image resolution on the submit side and on the nodes (spank_sif.options)."""
import pytest

from spank_sif import options
from spank_sif.errors import UsageError

SUBMIT_CASES = [
    # option value, environment, cwd, expected
    (None, {}, "/home/u", None),
    ("", {"SLURM_SIF_IMAGE": "/img/a.sif"}, "/home/u", None),          # empty switches it off
    ("app.sif", {}, "/home/u", "/home/u/app.sif"),
    ("../x/app.sif", {}, "/home/u/w", "/home/u/x/app.sif"),
    ("/abs//dir/./app.sif", {}, "/home/u", "/abs/dir/app.sif"),
    (None, {"SLURM_SIF_IMAGE": "rel.sif"}, "/home/u", "/home/u/rel.sif"),
    ("b.sif", {"SLURM_SIF_IMAGE": "/img/a.sif"}, "/w", "/w/b.sif"),      # the option wins
]


@pytest.mark.parametrize("value,environ,cwd,expected", SUBMIT_CASES)
def test_submit_side_image(value, environ, cwd, expected):
    assert options.submit_side_image(value, environ, cwd) == expected


NODE_CASES = [
    # option value, job's SLURM_SIF_IMAGE, expected
    (None, None, None),
    ("", "/img/a.sif", None),
    ("/img/b.sif", "/img/a.sif", "/img/b.sif"),
    ("b.sif", "/home/u/b.sif", "/home/u/b.sif"),   # relative: the submit side's absolute export
    (None, "/img/a.sif", "/img/a.sif"),             # default (or sbatch-level) image
]


@pytest.mark.parametrize("value,job_env,expected", NODE_CASES)
def test_node_side_image(value, job_env, expected):
    assert options.node_side_image(value, job_env) == expected


BAD = [
    ("submit", ("a\nb.sif", {}, "/w"), "newline"),
    ("submit", ("dir/", {}, "/w"), "directory"),
    ("submit", ("x" * 5000, {}, "/w"), "longer"),
    ("node", ("rel.sif", None), "relative path"),
    ("node", (None, "rel.sif"), "absolute"),
    ("node", ("/a.sif", None, True), "two different values"),
]


@pytest.mark.parametrize("side,args,words", BAD)
def test_bad_values_are_one_line_usage_errors(side, args, words):
    func = options.submit_side_image if side == "submit" else options.node_side_image
    with pytest.raises(UsageError) as err:
        func(*args)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_option_env_name_is_slurms_mangling():
    # _SLURM_SPANK_OPTION_<plugin>_<option>, non-alphanumerics as '_' (plugstack.c _opt_env_name)
    mangled = "".join(c if c.isalnum() else "_" for c in options.OPTION)
    assert options.OPTION_ENV == f"_SLURM_SPANK_OPTION_sif_{mangled}"
