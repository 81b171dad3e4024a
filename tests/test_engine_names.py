"""Mapping (session) names: ``spank-sif-<job>-<node tag>-<random>``. Device-mapper names are global
to a kernel, so names carry the node, and the sweeps of lost records act only on this node's."""
import os
import re

import pytest

from spank_sif import lifecycle
from spank_sif.errors import StateError
from spank_sif.state import check_label


def test_node_tag_is_a_stable_hash_of_the_host_name():
    tags = {lifecycle.node_tag(f"node{i}") for i in range(1, 4)}
    assert len(tags) == 3
    assert all(re.fullmatch(r"[0-9a-f]{8}", t) for t in tags)
    assert lifecycle.node_tag("node1") == lifecycle.node_tag("node1")
    assert lifecycle.node_tag() == lifecycle.node_tag(os.uname().nodename)


@pytest.mark.parametrize("job", ["42.0", "42.batch", "cli", "4294967294.4294967290", "a-b"])
def test_session_names_carry_job_and_node_and_parse_back(job):
    names = {lifecycle.session_name(job) for _ in range(5)}
    assert len(names) == 5                                  # the random part tells sessions apart
    for name in names:
        assert name.startswith(f"spank-sif-{job}-{lifecycle.node_tag()}-")
        assert lifecycle.parse_session_name(name) == (job, lifecycle.node_tag())
        assert check_label(name, "session name") == name    # fits a state record's name, longest job too


@pytest.mark.parametrize("name", [
    "spank-sif-42.0-0badc0de",                  # no node tag (names made before tags existed)
    "spank-sif-42.0-0BADC0DE-0badc0de",         # not lower-case hex
    "spank-sif-42.0-0badc0d-0badc0de",          # tag too short
    "spank-sif--0badc0de-0badc0de",             # no job
    "other-42.0-0badc0de-0badc0de",             # not ours at all
    "luks-4c1d3a1e-0badc0de-0badc0de",
])
def test_other_names_are_not_parsed_as_sessions(name):
    assert lifecycle.parse_session_name(name) is None


def test_bad_job_labels_are_refused():
    with pytest.raises(StateError):
        lifecycle.session_name("../etc")
