"""The golden output of ``spank-sif inspect`` (tests/golden/inspect/): its images, and the command
that writes the files.

The images come from the reference SIF implementation, never from spank-sif's own writer: Debian's
sylabs/sif test images as shipped, and an image laid out the way Apptainer lays out a PEM-encrypted
one, made by the reference library (sifref) with a fixed image ID and time, so that every machine
makes the same image. tests/test_sif_reader.py checks every JSON file field by field against what
the reference's siftool says of its image, every text file against its JSON twin, and that inspect
prints exactly the files. No test writes them. After a deliberate change to inspect's output:

    python3 tests/inspect_golden.py      # from the repository root, with the prefix's Python

then review the diff (git diff tests/golden/) before committing it.
"""
import io
import os
import sys
import tempfile
from contextlib import chdir, redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import reftools  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "inspect"
DEBIAN_IMAGES = ["two-groups-signed.sif", "one-object-crypt-message.sif", "one-object-sbom.sif", "empty.sif",
                 "one-group-signed-legacy-all.sif"]
BUILT_IMAGE = "apptainer-pem.sif"
NAMES = [*DEBIAN_IMAGES, BUILT_IMAGE]
IMAGE_ID = "00010203-0405-0607-0809-0a0b0c0d0e0f"
CREATED_AT = 1700000000


def build_apptainer_pem(directory: Path) -> Path:
    """An image laid out as Apptainer lays out a PEM-encrypted one (definition file, a JSON object,
    the encrypted primary partition, the wrapped key linked to it), by the reference library.
    The partition is a stand-in volume of fixed bytes (inspect reads no further than the table),
    the key pair is new each time (the message's size does not depend on it)."""
    _, sifref = reftools.reftools()
    (directory / "deffile").write_text("Bootstrap: docker\nFrom: alpine\n")
    (directory / "oci-config.json").write_text("{}")
    (directory / "volume").write_bytes(b"LUKS\xba\xbe\0\2" + bytes(8184))
    reftools.run(sifref, "genkey", "-pub", directory / "pub.pem", "-priv", directory / "priv.pem", "-bits", 2048)
    reftools.run(sifref, "randkey", "-o", directory / "luks.key")
    return reftools.sifref_build(directory / BUILT_IMAGE, directory / "volume", deffile=directory / "deffile",
                                 json={"oci-config.json": directory / "oci-config.json"},
                                 pem_pub=directory / "pub.pem", key=directory / "luks.key",
                                 image_id=IMAGE_ID, created_at=CREATED_AT)


def images(directory: Path) -> dict[str, Path]:
    """name -> path of every golden image (the built one made in ``directory``)."""
    found = {name: reftools.SIF_TEST_IMAGES / name for name in DEBIAN_IMAGES}
    found[BUILT_IMAGE] = build_apptainer_pem(directory)
    return found


def inspect_output(path: Path, *flags: str) -> str:
    """What ``spank-sif inspect`` prints for the image, named as given from its own directory
    (so the output does not depend on where the image is)."""
    from spank_sif.cli import main
    out = io.StringIO()
    with chdir(path.parent), redirect_stdout(out):
        assert main(["inspect", path.name, *flags]) == 0
    return out.getvalue()


def golden_file(name: str, fmt: str) -> Path:
    return GOLDEN / f"{name}.{'json' if fmt == 'json' else 'txt'}"


def regenerate() -> list[Path]:
    """Write every golden file from the current inspect; returns those that changed."""
    changed = []
    with tempfile.TemporaryDirectory() as work:
        for name, path in images(Path(work)).items():
            for fmt, flags in (("text", ()), ("json", ("--json",))):
                target, text = golden_file(name, fmt), inspect_output(path, *flags)
                if not target.exists() or target.read_text() != text:
                    target.write_text(text)
                    changed.append(target)
    return changed


if __name__ == "__main__":
    os.environ.setdefault("SPANK_SIF_CONFIG", os.devnull)
    for path in regenerate():
        print(f"rewrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
