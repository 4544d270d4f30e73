"""Hostile archives and paths: zip slip, symlinks, bombs, non-zips, folders outside the roots."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest
from test_data_images import make_photo

from tlcore.data.archive import UnsafeArchive, ZipLimits, safe_extract_zip
from tlcore.data.sources import SourceNotAllowed, allowed_roots, resolve_under_roots


def snapshot(root: Path) -> dict[str, int]:
    """Every path under `root` with its size, to prove nothing changed."""
    return {str(p.relative_to(root)): p.lstat().st_size for p in sorted(root.rglob("*"))}


@pytest.fixture
def sandbox(tmp_path):
    """tmp/sandbox/{zips, out, sentinel}: extraction goes to out/, sentinel/ must never change."""
    base = tmp_path / "sandbox"
    for d in ("zips", "out", "sentinel"):
        (base / d).mkdir(parents=True)
    (base / "sentinel" / "keep.txt").write_text("untouched")
    return base


def write_zip(path: Path, entries: list[tuple[str, bytes]], *, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def add_symlink(path: Path, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(info, target)


def test_good_zip_extracts_and_skips_litter(sandbox):
    z = write_zip(sandbox / "zips" / "ok.zip", [
        ("cats/a cat.jpg", make_photo(seed=1)),
        ("dogs/ünï $(rm -rf x) ;&.jpg", make_photo(seed=2)),
        ("__MACOSX/cats/._a cat.jpg", b"resource fork"),
        ("cats/.DS_Store", b"x"),
        ("dogs/Thumbs.db", b"x"),
        (".hidden/secret.jpg", make_photo(seed=3)),
    ])
    out = safe_extract_zip(z, sandbox / "out")
    names = sorted(p.relative_to(out.dest).as_posix() for p in out.files)
    assert names == ["cats/a cat.jpg", "dogs/ünï $(rm -rf x) ;&.jpg"]
    assert len(out.ignored) == 4
    assert not (sandbox / "out" / "__MACOSX").exists()


@pytest.mark.parametrize("entry", ["../evil.jpg", "cats/../../evil.jpg", "/abs/evil.jpg",
                                   "C:/evil.jpg", "..\\evil.jpg", "C:\\Windows\\evil.jpg"])
def test_zip_slip_is_refused(sandbox, entry):
    before = snapshot(sandbox / "sentinel")
    z = write_zip(sandbox / "zips" / "slip.zip", [("cats/ok.jpg", make_photo()), (entry, b"pwned")])
    with pytest.raises(UnsafeArchive) as info:
        safe_extract_zip(z, sandbox / "out" / "x")
    assert info.value.reason == "zip_slip" and "zip slip" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not (sandbox / "out" / "evil.jpg").exists() and not (sandbox / "evil.jpg").exists()
    assert not Path("/abs/evil.jpg").exists()
    assert snapshot(sandbox / "sentinel") == before
    assert not list((sandbox / "out" / "x").rglob("*"))  # refused before writing anything


def test_symlink_entry_is_refused(sandbox):
    z = write_zip(sandbox / "zips" / "link.zip", [("cats/ok.jpg", make_photo())])
    add_symlink(z, "cats/passwd.jpg", "/etc/passwd")
    with pytest.raises(UnsafeArchive) as info:
        safe_extract_zip(z, sandbox / "out")
    assert info.value.reason == "symlink" and "symbolic link" in str(info.value)
    assert not any(p.is_symlink() for p in (sandbox / "out").rglob("*"))


def test_non_zip_renamed_zip(sandbox):
    fake = sandbox / "zips" / "photos.zip"
    fake.write_bytes(b"Rar!\x1a\x07\x00" + b"\x00" * 100)
    with pytest.raises(UnsafeArchive) as info:
        safe_extract_zip(fake, sandbox / "out")
    assert info.value.reason == "not_zip"
    assert "photos.zip is not a zip archive" in str(info.value)


def test_high_ratio_bomb_is_refused_from_the_header(sandbox):
    z = write_zip(sandbox / "zips" / "bomb.zip", [("cats/zeros.jpg", b"\0" * (20 * 1024**2))])
    assert z.stat().st_size < 100_000
    with pytest.raises(UnsafeArchive) as info:
        safe_extract_zip(z, sandbox / "out")
    assert info.value.reason == "zip_bomb" and "fold" in str(info.value)
    assert not list((sandbox / "out").rglob("*.jpg"))


def test_lying_header_is_caught_while_streaming(sandbox):
    # Forge the sizes in both headers: declared 1 KB, really 5 MB of zeros.
    z = write_zip(sandbox / "zips" / "liar.zip", [("cats/a.jpg", b"\0" * (5 * 1024**2))])
    data = bytearray(z.read_bytes())
    real = (5 * 1024**2).to_bytes(4, "little")
    fake = (1024).to_bytes(4, "little")
    assert data.count(real) == 2
    z.write_bytes(bytes(data).replace(real, fake))
    with pytest.raises(UnsafeArchive) as info:
        safe_extract_zip(z, sandbox / "out", ZipLimits(max_ratio=1e9))
    # zipfile stops at the declared size and then fails the CRC; either way it is refused
    assert info.value.reason in ("zip_bomb", "corrupt")
    written = [p.stat().st_size for p in (sandbox / "out").rglob("*.jpg")]
    assert all(size <= 1024 * 1024 for size in written)  # stopped at the first chunk


def test_total_budget(sandbox):
    z = write_zip(sandbox / "zips" / "big.zip",
                  [(f"c/{i}.jpg", os.urandom(300_000)) for i in range(4)], compression=zipfile.ZIP_STORED)
    with pytest.raises(UnsafeArchive) as info:
        safe_extract_zip(z, sandbox / "out", ZipLimits(max_total_bytes=1_000_000))
    assert info.value.reason == "too_large" and "GiB" in str(info.value)


def test_too_many_entries(sandbox):
    z = write_zip(sandbox / "zips" / "many.zip", [(f"c/{i}.jpg", b"") for i in range(60)],
                  compression=zipfile.ZIP_STORED)
    with pytest.raises(UnsafeArchive) as info:
        safe_extract_zip(z, sandbox / "out", ZipLimits(max_entries=50))
    assert info.value.reason == "too_many_entries" and "60 entries" in str(info.value)
    assert not list((sandbox / "out").rglob("*"))


def test_duplicate_entry_names(sandbox):
    z = sandbox / "zips" / "dup.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("c/a.jpg", b"one")
        with pytest.warns(UserWarning):
            zf.writestr("c/a.jpg", b"two")
    with pytest.raises(UnsafeArchive) as info:
        safe_extract_zip(z, sandbox / "out")
    assert info.value.reason == "duplicate_entry"


# ------------------------------------------------------------- server roots


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "data_root"
    (root / "cats_dogs" / "cats").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    return root, outside


def test_allowed_roots_from_env(monkeypatch, roots):
    root, outside = roots
    monkeypatch.setenv("TLCORE_DATA_ROOTS", f"{root}{os.pathsep}{outside}{os.pathsep}")
    assert allowed_roots() == [root.resolve(), outside.resolve()]
    assert allowed_roots(extra=[root]) == [root.resolve(), outside.resolve()]
    monkeypatch.delenv("TLCORE_DATA_ROOTS")
    assert allowed_roots() == []


def test_inside_root_resolves(roots):
    root, _ = roots
    assert resolve_under_roots(root / "cats_dogs", [root]) == (root / "cats_dogs").resolve()


@pytest.mark.parametrize("how", ["etc", "dotdot", "symlink", "prefix-trick"])
def test_outside_roots_refused(roots, how):
    root, outside = roots
    if how == "etc":
        path = Path("/etc")
    elif how == "dotdot":
        path = root / ".." / "outside"
    elif how == "symlink":
        (root / "link").symlink_to(outside, target_is_directory=True)
        path = root / "link"
    else:  # /tmp/data_root_evil is not under /tmp/data_root
        path = root.parent / (root.name + "_evil")
        path.mkdir()
    with pytest.raises(SourceNotAllowed) as info:
        resolve_under_roots(path, [root])
    message = str(info.value)
    assert "outside the folders open for import" in message and str(root.resolve()) in message
    assert isinstance(info.value, ValueError)


def test_no_roots_configured(monkeypatch, roots):
    monkeypatch.delenv("TLCORE_DATA_ROOTS", raising=False)
    with pytest.raises(SourceNotAllowed, match="TLCORE_DATA_ROOTS"):
        resolve_under_roots(roots[0])


def test_missing_folder_under_root(roots):
    with pytest.raises(FileNotFoundError):
        resolve_under_roots(roots[0] / "nope", [roots[0]])
