"""CIFAR-10 loader (both layouts, folders and archives), its refusals, and the downloader.

All data here is small and generated; only the slow test reads the real set.
"""

import gzip
import hashlib
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.cli import main
from bnlab.data import CIFARDataError, ImageData, load_cifar10
from bnlab.data import cifar10 as cifar_mod
from bnlab.data.cifar10 import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASSES,
    compute_channel_stats,
    normalize_images,
)
from bnlab.data.download import DownloadError, download_cifar10, download_mnist
from test_data import _Server  # the loopback HTTP server that honours Range

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
N = 4  # images per generated batch


def fake_batches(n=N, seed=0):
    """name -> (uint8 (n, 3072) pixels, int labels (n,)); image 0 of each batch is R=1 G=2 B=3."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in NAMES:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[0] = np.repeat(np.array([1, 2, 3], dtype=np.uint8), 1024)
        out[name] = (data, rng.integers(0, 10, n))
    return out


def python_pickle(data, labels, protocol=2):
    # the official batches: bytes keys, a uint8 array and a list of ints (filenames left out)
    batch = {b"batch_label": b"fake", b"labels": [int(v) for v in labels], b"data": data}
    return pickle.dumps(batch, protocol=protocol)


def write_python(folder, batches, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        (folder / name).write_bytes(python_pickle(data, labels, protocol))
    return folder


def write_binary(folder, batches):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        table = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], data], axis=1)
        (folder / f"{name}.bin").write_bytes(table.tobytes())
    return folder


def write_tar(archive, folder):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def check_round_trip(d, batches):
    assert isinstance(d, ImageData) and d.classes == CLASSES
    assert d.x_train.dtype == torch.uint8 and d.x_train.shape == (5 * N, 3, 32, 32)
    assert d.y_train.dtype == torch.int64 and d.x_test.shape == (N, 3, 32, 32)
    data = np.concatenate([batches[n][0] for n in NAMES[:5]])
    labels = np.concatenate([batches[n][1] for n in NAMES[:5]])
    # pixel (c, h, w) of image i is byte c * 1024 + h * 32 + w: red plane first
    i, c, h, w = 7, 2, 5, 30
    assert d.x_train[i, c, h, w] == data[i, c * 1024 + h * 32 + w]
    np.testing.assert_array_equal(d.x_train.reshape(5 * N, -1).numpy(), data)
    np.testing.assert_array_equal(d.y_train.numpy(), labels)
    np.testing.assert_array_equal(d.x_test.reshape(N, -1).numpy(), batches["test_batch"][0])
    np.testing.assert_array_equal(d.y_test.numpy(), batches["test_batch"][1])
    for plane, value in enumerate((1, 2, 3)):
        assert (d.x_test[0, plane] == value).all()
    assert f"{5 * N} training / {N} test images" in d.description


@pytest.mark.parametrize(
    "where", ["folder", "parent", "archive", "folder-with-archive", "tar-uncompressed"]
)
@pytest.mark.parametrize("layout", ["python", "binary"])
def test_loads_every_form_of_both_layouts(tmp_path, layout, where):
    batches = fake_batches()
    folder_name = {"python": "cifar-10-batches-py", "binary": "cifar-10-batches-bin"}[layout]
    write = write_python if layout == "python" else write_binary
    folder = write(tmp_path / "src" / folder_name, batches)
    archive = tmp_path / "dl" / cifar_mod.ARCHIVES[layout]
    archive.parent.mkdir()
    write_tar(archive, folder)
    path = {
        "folder": folder,
        "parent": folder.parent,
        "archive": archive,
        "folder-with-archive": archive.parent,
        "tar-uncompressed": tmp_path / "plain.tar",
    }[where]
    if where == "tar-uncompressed":
        with tarfile.open(path, "w") as tar:
            tar.add(folder, arcname=folder.name)
    d = load_cifar10(path, check_shapes=False)
    check_round_trip(d, batches)
    assert d.description.startswith(f"CIFAR-10 ({layout} layout) from ")
    assert Path(d.source) in (folder, archive, path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python_layout_written_by_python3_at_any_protocol(tmp_path, protocol):
    batches = fake_batches()
    folder = write_python(tmp_path, batches, protocol=protocol)
    check_round_trip(load_cifar10(folder, check_shapes=False), batches)


def test_official_sizes_are_required_by_default(tmp_path):
    write_python(tmp_path, fake_batches())
    shapes = r"data_batch_1: images of shape \(4, 3072\), expected \(10000, 3072\)"
    with pytest.raises(CIFARDataError, match=shapes):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------- damaged files


def test_damaged_python_batches_name_the_file(tmp_path):
    batches = fake_batches()
    folder = write_python(tmp_path / "cifar-10-batches-py", batches)
    data, labels = batches["data_batch_3"]
    raw = python_pickle(data, labels)

    def load():
        return load_cifar10(folder, check_shapes=False)

    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CIFARDataError, match="data_batch_3: not a readable.*truncated or corrupt"):
        load()
    (folder / "data_batch_3").write_bytes(b"")
    with pytest.raises(CIFARDataError, match="data_batch_3: not a readable"):
        load()
    (folder / "data_batch_3").write_bytes(python_pickle(data[:, :3000], labels))
    with pytest.raises(CIFARDataError, match=r"data_batch_3: images of shape \(4, 3000\)"):
        load()
    (folder / "data_batch_3").write_bytes(python_pickle(data.astype(np.int16), labels))
    with pytest.raises(CIFARDataError, match="data_batch_3: data is a int16 array"):
        load()
    (folder / "data_batch_3").write_bytes(python_pickle(data, [0, 1, 10, 2]))
    with pytest.raises(CIFARDataError, match="data_batch_3: label 10 outside 0..9"):
        load()
    (folder / "data_batch_3").write_bytes(python_pickle(data, [0, 1, 2]))
    with pytest.raises(CIFARDataError, match="data_batch_3: 3 labels for 4 images"):
        load()
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"labels": [0] * 4}, protocol=2))
    with pytest.raises(CIFARDataError, match="data_batch_3: no 'data' entry"):
        load()
    (folder / "data_batch_3").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CIFARDataError, match="data_batch_3: holds a list"):
        load()
    (folder / "data_batch_3").write_bytes(raw)
    (folder / "test_batch").unlink()
    with pytest.raises(CIFARDataError, match=r"test_batch: missing.*bnlab data download cifar10"):
        load()


def test_damaged_binary_batches_name_the_file(tmp_path):
    folder = write_binary(tmp_path, fake_batches())
    raw = (folder / "test_batch.bin").read_bytes()
    (folder / "test_batch.bin").write_bytes(raw[:-5])
    with pytest.raises(CIFARDataError, match="test_batch.bin: .* not a whole number of 3073-byte"):
        load_cifar10(folder, check_shapes=False)
    (folder / "test_batch.bin").write_bytes(bytes([12]) + raw[1:])
    with pytest.raises(CIFARDataError, match="test_batch.bin: label 12 outside 0..9"):
        load_cifar10(folder, check_shapes=False)
    (folder / "data_batch_5.bin").unlink()
    with pytest.raises(CIFARDataError, match="data_batch_5.bin: missing"):
        load_cifar10(folder, check_shapes=False)


def test_damaged_archives_name_the_file(tmp_path):
    folder = write_python(tmp_path / "cifar-10-batches-py", fake_batches())
    (tmp_path / "dl").mkdir()
    archive = write_tar(tmp_path / "dl" / "cifar-10-python.tar.gz", folder)
    good = archive.read_bytes()

    archive.write_bytes(good[: len(good) // 2])
    with pytest.raises(CIFARDataError, match="cifar-10-python.tar.gz: cannot read the archive"):
        load_cifar10(archive, check_shapes=False)

    # a valid 10-byte gzip header (no file name field), then a garbage deflate stream
    packed = gzip.compress(gzip.decompress(good), mtime=0)
    assert packed[:4] == b"\x1f\x8b\x08\x00"
    archive.write_bytes(packed[:10] + b"\xff" * 16 + packed[26:])
    with pytest.raises(CIFARDataError, match="cifar-10-python.tar.gz: .*truncated or corrupt"):
        load_cifar10(archive.parent, check_shapes=False)  # found through its folder, too

    # a deflate stream that decodes, but to other bytes than the gzip trailer's CRC-32 says
    archive.write_bytes(packed[:-8] + b"\x00\x00\x00\x00" + packed[-4:])
    with pytest.raises(CIFARDataError, match="cifar-10-python.tar.gz: .*CRC check failed"):
        load_cifar10(archive, check_shapes=False)

    archive.write_bytes(gzip.compress(b"not a tar file at all" * 100))
    with pytest.raises(CIFARDataError, match="cifar-10-python.tar.gz: cannot read the archive"):
        load_cifar10(archive, check_shapes=False)

    (folder / "test_batch").unlink()
    write_tar(archive, folder)
    with pytest.raises(
        CIFARDataError, match="cifar-10-python.tar.gz: no test_batch in the archive"
    ):
        load_cifar10(archive, check_shapes=False)

    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.txt").write_text("hello")
    write_tar(archive, other)
    with pytest.raises(CIFARDataError, match="holds no CIFAR-10 batches"):
        load_cifar10(archive, check_shapes=False)


def test_wrong_paths_say_what_to_do(tmp_path):
    with pytest.raises(CIFARDataError, match="no such file or folder.*bnlab data download cifar10"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(CIFARDataError, match="found no CIFAR-10 here"):
        load_cifar10(tmp_path)
    folder = write_python(tmp_path / "b", fake_batches())
    with pytest.raises(CIFARDataError, match="one batch of CIFAR-10; pass the folder"):
        load_cifar10(folder / "data_batch_1")


# ---------------------------------------------------------------- tampered pickles


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _WritesAFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_RunsACommand, _WritesAFile])
@pytest.mark.parametrize("packed", [False, True])
def test_a_malicious_pickle_is_refused_before_it_runs(tmp_path, payload, packed):
    marker = tmp_path / "pwned"
    batches = fake_batches()
    folder = write_python(tmp_path / "cifar-10-batches-py", batches)
    data, labels = batches["data_batch_2"]
    evil = {b"labels": [int(v) for v in labels], b"data": data, b"extra": payload(marker)}
    (folder / "data_batch_2").write_bytes(pickle.dumps(evil, protocol=2))
    path = write_tar(tmp_path / "cifar-10-python.tar.gz", folder) if packed else folder
    refused = (
        r"data_batch_2: .*refuses to load a pickle that asks for "
        r"(os|posix|nt|builtins|io)\.(system|open): not a CIFAR-10 batch.*tampered"
    )
    with pytest.raises(CIFARDataError, match=refused):
        load_cifar10(path, check_shapes=False)
    assert not marker.exists()


def test_codecs_is_allowed_only_for_latin1(tmp_path):
    folder = write_python(tmp_path, fake_batches())
    # what Python 3 writes for b"data" at protocol 2, with another codec swapped in
    raw = pickle.dumps({b"k": 1}, protocol=2).replace(b"latin1", b"rot_13")
    (folder / "data_batch_1").write_bytes(raw)
    with pytest.raises(CIFARDataError, match="data_batch_1: not a readable"):
        load_cifar10(folder, check_shapes=False)


# ---------------------------------------------------------------- normalization


def test_normalize_and_channel_stats():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 3, 5, 5), dtype=torch.uint8, generator=g)
    mean, std = compute_channel_stats(x)
    f = x.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), f.mean((0, 2, 3)))
    biased_std = f.std((0, 2, 3), correction=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), biased_std)
    z = normalize_images(x, mean, std, dtype=torch.float64)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(z.std((0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64))
    xl = x.contiguous(memory_format=torch.channels_last)
    assert normalize_images(xl).is_contiguous(memory_format=torch.channels_last)
    expect = (x[0, 1, 2, 3] / 255 - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    torch.testing.assert_close(normalize_images(x)[0, 1, 2, 3], expect.float())


# ---------------------------------------------------------------- downloader


def _served_archive(tmp_path, layout="python"):
    batches = fake_batches()
    write = write_python if layout == "python" else write_binary
    folder = write(tmp_path / "src" / f"cifar-10-batches-{layout[:3]}", batches)
    served = tmp_path / "served"
    served.mkdir()
    archive = write_tar(served / cifar_mod.ARCHIVES[layout], folder)
    data = archive.read_bytes()
    return served, data, hashlib.md5(data).hexdigest()


def _quiet(*a):
    pass


@pytest.mark.parametrize("layout", ["python", "binary"])
def test_download_verifies_the_archive_and_loads(tmp_path, layout):
    served, data, md5 = _served_archive(tmp_path, layout)
    target = tmp_path / "target"
    with _Server(served) as srv:
        got = download_cifar10(
            target, layout=layout, mirrors=[srv.url], md5=md5, progress=False, log=_quiet
        )
    assert got == target / cifar_mod.ARCHIVES[layout] and got.read_bytes() == data
    assert not list(target.glob("*.part"))
    assert load_cifar10(target, check_shapes=False).x_train.shape == (5 * N, 3, 32, 32)


def test_download_rejects_a_corrupt_archive_and_leaves_no_file(tmp_path):
    served, data, md5 = _served_archive(tmp_path)
    (served / "cifar-10-python.tar.gz").write_bytes(data[:-10] + b"0123456789")
    target = tmp_path / "target"
    with (
        _Server(served) as srv,
        pytest.raises(DownloadError, match=f"not the expected file .*expected {md5}"),
    ):
        download_cifar10(target, mirrors=[srv.url], md5=md5, retries=2, progress=False, log=_quiet)
    assert list(target.iterdir()) == []


def test_download_checks_the_official_md5_by_default(tmp_path, monkeypatch):
    served, data, md5 = _served_archive(tmp_path)
    target = tmp_path / "target"
    with _Server(served) as srv:
        with pytest.raises(DownloadError, match=cifar_mod.OFFICIAL["cifar-10-python.tar.gz"]):
            download_cifar10(target, mirrors=[srv.url], retries=1, progress=False, log=_quiet)
        monkeypatch.setitem(cifar_mod.OFFICIAL, "cifar-10-python.tar.gz", md5)
        download_cifar10(target, mirrors=[srv.url], retries=1, progress=False, log=_quiet)
    assert (target / "cifar-10-python.tar.gz").read_bytes() == data


def test_download_resumes_a_partial_archive(tmp_path):
    served, data, md5 = _served_archive(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    (target / "cifar-10-python.tar.gz.part").write_bytes(data[:1000])
    with _Server(served) as srv:
        download_cifar10(target, mirrors=[srv.url], md5=md5, progress=False, log=_quiet)
        sent = srv.bytes_sent
    assert (target / "cifar-10-python.tar.gz").read_bytes() == data
    assert sent == len(data) - 1000  # only the missing tail was fetched
    assert not list(target.glob("*.part"))


def test_download_promotes_a_complete_part_when_the_server_says_416(tmp_path, monkeypatch):
    _, data, md5 = _served_archive(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    (target / "cifar-10-python.tar.gz.part").write_bytes(data)

    def range_not_satisfiable(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 416, "Range Not Satisfiable", {}, None)

    monkeypatch.setattr("urllib.request.urlopen", range_not_satisfiable)
    download_cifar10(target, mirrors=["http://127.0.0.1:9/"], md5=md5, progress=False, log=_quiet)
    assert (target / "cifar-10-python.tar.gz").read_bytes() == data


def test_download_keeps_a_good_archive_and_replaces_a_bad_one(tmp_path):
    served, data, md5 = _served_archive(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    final = target / "cifar-10-python.tar.gz"
    final.write_bytes(data)
    messages = []
    download_cifar10(target, mirrors=["http://127.0.0.1:9/"], md5=md5, log=messages.append)
    assert messages == ["cifar-10-python.tar.gz: present, checksum ok"]  # no network needed
    final.write_bytes(data[:50])
    with _Server(served) as srv:
        download_cifar10(target, mirrors=[srv.url], md5=md5, progress=False, log=_quiet)
        assert srv.bytes_sent == len(data)
    assert final.read_bytes() == data


def test_download_into_a_file_is_a_clear_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for download in (download_cifar10, download_mnist):
        with pytest.raises(DownloadError, match="is a file, not a folder"):
            download(not_a_dir, mirrors=["http://127.0.0.1:9/"], log=_quiet)
    with pytest.raises(DownloadError, match="cannot create the folder"):
        download_cifar10(not_a_dir / "sub", mirrors=["http://127.0.0.1:9/"], log=_quiet)
    with pytest.raises(ValueError, match="layout 'png'"):
        download_cifar10(tmp_path, layout="png")


def test_cli_download_cifar10(tmp_path, monkeypatch, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert main(["data", "download", "cifar10", "--dir", str(not_a_dir), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "error:" in err and "is a file, not a folder" in err and "Traceback" not in err

    served, data, md5 = _served_archive(tmp_path, "binary")
    monkeypatch.setitem(cifar_mod.OFFICIAL, "cifar-10-binary.tar.gz", md5)
    target = tmp_path / "target"
    with _Server(served) as srv:
        argv = ["data", "download", "cifar10", "--dir", str(target), "--layout", "binary"]
        assert main([*argv, "--mirror", srv.url]) == 0
    out = capsys.readouterr().out
    assert (target / "cifar-10-binary.tar.gz").read_bytes() == data
    assert f"bnlab reproduce inception --data {target}" in out


# ---------------------------------------------------------------- the real set


@pytest.mark.slow
@pytest.mark.skipif(
    not SHARED_CIFAR10.is_dir(), reason=f"CIFAR-10 not found at {SHARED_CIFAR10} (CI has it)"
)
def test_the_real_set():
    d = load_cifar10(SHARED_CIFAR10)
    assert d.x_train.shape == (50000, 3, 32, 32) and d.x_test.shape == (10000, 3, 32, 32)
    assert d.y_train.bincount().tolist() == [5000] * 10
    assert d.y_test.bincount().tolist() == [1000] * 10
    mean, std = compute_channel_stats(d.x_train)
    np.testing.assert_allclose(np.array(mean) * 255, [125.3, 123.0, 113.9], atol=0.05)
    np.testing.assert_allclose(np.array(std) * 255, [63.0, 62.1, 66.7], atol=0.05)
    assert d.classes[d.y_train[0]] == "frog" and d.classes[d.y_test[0]] == "cat"
