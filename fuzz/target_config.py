"""Target ``config``: the site configuration file, read by ``config.load_config`` as the plugin reads it.

Input: the file's bytes (any encoding problem included). A configuration that loads must hold
values of the documented types and ranges.
"""
import os

from fuzz import harness
from fuzz.harness import check
from spank_sif import config, keys

MAX_LEN = 2048  # a real configuration is a few hundred bytes
# PyYAML's scanner looks up to 1024 characters back for each token of a deeply nested flow
# collection ("[[[[..."): bounded, but seconds under the fuzzer's instrumentation, so a longer
# limit than the other targets' before an input counts as a hang.
TIMEOUT_S = 30
TOKENS = [*(f"{k}: ".encode() for k in config.SiteConfig._fields if k != "source"),
          b"true", b"false", b"yes", b"off", b"null", b"~", b"[]", b"{}", b"- ", b"---", b"...",
          b"&a ", b"*a", b"<<: ", b"? ", b"!!binary ", b"!!timestamp ", b"!!int ", b"!!str ", b"!!set ",
          b"!!omap ", b"!!python/name:os.system", b"%YAML 1.1", b"%TAG ! tag:x,2000:", b"2001-12-14",
          b"2001-12-14t21:59:43.10-05:00", b"0x1F", b"0o17", b"0b101", b"1_000", b"190:20:30",
          b".inf", b"-.nan", b"1e3", b"|\n", b">-\n", b"\t", b"\\x00", b'"\\u00e9"', b"/sif",
          b"APPTAINER_ENCRYPTION_PASSPHRASE", b"_PEM_PATH", b"debug"]


def run(data: bytes) -> str:
    fd = harness.scratch_file(data)
    return harness.outcome(lambda: _use(fd))


def _use(fd: int) -> None:
    c = config.load_config(f"/proc/self/fd/{fd}")  # reopened and read as the plugin reads the file
    for path in (c.mount_point, c.state_dir, *c.allowed_image_paths):
        check(isinstance(path, str) and os.path.isabs(path) and "\0" not in path, "a path not absolute")
    check(c.mount_point != "/", "mount point /")
    check(bool(c.key_variables) and all(isinstance(v, str) and keys.kind_of(v) is not None
                                        for v in c.key_variables), "key variable without a known kind")
    for flag in (c.strip_key_variables, c.allow_unencrypted):
        check(flag is True or flag is False, "a flag that is not a bool")
    for number in (c.kdf_max_memory_kib, c.kdf_max_parallel):
        check(type(number) is int and number >= 1, "a count below 1 or not an int")
    check(c.log_level in config.LOG_LEVELS, "log level")
