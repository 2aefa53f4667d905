"""A zoo model's published file, downloaded once into the cache and checked against the
checksum the zoo publishes for it.

The cache is ``$CNNZOO_CACHE/weights`` (default ``~/.cache/cnnzoo/weights``). A file is
written under a temporary name and renamed once its checksum matches, so an interrupted or
corrupted download never leaves a file that a later run would trust. ``$CNNZOO_WEIGHTS_URL``
replaces the address every file is fetched from (a mirror, or a folder served on a machine
without internet); the file names stay the zoo's."""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ..errors import RunFailed, WeightsError
from .model import ZooModel

_CHUNK = 1 << 20
TIMEOUT_S = 60


def cache_dir() -> Path:
    root = os.environ.get("CNNZOO_CACHE") or Path.home() / ".cache" / "cnnzoo"
    return Path(root) / "weights"


def url_of(model: ZooModel) -> str:
    mirror = os.environ.get("CNNZOO_WEIGHTS_URL")
    return model.url if not mirror else mirror.rstrip("/") + "/" + model.url.rsplit("/", 1)[1]


def fetch(model: ZooModel) -> Path:
    """The path of ``model``'s weights file in the cache, downloaded now if it is not there."""
    if model.url is None:
        raise WeightsError(f"{model.id} has no published file")
    if model.checksum is None:
        raise WeightsError(f"{model.id}: its zoo publishes no checksum for {model.url}, so a "
                           "download could not be checked; download it yourself and give its "
                           "path as the weights")
    name = model.url.rsplit("/", 1)[1]
    dest = cache_dir() / (name[:-4] + ".params" if name.endswith(".zip") else name)
    if dest.is_file() and _matches(dest, model.checksum):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        _download(url_of(model), part)
        if name.endswith(".zip"):  # the Gluon store zips each .params; its SHA-1 is the .params'
            _unzip_one(part, dest.name)
        if not _matches(part, model.checksum):
            raise WeightsError(f"{url_of(model)}: the downloaded file's checksum is "
                               f"{_digest(part, model.checksum)}, the zoo publishes "
                               f"{model.checksum}: not the published file (nothing was kept)")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    print(f"downloaded {model.id} to {dest}", flush=True)
    return dest


def _download(url: str, to: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(to, "wb") as out:
            total = response.headers.get("Content-Length")
            got = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                got += len(chunk)
    except urllib.error.HTTPError as err:
        raise RunFailed(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RunFailed(f"cannot download {url} ({reason}); without internet, download the file "
                        "elsewhere and give its path as the weights, or set "
                        "$CNNZOO_WEIGHTS_URL to a mirror") from None
    if total is not None and got != int(total):
        raise RunFailed(f"download of {url} interrupted after {got:,} of {int(total):,} bytes "
                        "(nothing was kept): run again")


def _unzip_one(path: Path, member: str) -> None:
    """Replace the zip at ``path`` by its member ``member``."""
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise WeightsError(f"the downloaded {path.name} is not the zoo's zip of "
                           f"{member} ({err})") from None
    path.write_bytes(data)


def _digest(path: Path, checksum: str) -> str:
    algo = checksum.split(":", 1)[0]
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"{algo}:{h.hexdigest()}"


def _matches(path: Path, checksum: str) -> bool:
    """torchvision publishes a SHA-256 prefix (in the file name): a prefix matches."""
    algo, want = checksum.split(":", 1)
    return _digest(path, checksum).split(":", 1)[1].startswith(want.lower())
