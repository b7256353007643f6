"""MNIST IDX loader, packaged subset, and the downloader against a loopback server."""

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from bnlab.data import MNISTDataError, load_mnist_dir, load_packaged_mnist
from bnlab.data import mnist as mnist_mod
from bnlab.data.download import DownloadError, download_mnist

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_shared = pytest.mark.skipif(
    not SHARED_MNIST.is_dir(), reason=f"full MNIST not found at {SHARED_MNIST} (CI has it)"
)


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_small_mnist(folder: Path, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in parts.items():
        data = idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return parts


@pytest.mark.parametrize("gz", [True, False])
def test_loader_reads_generated_idx(tmp_path, gz):
    parts = write_small_mnist(tmp_path, gz=gz)
    d = load_mnist_dir(tmp_path, check_shapes=False)
    assert d.x_train.shape == (12, 784) and d.x_test.shape == (5, 784)
    np.testing.assert_allclose(
        d.x_train.numpy() * 255, parts["train-images-idx3-ubyte"].reshape(12, -1), atol=1e-3
    )
    np.testing.assert_array_equal(d.y_test.numpy(), parts["t10k-labels-idx1-ubyte"])


def test_loader_errors_name_the_file(tmp_path):
    write_small_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    # truncated data
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(raw[:-3]))
    with pytest.raises(MNISTDataError, match="train-labels-idx1-ubyte.gz.*truncated"):
        load_mnist_dir(tmp_path, check_shapes=False)
    # bad magic
    labels.write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    with pytest.raises(MNISTDataError, match="bad magic number"):
        load_mnist_dir(tmp_path, check_shapes=False)
    # label out of range
    labels.write_bytes(gzip.compress(raw[:-1] + bytes([11])))
    with pytest.raises(MNISTDataError, match="label 11 outside 0..9"):
        load_mnist_dir(tmp_path, check_shapes=False)
    # not gzip at all
    labels.write_bytes(b"garbage")
    with pytest.raises(MNISTDataError, match="cannot read"):
        load_mnist_dir(tmp_path, check_shapes=False)
    # missing
    labels.unlink()
    with pytest.raises(MNISTDataError, match="missing train-labels-idx1-ubyte.*download"):
        load_mnist_dir(tmp_path, check_shapes=False)
    with pytest.raises(MNISTDataError, match="no such folder"):
        load_mnist_dir(tmp_path / "nope")


def test_loader_rejects_official_shape_mismatch(tmp_path):
    write_small_mnist(tmp_path)
    with pytest.raises(MNISTDataError, match=r"shape \(12, 28, 28\), expected \(60000, 28, 28\)"):
        load_mnist_dir(tmp_path)


@needs_shared
def test_loader_on_the_full_shared_set():
    d = load_mnist_dir(SHARED_MNIST)
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784)
    assert d.y_train[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first labels
    assert 0.0 <= d.x_train.min() and d.x_train.max() == 1.0


def test_packaged_subset_is_balanced_and_disjoint():
    d = load_packaged_mnist()
    assert d.x_train.shape == (4000, 784) and d.x_test.shape == (1000, 784)
    assert d.y_test.bincount().tolist() == [100] * 10
    train_rows = {r.numpy().tobytes() for r in d.x_train}
    assert not any(r.numpy().tobytes() in train_rows for r in d.x_test[:200])
    assert "training split" in d.description


@needs_shared
def test_packaged_subset_comes_from_the_official_training_split():
    full = load_mnist_dir(SHARED_MNIST)
    d = load_packaged_mnist()
    rows = {r.numpy().tobytes() for r in full.x_train[:6000]}
    assert all(r.numpy().tobytes() in rows for r in d.x_train[:300])


# ---------------------------------------------------------------- downloader


class _Server:
    """Serves a folder on 127.0.0.1, honouring "Range: bytes=N-"; counts bytes sent."""

    def __init__(self, root: Path):
        root = Path(root)
        server = self
        self.bytes_sent = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                rng = self.headers.get("Range", "")
                start = int(rng[6:-1]) if rng.startswith("bytes=") and rng.endswith("-") else 0
                server.bytes_sent += len(data) - start  # before sending: no race with the reader
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _fake_official(tmp_path, monkeypatch):
    """Small IDX files served as if official: patch the expected MD5s to theirs."""
    served = tmp_path / "served"
    write_small_mnist(served)
    files = {}
    for name, (shape, _) in mnist_mod.FILES.items():
        md5 = hashlib.md5(gzip.decompress((served / f"{name}.gz").read_bytes())).hexdigest()
        files[name] = (shape, md5)
    monkeypatch.setattr(mnist_mod, "FILES", files)
    monkeypatch.setattr("bnlab.data.download.FILES", files)
    return served


def test_download_verifies_and_is_idempotent(tmp_path, monkeypatch):
    served = _fake_official(tmp_path, monkeypatch)
    target = tmp_path / "target"
    with _Server(served) as srv:
        download_mnist(target, mirrors=[srv.url], progress=False, log=lambda *a: None)
    for name in mnist_mod.FILES:
        assert (target / f"{name}.gz").read_bytes() == (served / f"{name}.gz").read_bytes()
    assert not list(target.glob("*.part"))
    assert load_mnist_dir(target, check_shapes=False).x_train.shape == (12, 784)
    messages = []
    download_mnist(target, mirrors=["http://127.0.0.1:9/"], progress=False, log=messages.append)
    assert all("present, checksum ok" in m for m in messages)  # no network needed


def test_download_falls_back_from_a_corrupt_mirror_over_a_stale_partial_file(tmp_path, monkeypatch):
    served = _fake_official(tmp_path, monkeypatch)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in served.iterdir():
        (bad / f.name).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 8))
    target = tmp_path / "target"
    target.mkdir()
    name = "train-images-idx3-ubyte.gz"
    good = (served / name).read_bytes()
    (target / f"{name}.part").write_bytes(good[:100])  # a partial earlier download
    with _Server(bad) as b, _Server(served) as g:
        download_mnist(
            target, mirrors=[b.url, g.url], retries=1, progress=False, log=lambda *a: None
        )
    assert (target / name).read_bytes() == good
    assert not list(target.glob("*.part"))


def test_download_resumes_a_partial_file(tmp_path, monkeypatch):
    served = _fake_official(tmp_path, monkeypatch)
    target = tmp_path / "target"
    target.mkdir()
    name = "train-images-idx3-ubyte.gz"
    good = (served / name).read_bytes()
    (target / f"{name}.part").write_bytes(good[:100])
    total = sum(f.stat().st_size for f in served.iterdir())
    with _Server(served) as srv:
        download_mnist(target, mirrors=[srv.url], progress=False, log=lambda *a: None)
        sent = srv.bytes_sent
    assert (target / name).read_bytes() == good
    assert sent == total - 100  # only the missing part of the partial file was fetched


def test_download_failure_leaves_no_file(tmp_path, monkeypatch):
    served = _fake_official(tmp_path, monkeypatch)
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"corrupt"))
    target = tmp_path / "target"
    with _Server(served) as srv, pytest.raises(DownloadError, match="not the expected file"):
        download_mnist(target, mirrors=[srv.url], retries=2, progress=False, log=lambda *a: None)
    assert not (target / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(target.glob("*.part"))


def _bad_deflate(data: bytes) -> bytes:
    """A gzip file with a valid header whose deflate stream is corrupt (zlib.error)."""
    packed = bytearray(gzip.compress(data))
    packed[10:20] = b"\xff" * 10  # just past the 10-byte header: invalid block type
    return bytes(packed)


def test_corrupt_deflate_stream_is_named_not_a_zlib_traceback(tmp_path):
    write_small_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(_bad_deflate(gzip.decompress(path.read_bytes())))
    with pytest.raises(MNISTDataError, match="train-images-idx3-ubyte.gz.*download it again"):
        load_mnist_dir(tmp_path, check_shapes=False)


def test_download_replaces_a_file_with_a_corrupt_deflate_stream(tmp_path, monkeypatch):
    served = _fake_official(tmp_path, monkeypatch)
    target = tmp_path / "target"
    target.mkdir()
    name = "train-images-idx3-ubyte.gz"
    (target / name).write_bytes(_bad_deflate(gzip.decompress((served / name).read_bytes())))
    with _Server(served) as srv:
        download_mnist(target, mirrors=[srv.url], progress=False, log=lambda *a: None)
    assert (target / name).read_bytes() == (served / name).read_bytes()


def test_kaggle_style_file_names_are_found(tmp_path):
    parts = write_small_mnist(tmp_path, gz=False)
    for name in parts:  # train-images-idx3-ubyte -> train-images.idx3-ubyte, as Kaggle names them
        (tmp_path / name).rename(tmp_path / name.replace("-idx", ".idx"))
    data = load_mnist_dir(tmp_path, check_shapes=False)
    assert data.x_train.shape == (12, 784) and data.y_test.shape == (5,)


def test_download_says_what_was_wrong_and_which_mirror_it_tries(tmp_path, monkeypatch):
    served = _fake_official(tmp_path, monkeypatch)
    name = "t10k-labels-idx1-ubyte.gz"
    (served / name).write_bytes((served / name).read_bytes()[:20])  # a cut-off download
    messages = []
    with _Server(served) as srv, pytest.raises(DownloadError) as e:
        download_mnist(
            tmp_path / "t", mirrors=[srv.url], retries=1, progress=False, log=messages.append
        )
    assert "incomplete download" in str(e.value) and "None" not in str(e.value)
    assert any(f"fetching {srv.url}{name} (try 1 of 1" in m for m in messages)


def test_download_refuses_zero_retries_and_a_bad_timeout(tmp_path, capsys):
    from bnlab.cli import main

    with pytest.raises(ValueError, match="retries must be at least 1"):
        download_mnist(tmp_path, retries=0, progress=False, log=lambda *a: None)
    for flag, value in (("--retries", "0"), ("--timeout", "-1"), ("--timeout", "nan")):
        with pytest.raises(SystemExit) as e:
            main(["data", "download", "mnist", "--dir", str(tmp_path / "d"), flag, value])
        assert e.value.code == 2
        assert f"argument {flag}: must be" in capsys.readouterr().err
