"""--sif-container on three Slurm nodes at once, in the VM harness (tests/slurm/multinode.py), on an
encrypted container image, as sifuser: each node unlocks its own mapping and every task runs inside
the image; MPI-style tasks talk over PMI2 across the nodes from inside their containers; a node whose
slurmstepd dies is cleaned by its epilog without touching the others. What tasks report is asked of
the kernel from inside their containers (the device under the image's files, named by sysfs); what is
left is asked of the system from outside (sysfs, dmsetup, each node's state directory and its
processes' mount tables), never of the engine. Mount mode on the same cluster: test_vm_multinode.py.
"""
import contextlib

import pytest

import container_images
import mpi
import reftools
from slurm.fixtures import slurm_cluster3, write_image  # noqa: F401
from slurm.multinode import (NODES, Srun, check_own_mappings, check_untouched, crash_node_and_run_its_epilog,
                             loops_under, mappings)
from spank_sif import sif

pytestmark = [pytest.mark.vm, pytest.mark.slurm, pytest.mark.root]

PASSPHRASE = b"three-node container"
KEY = {"APPTAINER_ENCRYPTION_PASSPHRASE": PASSPHRASE.decode()}
VAR, VALUE = container_images.IMAGE_VARIABLE
# What a task sees from inside its container, in busybox sh: "<host name>,<device-mapper name>,<loop
# device>,<the image's ID>,<the image's variable>". The device is the one under the image's
# /opt/app/bin (the container's root itself may be a scaffold): its number from stat, its name and
# the loop device under it from sysfs (the node's, bound in).
SEEN = ('d=$(stat -c %d /opt/app/bin); dev=$((d >> 8)):$((d & 255));'
        ' echo "$(hostname),$(cat /sys/dev/block/$dev/dm/name),$(ls /sys/dev/block/$dev/slaves)'
        f',$(. /etc/os-release; echo $ID),${VAR}"')


@pytest.fixture(scope="module")
def image(slurm_cluster3):
    """The busybox container image (tests/container_images.py) with the PMI2 program on the image's
    PATH (it exists only there), encrypted by the real cryptsetup (LUKS2, cheap KDF)."""
    d = slurm_cluster3.root / "enc-container"
    d.mkdir(mode=0o755, exist_ok=True)
    squashfs = container_images.build_squashfs(d, "container", programs=(mpi.pmi2_allgather(),))
    with contextlib.chdir(d):  # cryptsetup reencrypt writes a temporary header in its cwd
        payload = reftools.luks_encrypt_payload(squashfs, d / "payload.luks", PASSPHRASE)
    return write_image(d / "enc.sif", payload.read_bytes(), sif.FsType.ENCRYPTED_SQUASHFS)


@pytest.fixture
def cluster3(slurm_cluster3, image):
    """The cluster with the plugin loaded, the mount point on every node's own tmpfs, an empty
    directory for signals to the tasks; no job is left after the test."""
    cluster = slurm_cluster3
    cluster.set_plugin(True)
    cluster.write_site_config(f"mount_point: {cluster.mount_point}\n")
    signals = cluster.root / "signals"
    signals.mkdir(mode=0o755, exist_ok=True)
    for flag in signals.iterdir():
        flag.unlink()
    yield cluster
    cluster.run(["scancel", "--full", "-u", "sifuser"], user="root")
    cluster.wait_jobs_done()


def per_node(seen: list[str]) -> dict[str, tuple[str, str]]:
    """node -> (mapping, loop device) from what tasks saw (SEEN); every task must have been inside
    the image with its environment, and all tasks of a node must see the same mapping."""
    views: dict[str, set] = {}
    for line in seen:
        words = line.split(",")
        assert len(words) == 5 and words[3:] == ["spanksif", VALUE], line
        views.setdefault(words[0], set()).add((words[1], words[2]))
    assert all(len(v) == 1 for v in views.values()), views
    return {node: v.pop() for node, v in views.items()}


def test_mpi_step_inside_containers_on_three_nodes(cluster3, image):
    """``srun --mpi=pmi2 -N3 -n6 --sif-image=enc.sif --sif-container``: each task, inside the image,
    finds the PMI2 program on the image's PATH, publishes what it sees through PMI2 (on the
    descriptor Slurm gave the task, which entering the container keeps) and reads back every task's
    value. The fence holds all six tasks, and so all three nodes' containers, at once; every task
    printing all six values shows they talked across the nodes. Nothing is left on any node."""
    out = cluster3.run(["srun", "--mpi=pmi2", "-N3", "-n6", f"--sif-image={image}", "--sif-container",
                        "sh", "-c", f'exec pmi2_allgather "$({SEEN})"'], env=KEY)
    assert out.returncode == 0, out.stderr
    ranks = sorted(out.stdout.splitlines())
    assert len(ranks) == 6, out.stdout
    values = ranks[0].split(": ", 1)[1]
    assert ranks == [f"rank {r}/6 on {NODES[r // 2]}: {values}" for r in range(6)], out.stdout
    seen = values.split()
    assert [s.split(",")[0] for s in seen] == [node for node in NODES for _ in range(2)]
    check_own_mappings(per_node(seen))
    assert cluster3.wait_no_leftovers() == []


def test_killed_stepd_on_one_node_then_its_epilog_cleans_only_that_node(cluster3, image):
    """``srun -N3 -n6 --sif-container``, the tasks waiting for a signal file, which reaches them
    inside their containers through a user bind (``--sif-binds``; the cluster's directory is not
    among the default binds). While all six run, each node's mapping is checked from outside: the
    kernel has exactly the three, each node's processes have only their own mounted, each over its
    own loop device of the image. Then node2's slurmstepd and tasks die (no exit callback there) and
    node2's epilog runs (by hand, in node2's namespaces, as test_vm_multinode explains): node2 is
    clean; node1's and node3's mappings are untouched (not even marked for deferred removal) and
    keep serving their containers; after scancel nothing is left anywhere."""
    signals = cluster3.root / "signals"
    go_on = signals / "go-on"
    script = f'{SEEN}; while [ ! -e /signals/go-on ]; do sleep 0.5; done; {SEEN}'
    job = Srun(cluster3, ["srun", "-N3", "-n6", f"--sif-image={image}", "--sif-container",
                          f"--sif-binds={signals}:/signals:ro", "sh", "-c", script], KEY)
    victim, others = cluster3.node("node2"), [cluster3.node("node1"), cluster3.node("node3")]
    try:
        nodes = per_node(job.take(6))
        check_own_mappings(nodes)
        assert mappings() == sorted(name for name, _ in nodes.values())   # held at once
        loops = dict(loops_under(cluster3.root))
        for node in cluster3.nodes:
            name, loop = nodes[node.name]
            assert cluster3.mounted_mappings(node) == {name}, node
            assert loops[loop] == str(image), (node, loops)

        jid = crash_node_and_run_its_epilog(cluster3, victim, nodes)
        for node in others:
            check_untouched(cluster3, node, jid, nodes[node.name])
            assert cluster3.mounted_mappings(node) == {nodes[node.name][0]}, node

        go_on.touch()                                     # the others still read the image
        assert per_node(job.take(4)) == {n.name: nodes[n.name] for n in others}
    finally:
        go_on.touch()
        cluster3.run(["scancel", "--full", "-u", "sifuser"], user="root")
        job.finish()
    assert cluster3.wait_no_leftovers() == []
