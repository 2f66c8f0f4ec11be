"""Fetch MVTec AD categories from MVTec's own links, check their sha256, unpack them safely.

Where the links and hashes come from (public code, not invented here):
- Full archive URL and sha256: anomalib, src/anomalib/data/datamodules/image/mvtecad.py
  (DOWNLOAD_INFO; anomalib checks it with hashlib.sha256). Torchvision-style loaders give its md5
  as eefca59f2cede9c3fc5b6befbfec275e.
- Per-category archives: the same MVTec share on mydrive.ch as anomalib's full-archive link, as
  listed in several public MVTec AD loaders. No published sha256 was found for them, so for those we
  print the digest of what arrived and say plainly that it could not be verified.
MVTec re-issues these share links from time to time; when one stops working, the manual route in
the error message (download in a browser, pass the file with --archive) always does.
MVTec AD is licensed CC BY-NC-SA 4.0: non-commercial use only.
"""

import hashlib
import http.client
import lzma
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from tqdm.auto import tqdm

from visinspect.errors import DataError, VisinspectError

MVTEC_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
_SHARE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/download/"
_FILE_IDS = {
    "bottle": "420937370-1629958698", "cable": "420937413-1629958794",
    "capsule": "420937454-1629958872", "carpet": "420937484-1629959013",
    "grid": "420937487-1629959044", "hazelnut": "420937545-1629959162",
    "leather": "420937607-1629959262", "metal_nut": "420937637-1629959294",
    "pill": "420938129-1629960351", "screw": "420938130-1629960389",
    "tile": "420938133-1629960456", "toothbrush": "420938134-1629960477",
    "transistor": "420938166-1629960554", "wood": "420938383-1629960649",
    "zipper": "420938385-1629960680",
}  # fmt: skip
MVTEC_CATEGORIES: tuple[str, ...] = tuple(_FILE_IDS)
ARCHIVE_URLS: dict[str, str] = {c: f"{_SHARE}{i}/{c}.tar.xz" for c, i in _FILE_IDS.items()}
FULL_ARCHIVE_URL = f"{_SHARE}420938113-1629960298/mvtec_anomaly_detection.tar.xz"
# Archive file name -> published sha256. Only the full archive has one (see the module docstring).
PUBLISHED_SHA256: dict[str, str] = {
    "mvtec_anomaly_detection.tar.xz":
        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
}  # fmt: skip

# What reading a broken or truncated archive (per compression) or writing to a full disk raises.
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError, zlib.error, OSError)
_NETWORK = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
_ZIP_KINDS = {0: "file", stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB archives never sit in memory."""
    if not Path(path).is_file():
        raise DataError(f"file {path} not found; check the path")
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _tar_kind(m: tarfile.TarInfo) -> str:
    kinds = (("file", m.isfile), ("dir", m.isdir), ("symlink", m.issym), ("hardlink", m.islnk),
             ("device file or fifo", m.isdev))
    return next((kind for kind, test in kinds if test()), "special member")


def _open(archive: Path) -> tarfile.TarFile | zipfile.ZipFile:
    """Open a zip, or a tar with any compression; DataError if it is neither."""
    if zipfile.is_zipfile(archive):
        return zipfile.ZipFile(archive)
    try:
        return tarfile.open(archive, "r:*")
    except tarfile.TarError as e:
        raise DataError(f"{archive} is not a tar or zip archive ({e})") from e


_Member = tuple[str, str, Callable[[], IO[bytes]]]  # (name, kind, open its bytes)


def _members(opened: tarfile.TarFile | zipfile.ZipFile) -> Iterator[_Member]:
    """Yield (name, kind, open_fn) for every member, in archive order, without extracting."""
    if isinstance(opened, zipfile.ZipFile):
        for info in opened.infolist():
            mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3 = Unix
            kind = "dir" if info.is_dir() else _ZIP_KINDS.get(stat.S_IFMT(mode), "special file")
            yield info.filename, kind, lambda info=info: opened.open(info)
    else:
        for m in opened:  # streamed: a 5 GB .tar.xz is decompressed once
            yield m.name, _tar_kind(m), lambda m=m: opened.extractfile(m)


def _checked(root: Path, name: str, kind: str, archive: Path) -> PurePosixPath:
    """Member `name` as a relative path; DataError unless it is a plain file/folder inside root."""
    where = f"member {name!r} of archive {archive}"
    if kind not in ("file", "dir"):
        raise DataError(f"{where} is a {kind}; refusing an archive with links or special files")
    rel = PurePosixPath(name.replace("\\", "/"))  # zips made on Windows may use backslashes
    if rel.is_absolute() or PureWindowsPath(name).drive:
        raise DataError(f"{where} is an absolute path; refusing to extract it")
    if ".." in rel.parts or not (root / rel).resolve().is_relative_to(root.resolve()):
        raise DataError(f"{where} would land outside the destination folder; refusing it")
    return rel


def safe_extract(archive: Path, dest: Path, *, only: Collection[str] | None = None) -> list[Path]:
    """Unpack a tar (plain/gz/bz2/xz) or zip archive into dest; return the top-level paths added.

    Every member is checked (no absolute paths, '..', links, devices or fifos) and the archive is
    unpacked into a temporary sibling of dest, moved into place only once all of it passed: a
    rejected archive leaves nothing behind. `only` keeps just these top-level folders (e.g. a few
    categories out of the full MVTec archive); each of them must be in the archive.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataError(f"archive {archive} not found; check the path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extracting", dir=dest.parent))
    try:
        seen: set[str] = set()  # top-level names in the archive
        with _open(archive) as opened:
            for name, kind, open_member in _members(opened):
                rel = _checked(tmp, name, kind, archive)
                seen.update(rel.parts[:1])
                if rel.parts and (only is None or rel.parts[0] in only):
                    _write(tmp / rel, kind, open_member)
        if only is not None and (missing := sorted(set(only) - seen)):
            raise DataError(f"archive {archive} has no top-level folder {', '.join(missing)} "
                            f"(it has: {', '.join(sorted(seen)) or 'nothing'})")
        tops = sorted(tmp.iterdir())
        if clashes := [str(dest / p.name) for p in tops if (dest / p.name).exists()]:
            raise DataError(f"{', '.join(clashes)} already exist(s); remove or extract elsewhere")
        dest.mkdir(exist_ok=True)
        for p in tops:
            p.rename(dest / p.name)  # same filesystem, since tmp is dest's sibling
        return [dest / p.name for p in tops]
    except _CORRUPT as e:
        raise DataError(f"could not unpack {archive} ({e}): the archive may be corrupt or "
                        "truncated (get it again), or the disk may be full") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(path: Path, kind: str, open_member: Callable[[], IO[bytes]]) -> None:
    """Create one checked member: only plain folders and plain files are ever written."""
    if kind == "dir":
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_member() as src, path.open("wb") as dst:
        shutil.copyfileobj(src, dst)


def _verify(path: Path, expected: str | None) -> None:
    """DataError if path's sha256 is not `expected`; with no expected value, print the digest."""
    digest = sha256_file(path)
    if expected is None:
        verdict = ("matches the published MVTec value" if digest in PUBLISHED_SHA256.values()
                   else "could not be verified: MVTec publishes no sha256 for this archive")
        print(f"{path.name}: sha256 {digest} {verdict}")
    elif digest != expected.lower():
        raise DataError(f"{path} has sha256 {digest}, expected {expected}: the file is corrupt "
                        "or not the official archive; download it again")
    else:
        print(f"{path.name}: sha256 verified")


def _manual_route(categories: Sequence[str], to: Path) -> str:
    names = ",".join(categories)
    return (f"Manual route: open {MVTEC_PAGE} in a browser, download the category archive "
            f"(e.g. {categories[0]}.tar.xz) or the full archive ({FULL_ARCHIVE_URL}), then run "
            f"`python -m visinspect download --categories {names} --archive FILE --to {to}`, "
            f"or unpack it yourself so that {to}/<category>/train/good/... exists. "
            "MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial use only).")


def _fetch(url: str, part: Path, timeout: float, opener: Callable, route: str) -> None:
    """Stream url into part, showing progress; VisinspectError with the manual route on failure."""
    try:
        with opener(url, timeout=timeout) as response:
            if response.headers.get("Content-Type", "").startswith("text/html"):
                raise VisinspectError(f"{url} returned a web page instead of the archive (the "
                                      f"link may have expired). {route}")
            total = int(response.headers.get("Content-Length") or 0) or None
            with part.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              desc=part.name) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except _NETWORK as e:
        raise VisinspectError(f"could not download {url} ({e}); this machine may be offline. "
                              f"{route}") from e


def download_categories(
    categories: Sequence[str],
    to: Path,
    *,
    archive: Path | None = None,
    sha256: str | None = None,
    timeout: float = 30.0,
    opener: Callable = urllib.request.urlopen,
) -> list[Path]:
    """Make `to/<category>/` exist for each category; return those folders in the given order.

    Present categories are skipped. With `archive` (a category archive or the full MVTec archive,
    downloaded by hand) nothing is fetched and only the missing categories are unpacked from it.
    `sha256` is the expected digest of the one archive used. `timeout` bounds every network wait.
    """
    to = Path(to)
    if unknown := [c for c in categories if c not in MVTEC_CATEGORIES]:
        raise DataError(f"unknown MVTec AD category {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(MVTEC_CATEGORIES)}")
    wanted = list(dict.fromkeys(categories))
    todo = [c for c in wanted if not ((to / c / "train").is_dir() and (to / c / "test").is_dir())]
    for c in wanted:
        if c not in todo:
            print(f"{c}: already present in {to / c}, skipping")
    if archive is not None and todo:
        _verify(Path(archive), sha256)
        safe_extract(Path(archive), to, only=todo)
    elif todo:
        if sha256 is not None and len(todo) > 1:
            raise DataError("sha256 checks a single archive: download one category at a time")
        to.mkdir(parents=True, exist_ok=True)
        for c in todo:
            part = to / f"{c}.tar.xz.part"
            try:
                _fetch(ARCHIVE_URLS[c], part, timeout, opener, _manual_route(todo, to))
                _verify(part, sha256 or PUBLISHED_SHA256.get(f"{c}.tar.xz"))
                safe_extract(part, to, only=[c])
            finally:
                part.unlink(missing_ok=True)
    return [to / c for c in wanted]
