"""Tests for visinspect.data.download: safe unpacking, sha256 checks, offline failure. No network."""

import hashlib
import io
import stat
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import pytest

from visinspect.data import download
from visinspect.data.download import (
    ARCHIVE_URLS,
    MVTEC_CATEGORIES,
    MVTEC_PAGE,
    download_categories,
    safe_extract,
    sha256_file,
)
from visinspect.errors import DataError, VisinspectError


def mvtec_files(*categories: str) -> dict[str, bytes]:
    """A tiny MVTec-layout tree: train/good, test/good, test/<defect>, ground_truth/<defect>."""
    files = {}
    for c in categories:
        for rel in ("train/good/000.png", "test/good/000.png", "test/broken/000.png",
                    "ground_truth/broken/000_mask.png"):
            files[f"{c}/{rel}"] = f"{c}:{rel}".encode()
    return files


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    return info, io.BytesIO(data)


def make_tar(path: Path, files: dict[str, bytes], extra=(), mode: str = "w:xz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            tar.addfile(*member(name, data=data))
        for info, data in extra:
            tar.addfile(info, data)
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def assert_tree(root: Path, files: dict[str, bytes]) -> None:
    got = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert got == files


class FakeResponse(io.BytesIO):
    """Stands in for urllib's response: a readable body plus headers."""

    def __init__(self, body: bytes, content_type: str = "application/x-xz"):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body)), "Content-Type": content_type}


# --- safe_extract: good archives --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_in_mvtec_layout_extracts(tmp_path, mode):
    files = mvtec_files("bottle")
    archive = make_tar(tmp_path / "bottle.tar", files, mode=mode)
    dest = tmp_path / "data" / "mvtec_ad"
    assert safe_extract(archive, dest) == [dest / "bottle"]
    assert_tree(dest, files)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["mvtec_ad"]  # no temp folder left


def test_zip_in_mvtec_layout_extracts(tmp_path):
    files = mvtec_files("pill")
    dest = tmp_path / "out"
    assert safe_extract(make_zip(tmp_path / "pill.zip", files), dest) == [dest / "pill"]
    assert_tree(dest, files)


def test_only_takes_requested_top_folders(tmp_path):
    files = {**mvtec_files("bottle", "cable", "pill"), "license.txt": b"CC BY-NC-SA 4.0"}
    dest = tmp_path / "out"
    added = safe_extract(make_tar(tmp_path / "all.tar.xz", files), dest, only={"bottle", "pill"})
    assert added == [dest / "bottle", dest / "pill"]
    assert_tree(dest, mvtec_files("bottle", "pill"))


# --- safe_extract: malicious archives are rejected and leave nothing behind -------------------

TAR_ATTACKS = [  # (member name, tar type, link target, words expected in the error)
    ("../escape.txt", tarfile.REGTYPE, "", "outside"),
    ("bottle/../../escape.txt", tarfile.REGTYPE, "", "outside"),
    ("/tmp/x", tarfile.REGTYPE, "", "absolute"),
    ("bottle/evil", tarfile.SYMTYPE, "/etc/passwd", "symlink"),
    ("bottle/inside", tarfile.SYMTYPE, "train/good/000.png", "symlink"),
    ("bottle/hard", tarfile.LNKTYPE, "bottle/train/good/000.png", "hardlink"),
    ("bottle/dev", tarfile.CHRTYPE, "", "device"),
    ("bottle/blk", tarfile.BLKTYPE, "", "device"),
    ("bottle/fifo", tarfile.FIFOTYPE, "", "fifo"),
]


@pytest.mark.parametrize(("name", "kind", "link", "why"), TAR_ATTACKS)
def test_malicious_tar_is_rejected_and_leaves_nothing(tmp_path, name, kind, link, why):
    # Good members come first, so a half-done extraction would show if it were not cleaned up.
    bad = member(name, kind, data=b"x" if kind == tarfile.REGTYPE else b"", link=link)
    archive = make_tar(tmp_path / "evil.tar.xz", mvtec_files("bottle"), extra=[bad])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=why) as err:
        safe_extract(archive, out / "mvtec_ad")
    assert repr(name) in str(err.value) and str(archive) in str(err.value)
    assert list(out.iterdir()) == []


def zip_symlink() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("bottle/link")
    info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(("bad", "why"), [
    ("../evil.txt", "outside"),
    ("bottle/..\\..\\evil.txt", "outside"),
    ("/abs.txt", "absolute"),
    (zip_symlink(), "symlink"),
])
def test_malicious_zip_is_rejected_and_leaves_nothing(tmp_path, bad, why):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("bottle/train/good/000.png", b"ok")
        zf.writestr(bad, b"/etc/passwd")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=why):
        safe_extract(archive, out / "mvtec_ad")
    assert list(out.iterdir()) == []


def test_corrupt_or_truncated_archive_is_rejected(tmp_path):
    good = make_tar(tmp_path / "good.tar.xz", mvtec_files("bottle")).read_bytes()
    (tmp_path / "noise.tar.xz").write_bytes(b"this is not an archive" * 50)
    (tmp_path / "cut.tar.xz").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="not a tar or zip"):
        safe_extract(tmp_path / "noise.tar.xz", out / "d")
    with pytest.raises(DataError, match="corrupt or truncated"):
        safe_extract(tmp_path / "cut.tar.xz", out / "d")
    assert list(out.iterdir()) == []


def test_existing_target_is_not_overwritten(tmp_path):
    dest = tmp_path / "out"
    (dest / "bottle").mkdir(parents=True)
    (dest / "bottle" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="already exist"):
        safe_extract(make_tar(tmp_path / "b.tar.xz", mvtec_files("bottle")), dest)
    assert [p.name for p in (dest / "bottle").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar.xz", "out"]


def test_sha256_file_streams_to_the_right_digest(tmp_path):
    data = bytes(range(256)) * 10
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=7) == hashlib.sha256(data).hexdigest()
    with pytest.raises(DataError, match="not found"):
        sha256_file(tmp_path / "missing")


# --- download_categories ----------------------------------------------------------------------

def test_table_has_one_official_url_per_category():
    assert len(MVTEC_CATEGORIES) == 15 and set(ARCHIVE_URLS) == set(MVTEC_CATEGORIES)
    for c, url in ARCHIVE_URLS.items():
        assert url.startswith("https://www.mydrive.ch/shares/") and url.endswith(f"/{c}.tar.xz")


def test_download_streams_verifies_and_extracts(tmp_path, capsys):
    body = make_tar(tmp_path / "b.tar.xz", mvtec_files("bottle")).read_bytes()
    calls = []

    def opener(url, timeout):
        calls.append((url, timeout))
        return FakeResponse(body)

    to = tmp_path / "mvtec_ad"
    assert download_categories(["bottle"], to, timeout=5, opener=opener) == [to / "bottle"]
    assert calls == [(ARCHIVE_URLS["bottle"], 5)]
    assert_tree(to, mvtec_files("bottle"))  # and no .part file left
    assert hashlib.sha256(body).hexdigest() in capsys.readouterr().out


@pytest.mark.parametrize("via", ["argument", "published table"])
def test_sha256_mismatch_extracts_nothing(tmp_path, monkeypatch, via):
    body = make_tar(tmp_path / "b.tar.xz", mvtec_files("bottle")).read_bytes()
    sha = None
    if via == "argument":
        sha = "0" * 64
    else:
        monkeypatch.setitem(download.PUBLISHED_SHA256, "bottle.tar.xz", "0" * 64)
    to = tmp_path / "data" / "mvtec_ad"
    with pytest.raises(DataError, match="expected 0000"):
        download_categories(["bottle"], to, sha256=sha,
                            opener=lambda url, timeout: FakeResponse(body))
    assert list(to.iterdir()) == []  # no .part, no bottle/
    assert list(to.parent.iterdir()) == [to]  # no temp folder beside it


def test_matching_sha256_argument_is_accepted(tmp_path, capsys):
    body = make_tar(tmp_path / "b.tar.xz", mvtec_files("bottle")).read_bytes()
    download_categories(["bottle"], tmp_path / "d", sha256=hashlib.sha256(body).hexdigest().upper(),
                        opener=lambda url, timeout: FakeResponse(body))
    assert "sha256 verified" in capsys.readouterr().out


class StallingBody(FakeResponse):
    def read(self, *args):
        raise TimeoutError("timed out")  # = socket.timeout


@pytest.mark.parametrize("failure", [
    urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
    TimeoutError("timed out"),  # what socket.timeout is since Python 3.10
    urllib.error.HTTPError(ARCHIVE_URLS["bottle"], 503, "Service Unavailable", None, None),
    "stalls mid-download",
])
def test_offline_fails_fast_with_manual_route(tmp_path, failure):
    def opener(url, timeout):
        if failure == "stalls mid-download":
            return StallingBody(b"")
        raise failure

    to = tmp_path / "mvtec_ad"
    with pytest.raises(VisinspectError) as err:
        download_categories(["bottle", "pill"], to, opener=opener)
    msg = str(err.value)
    assert not isinstance(err.value, DataError)
    for needed in ("offline", MVTEC_PAGE, "--archive FILE", "--categories bottle,pill",
                   f"{to}/<category>/train/good", "CC BY-NC-SA 4.0", "non-commercial"):
        assert needed in msg
    assert "\n" not in msg
    assert list(to.iterdir()) == []  # the .part file was removed


def test_web_page_instead_of_archive_is_an_error(tmp_path):
    page = FakeResponse(b"<html>please log in</html>", content_type="text/html; charset=utf-8")
    with pytest.raises(VisinspectError, match=r"web page.*Manual route"):
        download_categories(["grid"], tmp_path / "d", opener=lambda url, timeout: page)
    assert list((tmp_path / "d").iterdir()) == []


def test_unknown_category_lists_valid_names(tmp_path):
    def opener(url, timeout):
        raise AssertionError("must not touch the network")

    with pytest.raises(DataError) as err:
        download_categories(["bottle", "bottel"], tmp_path / "d", opener=opener)
    assert "'bottel'" in str(err.value)
    assert all(c in str(err.value) for c in MVTEC_CATEGORIES)
    assert not (tmp_path / "d").exists()


def test_present_category_is_skipped(tmp_path, capsys):
    to = tmp_path / "mvtec_ad"
    for split in ("train", "test"):
        (to / "bottle" / split).mkdir(parents=True)

    def opener(url, timeout):
        raise AssertionError("must not download a present category")

    assert download_categories(["bottle"], to, opener=opener) == [to / "bottle"]
    assert "bottle: already present" in capsys.readouterr().out


def test_manual_archive_takes_only_requested_categories(tmp_path, monkeypatch, capsys):
    files = {**mvtec_files("bottle", "cable"), "license.txt": b"CC BY-NC-SA 4.0", "readme.txt": b""}
    full = make_zip(tmp_path / "mvtec_anomaly_detection.zip", files)
    to = tmp_path / "mvtec_ad"
    assert download_categories(["bottle"], to, archive=full) == [to / "bottle"]
    assert_tree(to, mvtec_files("bottle"))
    assert "could not be verified" in capsys.readouterr().out
    # The same file, had its digest been published, is reported as verified.
    monkeypatch.setitem(download.PUBLISHED_SHA256, full.name, sha256_file(full))
    download_categories(["cable"], to, archive=full)
    assert "matches the published MVTec value" in capsys.readouterr().out
    assert sorted(p.name for p in to.iterdir()) == ["bottle", "cable"]


def test_manual_archive_without_the_category_says_what_it_has(tmp_path):
    archive = make_tar(tmp_path / "cable.tar.xz", mvtec_files("cable"))
    with pytest.raises(DataError, match=r"no top-level folder screw.*it has: cable"):
        download_categories(["screw"], tmp_path / "d", archive=archive)
    with pytest.raises(DataError, match="not found"):
        download_categories(["screw"], tmp_path / "d", archive=tmp_path / "missing.tar.xz")
    assert not (tmp_path / "d").exists()


def test_sha256_argument_needs_a_single_archive(tmp_path):
    with pytest.raises(DataError, match="one category at a time"):
        download_categories(["bottle", "pill"], tmp_path / "d", sha256="0" * 64,
                            opener=lambda url, timeout: FakeResponse(b""))
