"""A zoo model's file downloaded from a local HTTP server on 127.0.0.1 (this machine has no
internet): the checksum the zoo publishes is checked, an interrupted or wrong file is never
kept, a cached file is not fetched again; and through run.py, one error line and exit code."""
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from cnnzoo.core.errors import RunFailed, WeightsError
from cnnzoo.core.zoo import download
from cnnzoo.core.zoo.model import ZooModel


class Server:
    """Files served from a folder; ``cut`` names files sent with half their bytes and a full
    Content-Length (a transfer interrupted by the network)."""

    def __init__(self, folder: Path):
        self.folder, self.cut, self.requests = folder, set(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802  the standard library's name
                server.requests.append(self.path)
                path = server.folder / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if path.name in server.cut else data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    folder = tmp_path / "www"
    folder.mkdir()
    server = Server(folder)
    monkeypatch.setenv("CNNZOO_WEIGHTS_URL", server.url)
    monkeypatch.setenv("CNNZOO_CACHE", str(tmp_path / "cache"))
    yield server
    server.close()


def published(folder: Path, name: str, data: bytes, algo: str = "sha256") -> ZooModel:
    (folder / name).write_bytes(data)
    digest = hashlib.new(algo, data).hexdigest()
    return ZooModel("torchvision", "m", "resnet50", "torch", 224,
                    f"https://zoo.example/models/{name}",
                    f"{algo}:{digest[:8] if algo == 'sha256' else digest}")


def test_a_download_with_the_published_checksum_is_cached_and_not_fetched_again(served):
    data = np.random.default_rng(0).bytes(3 << 20)  # several chunks
    model = published(served.folder, "w-1234.pth", data)
    path = download.fetch(model)
    assert path == download.cache_dir() / "w-1234.pth" and path.read_bytes() == data
    served.close()  # the cached file needs no server
    assert download.fetch(model) == path and served.requests == ["/w-1234.pth"]


def test_a_wrong_checksum_keeps_nothing(served):
    model = published(served.folder, "w.h5", b"the published bytes", "md5")
    (served.folder / "w.h5").write_bytes(b"other bytes")
    with pytest.raises(WeightsError, match=r"checksum is md5:\w+, the zoo publishes md5:"):
        download.fetch(model)
    assert not any(download.cache_dir().iterdir())


def test_an_interrupted_transfer_keeps_nothing_and_the_next_try_succeeds(served):
    data = b"x" * 100_000
    model = published(served.folder, "w.pth", data)
    served.cut.add("w.pth")
    with pytest.raises(RunFailed, match="interrupted after 50,000 of 100,000 bytes"):
        download.fetch(model)
    assert not any(download.cache_dir().iterdir())
    served.cut.clear()
    assert download.fetch(model).read_bytes() == data


def test_a_damaged_cached_file_is_fetched_again(served):
    data = b"weights" * 1000
    model = published(served.folder, "w.pth", data)
    path = download.fetch(model)
    path.write_bytes(b"damaged")
    assert download.fetch(model).read_bytes() == data and len(served.requests) == 2


def test_a_gluon_zip_is_unpacked_and_its_params_checked(served):
    import zipfile
    params = b"gluon parameters"
    with zipfile.ZipFile(served.folder / "vgg16-e660d456.zip", "w") as z:
        z.writestr("vgg16-e660d456.params", params)
    model = ZooModel("gluon", "vgg16", "vgg16", "gluon", 224,
                     "https://zoo.example/gluon/models/vgg16-e660d456.zip",
                     "sha1:" + hashlib.sha1(params).hexdigest())
    path = download.fetch(model)
    assert path.name == "vgg16-e660d456.params" and path.read_bytes() == params


def test_no_server_and_no_published_checksum_are_one_line_each(served, monkeypatch):
    monkeypatch.setenv("CNNZOO_WEIGHTS_URL", "http://127.0.0.1:9")  # nothing listens there
    model = published(served.folder, "w.pth", b"data")
    with pytest.raises(RunFailed, match="cannot download .*give its path"):
        download.fetch(model)
    from cnnzoo.core.zoo.catalog import find
    with pytest.raises(WeightsError, match="publishes no checksum"):
        download.fetch(find("timm:inception_v4"))


def test_run_py_refuses_a_zoo_file_that_is_not_the_published_one(served, cli, tmp_path):
    (served.folder / "resnet50-0676ba61.pth").write_bytes(b"not resnet50's weights")
    r = cli("arch=resnet50", "arch.input_size=32", "finetune.weights=torchvision:resnet50",
            env={"CNNZOO_WEIGHTS_URL": served.url, "CNNZOO_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stderr
    assert "not the published file" in r.stderr and served.requests
    assert r.frameworks == set()  # refused before the backend's framework loads
    assert not (tmp_path / "run" / ".hydra").exists()  # no record of a refused command
    assert not any((tmp_path / "cache/weights").iterdir())


def test_a_zoo_variant_names_the_options_to_set_before_any_download(served):
    import architectures
    from cnnzoo.core.zoo.load import import_weights
    spec = architectures.build_spec("inception_v3")
    with pytest.raises(WeightsError, match=r"keras:InceptionV3 is a variant of inception_v3 "
                                           r"\(\{'count_include_pad': False\}\); set "
                                           r"arch.options.count_include_pad=False"):
        import_weights("keras:InceptionV3", spec, 299, options={"count_include_pad": True})
    assert not served.requests
