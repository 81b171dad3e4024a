"""spank-sif: run encrypted Singularity/Apptainer SIF images under Slurm.

Layers, from the SPANK callbacks down to the kernel (data flows one way):

    callbacks (plugin, per SPANK context) -> lifecycle (unlock/mount/release/sweep)
        -> userfiles (open as the user), sif (format), keys, luks2, config
        -> loop, dmcrypt, mounts, state  (the kernel and the node's records)

See docs/architecture.md.
"""

__version__ = "0.1.0"
