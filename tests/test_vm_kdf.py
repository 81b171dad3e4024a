"""Security findings 1 and 2 on a kernel with dm-crypt: what the node checks is exactly what runs,
whatever the image's header copies say or however the file changes during the unlock; every cost
is capped before it runs; the node's KDF lock is held for the derivation alone and waited for
with a deadline. And verify-key and the node give cryptsetup's answer on every image of a table
(reference images, damaged ones, copies that disagree), right and wrong keys.

Costs that must not run are shown from outside: the unlock runs in a child that cannot map much
more memory than it started with (RLIMIT_AS), so a derivation that did run would fail with
ENOMEM instead of the policy error, and its time is compared with what the derivation takes."""
import contextlib
import fcntl
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import luks_cases
import reftools
from engine_helpers import site  # noqa: F401 - a pytest fixture
from engine_helpers import USER, ensure_users, in_child, leftovers, measured, world_dir
from spank_sif import keys, lifecycle, sif
from spank_sif.cli import main as cli_main
from spank_sif.config import SiteConfig
from spank_sif.userfiles import User

pytestmark = pytest.mark.vm

OTHER_KEY = b"the other keyslot's passphrase"
MIB = 1 << 20


def _partition(image: Path):
    fd = os.open(image, os.O_RDONLY)
    try:
        return sif.read_sif(fd).primary_partition()
    finally:
        os.close(fd)


def _read(path: Path, offset: int, length: int) -> bytearray:
    with open(path, "rb") as f:
        f.seek(offset)
        return bytearray(f.read(length))


def _world_copy(source: Path, dest: Path) -> Path:
    shutil.copyfile(source, dest)
    dest.chmod(0o644)
    return dest


@pytest.fixture(scope="module")
def work():
    ensure_users()
    path = world_dir("sif-vm-kdf-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _unlock(image: Path, env: dict, config: SiteConfig):
    """The node engine on ``image`` as the job's user; released at once. "opened" or raises."""
    unlocked = lifecycle.unlock(str(image), User.from_name(USER), env, "cli", config)
    lifecycle.release(unlocked, config)
    return "opened"


# ---------------------------------------------------------------------------------------------
# The table: verify-key, the node and cryptsetup open --test-passphrase give the same answer.

KEYS = {"a": None, "b": OTHER_KEY, "wrong": b"not the passphrase"}  # "a": the reference passphrase


def _only(meta: dict, slot: str) -> dict:
    return luks_cases.only_keyslot(meta, slot)


def _two_copies(primary_slot, primary_seq, secondary_slot, secondary_seq, primary_extra=None):
    def edit(region, meta, seq):
        luks_cases.set_copy(region, 0, {**_only(meta, primary_slot), **(primary_extra or {})}, seq + primary_seq)
        luks_cases.set_copy(region, 1, _only(meta, secondary_slot), seq + secondary_seq)
    return edit


def _both(change):
    def edit(region, meta, seq):
        luks_cases.set_copy(region, 0, change(meta), seq)
        luks_cases.set_copy(region, 1, change(meta), seq)
    return edit


def _flip(*offsets):
    def edit(region, meta, seq):
        for offset in offsets:
            region[offset] ^= 1
    return edit


# name -> (how the header region of the two-keyslot volume is edited, or None for special images;
#          {key: expected answer}). The two-keyslot volume: keyslot 0 opened by "a", 1 by "b".
DERIVED = {
    "both-keyslots": (_flip(), {"a": "opens", "b": "opens", "wrong": "wrong key"}),
    "corrupt-primary": (_flip(5000), {"a": "opens", "b": "opens", "wrong": "wrong key"}),
    "corrupt-secondary": (_flip(16384 + 5000), {"a": "opens", "b": "opens", "wrong": "wrong key"}),
    "corrupt-both": (_flip(5000, 16384 + 5000), {"a": "refused", "wrong": "refused"}),
    "truncated-keyslot-area": (None, {"a": "refused", "wrong": "refused"}),
    "unknown-token": (_both(lambda m: {**m, "tokens": {"0": {"type": "spank-sif-test", "keyslots": []}}}),
                      {"a": "opens", "wrong": "wrong key"}),
    "rejected-token": (_both(lambda m: {**m, "tokens": luks_cases.REJECTED_TOKENS}),
                       {"a": "refused", "wrong": "refused"}),
    "newer-secondary": (_two_copies("0", 0, "1", 1), {"a": "wrong key", "b": "opens", "wrong": "wrong key"}),
    "newer-primary": (_two_copies("0", 1, "1", 0), {"a": "opens", "b": "wrong key", "wrong": "wrong key"}),
    "equal-seqids": (_two_copies("0", 0, "1", 0), {"a": "opens", "b": "wrong key", "wrong": "wrong key"}),
    "newer-primary-rejected-token": (_two_copies("1", 5, "0", 0, {"tokens": luks_cases.REJECTED_TOKENS}),
                                     {"a": "opens", "b": "wrong key", "wrong": "wrong key"}),
}
REFERENCE = {  # ref_images attribute -> {key: expected}
    "fast_pass_4k": {"a": "opens", "wrong": "wrong key"},
    "fast_pass_512": {"a": "opens", "wrong": "wrong key"},
    "enc_pass": {"a": "opens", "wrong": "wrong key"},
    "fast_pem_4k": {"pem": "opens", "wrong": "wrong key"},
}
TABLE = [(name, key, expected) for name, (_, answers) in DERIVED.items() for key, expected in answers.items()]
TABLE += [(name, key, expected) for name, answers in REFERENCE.items() for key, expected in answers.items()]


class Table:
    """The table's images, built once per session in a directory the job's user can read."""

    def __init__(self, ref, work: Path):
        self.ref, self.dir = ref, work
        self.passphrase = ref.pass_file.read_bytes()
        self.pem = _world_copy(ref.pem_private, work / "key.pem")
        self.images = {name: _world_copy(getattr(ref, name), work / f"{name}.sif") for name in REFERENCE}
        base = self.images["fast_pass_4k"]
        part = _partition(base)
        volume = work / "two-keyslots.luks"
        volume.write_bytes(_read(base, part.offset, part.size))
        (work / "a.key").write_bytes(self.passphrase)
        (work / "b.key").write_bytes(OTHER_KEY)
        reftools.run("cryptsetup", "luksAddKey", "--batch-mode", "--disable-locks", *luks_cases.KDFS["pbkdf2"],
                     "--key-slot", "1", "--key-file", work / "a.key", volume, work / "b.key")
        region, _ = luks_cases.header_region(volume)
        meta, seq = luks_cases.metadata(region), luks_cases.seqid(region, 0)
        for name, (edit, _) in DERIVED.items():
            image = work / f"{name}.sif"
            if edit is None:  # the volume ends inside its keyslot area
                cut = work / "truncated.luks"
                cut.write_bytes(volume.read_bytes()[:100_000])
                reftools.sifref_build(image, cut, fs="encrypted")
                image.chmod(0o644)
            else:
                _world_copy(base, image)
                edited = bytearray(region)
                edit(edited, meta, seq)
                luks_cases.patch(image, part.offset, volume.read_bytes()[:16 * MIB])
                luks_cases.patch(image, part.offset, edited)
            self.images[name] = image

    def key(self, name: str) -> bytes:
        return self.passphrase if name == "a" else KEYS[name]


@pytest.fixture(scope="session")
def table(ref_images, tmp_path_factory):
    ensure_users()
    path = world_dir("sif-vm-kdf-table-")
    yield Table(ref_images, path)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _partition_loop(image: Path):
    part = _partition(image)
    loop = subprocess.run(["losetup", "-f", "--show", "-r", "-o", str(part.offset), "--sizelimit",
                           str(part.size), str(image)], capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def _cryptsetup_answer(image: Path, key: bytes) -> str:
    with _partition_loop(image) as loop:
        tested = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--type", "luks2", "--key-file", "-",
                                 loop], input=key, capture_output=True, check=False)
    return {0: "opens", 2: "wrong key"}.get(tested.returncode, "refused")


def _verify_key_answer(image: Path, flags: list, monkeypatch, tmp_path) -> tuple:
    defaults = tmp_path / "defaults.yaml"
    defaults.write_bytes(b"")
    monkeypatch.setenv("SPANK_SIF_CONFIG", str(defaults))
    for name in keys.DEFAULT_KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["verify-key", str(image), *map(str, flags)])
    return {0: "opens", 2: "wrong key"}.get(code, "refused"), err.getvalue()


def _node_answer(image: Path, env: dict, config: SiteConfig) -> tuple:
    status, result = in_child(_unlock, image, env, config)
    if status == 0:
        return "opens", result
    return ("wrong key" if result.startswith("WrongKeyError") else "refused"), result


@pytest.mark.parametrize("name, key, expected", TABLE, ids=[f"{n}-{k}" for n, k, _ in TABLE])
def test_verify_key_and_the_node_answer_as_cryptsetup(table, site, monkeypatch, tmp_path, name, key, expected):
    config, state = site
    image = table.images[name]
    if key == "pem":
        raw, flags = table.ref.pem_key.read_bytes(), ["--pem-path", table.pem]
        env = {"APPTAINER_ENCRYPTION_PEM_PATH": str(table.pem)}
    else:
        raw = table.key(key)
        keyfile = tmp_path / "key"
        keyfile.write_bytes(raw)
        flags, env = ["--passphrase-file", keyfile], {"APPTAINER_ENCRYPTION_PASSPHRASE": raw.decode()}
    answers = {"cryptsetup": _cryptsetup_answer(image, raw)}
    answers["verify-key"], said = _verify_key_answer(image, flags, monkeypatch, tmp_path)
    answers["node"], result = _node_answer(image, env, config)
    assert answers == dict.fromkeys(answers, expected), (said, result)
    assert leftovers(image, state) == []


# ---------------------------------------------------------------------------------------------
# Costs that must not run, shown from outside.


def _argon2_seconds(memory_kib: int) -> float:
    """One pass of Argon2id over ``memory_kib`` here, timed now: the yardstick for "far less"."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    start = time.monotonic()
    Argon2id(salt=b"s" * 16, length=32, iterations=1, lanes=1, memory_cost=memory_kib).derive(b"x")
    return time.monotonic() - start


def _hostile(ref, work: Path, name: str, edit) -> Path:
    """A copy of the cheap reference image whose LUKS2 header region went through ``edit``."""
    image = _world_copy(ref.fast_pass_4k, work / f"{name}.sif")
    part = _partition(image)
    luks_cases.patch(image, part.offset, edit(_read(image, part.offset, 2 * 16384)))
    return image


def test_two_copy_attack_is_refused_before_any_derivation(ref_images, work, site):
    """The reproduced attack, on the node: the newer primary copy shows the cheap keyslot and a
    token libcryptsetup rejects; the secondary, the one libcryptsetup uses, claims Argon2id at 4 GiB.
    Refused with the policy error in a child that cannot map 1 GiB more than it started with, in
    far less time than the derivation takes; no lock taken, nothing left behind."""
    config, state = site
    image = _hostile(ref_images, work, "attack", luks_cases.hostile_two_copies)
    env = {"APPTAINER_ENCRYPTION_PASSPHRASE": ref_images.pass_file.read_text()}
    status, result, seconds, _ = measured(_unlock, image, env, config, headroom=1 << 30, timeout=600)
    assert status == 1 and result.startswith("PolicyError: the image's key derivation (keyslot 0: argon2id, "
                                             "4194304 KiB"), result
    yardstick = _argon2_seconds(64 * 1024) * 64 * 4  # 4 GiB is 64 x 64 MiB, at 4 passes
    assert seconds < yardstick / 10, (seconds, yardstick)
    assert not (state / "kdf.log").exists()  # the lock was never even taken
    assert leftovers(image, state) == []


class SlotHolder:
    """Another process holding every KDF slot of the node (the unlock under test must not inherit
    the locks, so they are not taken in this process) until ``release()``. Released by a byte on a
    pipe, not by its end of file: the unlock forked meanwhile holds a copy of the pipe too."""

    def __init__(self, state: Path, slots: int):
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        ready_r, ready_w = os.pipe()
        go_r, self._go_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                for index in range(slots):
                    fd = os.open(state / f"kdf.{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(ready_w, b"1")
                os.read(go_r, 1)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(go_r)
        assert os.read(ready_r, 1) == b"1"
        os.close(ready_r)

    def release(self) -> None:
        if self.pid:
            os.write(self._go_w, b"1")
            os.close(self._go_w)
            os.waitpid(self.pid, 0)
            self.pid = 0


def _waiting_for_the_lock(state: Path, pid: int, timeout: float = 300) -> None:
    """Until the unlock in ``pid`` has written its mapping record: the last thing before the lock."""
    deadline = time.monotonic() + timeout
    while not list(state.rglob("*~mapping.json")):
        if time.monotonic() > deadline or os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            raise AssertionError("the unlock never reached the KDF lock")
        time.sleep(0.05)
    time.sleep(0.5)


def _expensive(region: bytearray, memory_kib: int) -> bytearray:
    """Both header copies claim Argon2id at ``memory_kib`` for keyslot 0, one sequence id newer."""
    out = bytearray(region)
    meta, seq = luks_cases.metadata(out), luks_cases.seqid(out, 0) + 1
    for copy in (0, 1):
        luks_cases.set_copy(out, copy, luks_cases.with_kdf(meta, "0", {"type": "argon2id", "time": 1,
                                                                       "memory": memory_kib, "cpus": 1}), seq)
    return out


def _open_read_release(image: Path, env: dict, config: SiteConfig, target: Path):
    """Unlock, mount, read hello.txt, release: (its bytes, when the device node appeared)."""
    unlocked = lifecycle.unlock(str(image), User.from_name(USER), env, "cli", config)
    try:
        node_time = os.lstat(unlocked.device).st_ctime
        lifecycle.mount(unlocked, str(target), private=False)
        return (target / "hello.txt").read_bytes(), node_time
    finally:
        lifecycle.release(unlocked, config)


def test_the_file_rewritten_while_the_unlock_waits_for_the_lock(ref_images, work, site, tmp_path):
    """While the unlock waits for the node's KDF lock (held here), the image's owner replaces both
    header copies with an Argon2id keyslot far above the cap and zeroes the keyslot's key material.
    The unlock still opens the image with the header it checked, without reading the file under the
    lock (the key material came from the snapshot) and without the expensive derivation (the child
    could not have mapped it); the device-mapper device appears only after the lock is released."""
    config, state = site
    config = config._replace(kdf_max_memory_kib=64 * 1024)
    image = _world_copy(ref_images.fast_pass_4k, work / "rewritten.sif")
    part = _partition(image)
    region = _read(image, part.offset, 2 * 16384)
    material = int(luks_cases.metadata(region)["keyslots"]["0"]["area"]["offset"])
    target = tmp_path / "mnt"
    target.mkdir()
    env = {"APPTAINER_ENCRYPTION_PASSPHRASE": ref_images.pass_file.read_text()}
    holder = SlotHolder(state, config.kdf_max_parallel)

    def rewrite_then_release(pid):
        try:
            _waiting_for_the_lock(state, pid)
            luks_cases.patch(image, part.offset, _expensive(region, 1024 * 1024))
            luks_cases.patch(image, part.offset + material, bytes(256000))
        finally:
            holder.release()

    try:
        status, result, _, _ = measured(_open_read_release, image, env, config, target, headroom=512 * MIB,
                                        during=rewrite_then_release, timeout=600)
    finally:
        holder.release()
    assert status == 0, result
    hello, node_time = result
    assert hello == ref_images.hello
    _, _, released = (state / "kdf.log").read_text().split()
    assert float(released) <= node_time
    assert leftovers(image, state, target) == []


def _swap_forever(image: Path, offset: int, regions: list) -> None:
    while True:
        for region in regions:
            luks_cases.patch(image, offset, region)
            time.sleep(0.002)


def test_a_header_swapped_in_a_loop_never_raises_the_cost(ref_images, work, site, tmp_path):
    """Another process swaps the header between the cheap one and one far above the cap while
    unlocks run: each unlock opens (it checked the cheap one) or is refused (it checked the
    expensive one), and none ever runs the expensive derivation (it would have failed for memory)."""
    config, state = site
    config = config._replace(kdf_max_memory_kib=64 * 1024)
    image = _world_copy(ref_images.fast_pass_4k, work / "swapped.sif")
    part = _partition(image)
    cheap = _read(image, part.offset, 2 * 16384)
    env = {"APPTAINER_ENCRYPTION_PASSPHRASE": ref_images.pass_file.read_text()}
    swapper = os.fork()
    if swapper == 0:
        try:
            _swap_forever(image, part.offset, [cheap, _expensive(cheap, 1024 * 1024)])
        finally:
            os._exit(0)
    outcomes = []
    try:
        for _ in range(8):
            status, result, _, max_rss = measured(_unlock, image, env, config, headroom=512 * MIB, timeout=600)
            outcomes.append(result)
            assert result == "opened" or result.startswith(("PolicyError", "ImageError", "UnsupportedImageError")), \
                outcomes
            assert max_rss < 1024 * 1024, max_rss  # KiB: the 1 GiB derivation never ran
    finally:
        os.kill(swapper, 9)
        os.waitpid(swapper, 0)
    assert leftovers(image, state) == []


def test_waiting_for_the_lock_has_a_deadline(ref_images, work, site):
    config, state = site
    config = config._replace(kdf_lock_timeout=2)
    image = _world_copy(ref_images.fast_pass_4k, work / "waiting.sif")
    env = {"APPTAINER_ENCRYPTION_PASSPHRASE": ref_images.pass_file.read_text()}
    holder = SlotHolder(state, config.kdf_max_parallel)
    try:
        status, result, seconds, _ = measured(_unlock, image, env, config, timeout=300)
    finally:
        holder.release()
    assert status == 1 and "\n" not in result
    assert result.startswith("SystemSetupError: gave up after 2 s waiting for this node's key-derivation slot "
                             "(kdf_max_parallel: 1)"), result
    assert "kdf_lock_timeout" in result and 2 <= seconds < 60
    assert leftovers(image, state) == []
