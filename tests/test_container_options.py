"""The container options (spank_sif.options) and site keys (spank_sif.config), without Slurm."""
import pytest

from spank_sif import config, options
from spank_sif.errors import ConfigError, UsageError
from spank_sif.options import BindSpec

BINDS = [
    # text, cwd, expected
    ("/data", None, [BindSpec("/data", "/data")]),
    ("/data:/in", None, [BindSpec("/data", "/in")]),
    ("/data:/in:ro,/x:/y:rw", None, [BindSpec("/data", "/in", True), BindSpec("/x", "/y")]),
    ("/data:ro", None, [BindSpec("/data", "/data", True)]),
    ("sub:/in", "/home/u/w", [BindSpec("/home/u/w/sub", "/in")]),
    ("../x//y/", "/home/u/w", [BindSpec("/home/u/x/y", "/home/u/x/y")]),
    (",/a,,", None, [BindSpec("/a", "/a")]),
    ("", None, []),
]


@pytest.mark.parametrize("text,cwd,expected", BINDS)
def test_parse_binds(text, cwd, expected):
    assert options.parse_binds(text, cwd=cwd) == expected


BAD_BINDS = [
    ("a:b:c:d", "SRC[:DST[:ro]]"),
    ("/a:/b:rx", "SRC[:DST[:ro]]"),
    (":/b", "SRC[:DST[:ro]]"),
    ("/a:relative", "absolute"),
    ("/a:/", "root"),
    ("relative", "absolute"),  # no cwd on a node
    ("/a\n:/b", "newline"),
]


@pytest.mark.parametrize("text,words", BAD_BINDS)
def test_bad_binds_are_one_line_usage_errors(text, words):
    with pytest.raises(UsageError) as err:
        options.parse_binds(text)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_round_trip_keeps_binds():
    binds = options.parse_binds("/a:/b:ro,/c")
    assert options.parse_binds(options.format_binds(binds)) == binds


@pytest.mark.parametrize("value,expected", [(None, None), ("1", True), ("yes", True), ("0", False),
                                            ("", False), ("false", False)])
def test_container_flag(value, expected):
    assert options.container_flag(value) is expected


def test_container_flag_refuses_other_words():
    with pytest.raises(UsageError, match="SLURM_SIF_CONTAINER"):
        options.container_flag("maybe")


@pytest.mark.parametrize("given,env,site,expected", [
    (True, "0", False, True),     # the option wins
    (False, "1", False, True),    # then the environment
    (False, "0", True, False),
    (False, None, True, True),    # then the site
    (False, None, False, False),
])
def test_node_side_container(given, env, site, expected):
    assert options.node_side_container(given, env, site) is expected


def test_submit_side_exports_defaults_with_absolute_sources():
    given = {"sif-container": "", "sif-binds": "data:/in:ro", "sif-workdir": "/opt"}
    assert options.submit_side_container(given, {}, "/home/u") == {
        "SLURM_SIF_CONTAINER": "1", "SLURM_SIF_BINDS": "/home/u/data:/in:ro", "SLURM_SIF_WORKDIR": "/opt"}
    # an inherited default is made absolute too; nothing given, nothing else exported
    assert options.submit_side_container({}, {"SLURM_SIF_BINDS": "d"}, "/w") == {"SLURM_SIF_BINDS": "/w/d:/w/d"}
    assert options.submit_side_container({}, {}, "/w") == {}


def test_workdir_must_be_absolute():
    with pytest.raises(UsageError, match="absolute"):
        options.check_workdir("rel")
    assert options.check_workdir("/a/./b/") == "/a/b"


def test_node_side_value_prefers_the_submit_sides_export():
    assert options.node_side_value("rel:/x", "/abs/rel:/x", "sif-binds") == "/abs/rel:/x"
    assert options.node_side_value("/a:/x", None, "sif-binds") == "/a:/x"  # --export=NONE
    with pytest.raises(UsageError, match="two different values"):
        options.node_side_value("/a", "/a", "sif-binds", conflict=True)


def test_option_env_names_are_slurms_mangling():
    assert options.option_env("sif-container") == "_SLURM_SPANK_OPTION_sif_sif_container"


# ------------------------------------------------------------------ site keys

def test_container_defaults():
    c = config.SiteConfig()
    assert c.container_default is False and c.allowed_bind_paths == ()
    assert [b.source for b in c.container_binds][:7] == ["/proc", "/sys", "/dev", "/tmp", "/var/tmp", "~", "."]
    assert BindSpec("/etc/slurm", "/etc/slurm", True) in c.container_binds
    assert c.host_only_variables == ("PATH", "LD_LIBRARY_PATH", "LD_PRELOAD")
    assert c.container_env_timeout == 10


def test_container_keys_parse():
    c = config.parse_config('container_default: true\ncontainer_binds: [/proc, "~", "/opt/mpi:/opt/mpi:ro"]\n'
                            'allowed_bind_paths: [/scratch/]\nhost_only_variables: [PATH, MODULEPATH]\n'
                            'container_env_timeout: 3\n')
    assert c.container_default is True
    assert c.container_binds == (BindSpec("/proc", "/proc"), BindSpec("~", "~"),
                                 BindSpec("/opt/mpi", "/opt/mpi", True))
    assert c.allowed_bind_paths == ("/scratch",)
    assert c.host_only_variables == ("PATH", "MODULEPATH") and c.container_env_timeout == 3


@pytest.mark.parametrize("text,words", [
    ("container_binds: [relative]\n", ["container_binds", "absolute"]),
    ("container_binds: [\"~:/elsewhere\"]\n", ["container_binds", "own path"]),
    ("container_binds: /proc\n", ["container_binds", "list"]),
    ("host_only_variables: [\"NOT A NAME\"]\n", ["host_only_variables"]),
    ("container_env_timeout: 0\n", ["container_env_timeout", "at least 1"]),
    ("container_default: maybe\n", ["container_default", "true or false"]),
])
def test_bad_container_keys_name_file_and_key(text, words):
    with pytest.raises(ConfigError) as err:
        config.parse_config(text, "site.yaml")
    for word in ["site.yaml", *words]:
        assert word in str(err.value)
