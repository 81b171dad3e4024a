"""What spank-sif tells the admin it does: one sink, filtered by the site's ``log_level``.

The node engine reports each step it takes (image opened, loop device, mapping and keyslot,
mount, teardown) at ``verbose`` or ``debug``. Inside Slurm the plugin points the sink at slurmd's
log (``spank.log``); elsewhere nothing is printed unless a command asks for it. Never log a key:
callers pass names, paths, devices and numbers only.
"""
LEVELS = ("error", "info", "verbose", "debug")

_sink = None
_threshold = LEVELS.index("info")


def configure(sink, level: str = "info") -> None:
    """Send messages up to ``level`` to ``sink(level, message)``; ``sink=None`` silences them."""
    global _sink, _threshold
    _sink, _threshold = sink, LEVELS.index(level)


def _emit(level: str, message: str) -> None:
    if _sink is not None and LEVELS.index(level) <= _threshold:
        _sink(level, message)


def error(message: str) -> None:
    _emit("error", message)


def info(message: str) -> None:
    _emit("info", message)


def verbose(message: str) -> None:
    _emit("verbose", message)


def debug(message: str) -> None:
    _emit("debug", message)
