"""The VM harness: runs the tests that need dm-crypt under a real kernel (virtme-ng, Debian's kernel).

- ``capability``: does this machine have dm-crypt (or are we already inside the VM)?
- ``harness``: boot one VM and run a command in it as root (``run_in_vm``).
- ``guest``: what runs first inside the VM (modules, tmpfs work directory, then the command).
- ``plugin``: the pytest side: ``@pytest.mark.vm`` items become proxies of one in-VM pytest run.
- ``fixtures``: reference SIF images built inside the VM the way Apptainer builds them (``ref_images``).
See docs/testing.md.
"""
