"""Encrypted images on three Slurm nodes at once, in the VM harness (tests/slurm/multinode.py).

Every node of a job unlocks its own mapping of the same image at the same moment. The nodes share
one kernel, so device-mapper names and loop devices are shared too: names must not collide, and a
node's epilog must remove only what that node made. What is left is asked of the system (sysfs,
dmsetup, each node's own view of its state directory and of its processes' mounts), never of the
engine. Jobs run as ``sifuser``; mount mode (``--sif-image``, tasks on the host).
"""
import shutil

import pytest

import mpi
from slurm.fixtures import slurm_cluster3  # noqa: F401
from slurm.multinode import (NODES, Srun, check_own_mappings, check_untouched, crash_node_and_run_its_epilog,
                             mappings)

pytestmark = [pytest.mark.vm, pytest.mark.slurm, pytest.mark.root]

# What a task sees, asked of the system: "<node>,<device-mapper name>,<loop device>,<the image's
# /hello.txt>" for the device mounted at $SIF_IMAGE_ROOT (its name and the loop device under it).
SEEN = ('$(hostname),$(cat /sys/dev/block/$(mountpoint -d "$SIF_IMAGE_ROOT")/dm/name)'
        ',$(ls /sys/dev/block/$(mountpoint -d "$SIF_IMAGE_ROOT")/slaves)'
        ',$(cat "$SIF_IMAGE_ROOT/hello.txt")')


@pytest.fixture(scope="module")
def enc(ref_images, slurm_cluster3):
    """An encrypted image (cheap KDF) every user can read, its passphrase, and a directory where
    the test leaves signals for the tasks."""
    d = slurm_cluster3.root / "encrypted"
    d.mkdir(mode=0o755, exist_ok=True)
    image = d / "enc.sif"
    shutil.copyfile(ref_images.fast_pass_4k, image)
    image.chmod(0o644)
    signals = slurm_cluster3.root / "signals"
    signals.mkdir(mode=0o755, exist_ok=True)
    return {"image": image, "hello": ref_images.hello.decode().strip(), "signals": signals,
            "key": {"APPTAINER_ENCRYPTION_PASSPHRASE": ref_images.pass_file.read_text()}}


@pytest.fixture
def cluster3(slurm_cluster3, enc):
    """The three-node cluster with the plugin loaded and the site's mount point on every node's
    own tmpfs; no job is left after the test."""
    cluster = slurm_cluster3
    cluster.set_plugin(True)
    cluster.write_site_config(f"mount_point: {cluster.mount_point}\n")
    for flag in enc["signals"].iterdir():
        flag.unlink()
    yield cluster
    cluster.run(["scancel", "--full", "-u", "sifuser"], user="root")
    cluster.wait_jobs_done()


def per_node(seen: list[str], hello: str) -> dict[str, tuple[str, str]]:
    """node -> (mapping, loop device) from what tasks saw (SEEN); every task must have read the
    image, and all tasks of a node must see the same mapping."""
    views: dict[str, set] = {}
    for line in seen:
        words = line.split(",")
        assert len(words) == 4 and words[3] == hello, line
        views.setdefault(words[0], set()).add((words[1], words[2]))
    assert all(len(v) == 1 for v in views.values()), views
    return {node: v.pop() for node, v in views.items()}


def test_mpi_step_on_three_nodes_at_once_each_with_its_own_mapping(cluster3, enc):
    """``srun --mpi=pmi2 -N3 -n6 --sif-image``: every task publishes what it saw through PMI2
    (tests/mpi/pmi2_allgather.c), fences and reads back every task's value. The fence holds all six
    tasks, and so all three nodes' mounts, at once; every task printing all six values shows the
    tasks talked across the nodes. After the step nothing is left on any node."""
    program = cluster3.root / "pmi2_allgather"
    shutil.copyfile(mpi.pmi2_allgather(), program)
    program.chmod(0o755)
    out = cluster3.run(["srun", "--mpi=pmi2", "-N3", "-n6", f"--sif-image={enc['image']}", "sh",
                        "-c", f'exec {program} "{SEEN}"'], env=enc["key"])
    assert out.returncode == 0, out.stderr
    ranks = sorted(out.stdout.splitlines())
    assert len(ranks) == 6, out.stdout
    values = ranks[0].split(": ", 1)[1]
    assert ranks == [f"rank {r}/6 on {NODES[r // 2]}: {values}" for r in range(6)], out.stdout
    seen = values.split()
    assert [s.split(",")[0] for s in seen] == [node for node in NODES for _ in range(2)]
    check_own_mappings(per_node(seen, enc["hello"]))
    assert cluster3.wait_no_leftovers() == []


def test_killed_stepd_on_one_node_then_its_epilog_cleans_only_that_node(cluster3, enc):
    """``srun -N3 -n6 --sif-image``; node2's slurmstepd dies mid-step (no exit callback runs there),
    then node2's epilog runs while node1 and node3 go on serving the step: what the job epilog runs
    (``spank-sif epilog``, the plugin's job_epilog sweep), started by hand in node2's namespaces: as
    far as Slurm knows the job still runs on node2, so it would run the epilog there only when the
    whole job ends. node2 is then clean; node1's
    and node3's mappings and mounts are untouched (not even marked for deferred removal) and keep
    serving their tasks until the job is cancelled, when their own teardown and the job epilog
    remove them."""
    go_on = enc["signals"] / "go-on"
    script = f'echo "{SEEN}" && while [ ! -e {go_on} ]; do sleep 0.5; done && echo "{SEEN}"'
    job = Srun(cluster3, ["srun", "-N3", "-n6", f"--sif-image={enc['image']}", "sh", "-c", script],
               enc["key"])
    victim, others = cluster3.node("node2"), [cluster3.node("node1"), cluster3.node("node3")]
    try:
        nodes = per_node(job.take(6), enc["hello"])
        check_own_mappings(nodes)
        assert mappings() == sorted(name for name, _ in nodes.values())   # held at once
        jid = crash_node_and_run_its_epilog(cluster3, victim, nodes)
        for node in others:
            check_untouched(cluster3, node, jid, nodes[node.name])
            assert any(": mount in" in item for item in cluster3.node_leftovers(node)), node

        go_on.touch()                                     # the others still read the image
        assert per_node(job.take(4), enc["hello"]) == {n.name: nodes[n.name] for n in others}
    finally:
        go_on.touch()
        cluster3.run(["scancel", "--full", "-u", "sifuser"], user="root")
        job.finish()
    assert cluster3.wait_no_leftovers() == []
