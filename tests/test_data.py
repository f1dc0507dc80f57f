"""Module tests for kdbook.data: the real file formats written small, the loader against torchvision."""
import gzip, io, pickle, subprocess, sys, tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from kdbook.data import (DATASETS, DatasetFormatError, DatasetNotFoundError, DeviceLoader, ImageDataset, Split,
                         bench_loader, cache_dir, crop_flip, dataset_locations, device_sync, exemplar_memory,
                         expert_split, find_dataset, load_dataset, make_loaders, median_times, read_idx)
import kdbook.data as data
from conftest import FASHION_MNIST, require_system


def test_public_import_from_a_fresh_interpreter():
    subprocess.run([sys.executable, "-c", "from kdbook.data import DeviceLoader, load_dataset, expert_split"], check=True)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    "No default place holds a copy: HOME, $KDBOOK_DATA and the Debian folder all point into tmp_path."
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KDBOOK_DATA", raising=False)
    monkeypatch.delenv("KDBOOK_CACHE", raising=False)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "debian"))
    return tmp_path


# ---- writers of the official formats, small -------------------------------------------------------------

def images(n, c, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def write_idx(path: Path, a: np.ndarray, gz: bool):
    raw = bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">i4").tobytes() + a.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_fmnist(folder: Path, gz: bool, n_train=30, n_test=20):
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    xtr, xte = images(n_train, 1, 28, 28, 0)[:, 0], images(n_test, 1, 28, 28, 1)[:, 0]
    ytr, yte = np.arange(n_train) % 10, (np.arange(n_test) * 3) % 10
    write_idx(folder / f"train-images-idx3-ubyte{sfx}", xtr, gz)
    write_idx(folder / f"train-labels-idx1-ubyte{sfx}", ytr, gz)
    write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", xte, gz)
    write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", yte, gz)
    return xtr, ytr, xte, yte


def cifar_files(name, n=6):
    "The files of the official python format, as {relative path: bytes}, and the arrays they hold."
    def dump(d): return pickle.dumps(d, protocol=2)
    if name == "cifar10":
        xs = [images(n, 3, 32, 32, 10 + i) for i in range(6)]
        ys = [((np.arange(n) + i) % 10).tolist() for i in range(6)]
        files = {f"cifar-10-batches-py/data_batch_{i + 1}": dump({b"batch_label": b"training batch", b"labels": ys[i],
                                                                  b"data": xs[i].reshape(n, -1), b"filenames": [b"x.png"] * n})
                 for i in range(5)}
        files["cifar-10-batches-py/test_batch"] = dump({b"labels": ys[5], b"data": xs[5].reshape(n, -1)})
        files["cifar-10-batches-py/batches.meta"] = dump({b"label_names": [f"c{i}".encode() for i in range(10)],
                                                          b"num_vis": 3072})
        return files, np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], np.array(ys[5])
    xtr, xte = images(2 * n, 3, 32, 32, 20), images(n, 3, 32, 32, 21)
    ytr, yte = (np.arange(2 * n) * 7 % 100).tolist(), (np.arange(n) * 11 % 100).tolist()
    files = {"cifar-100-python/train": dump({b"fine_labels": ytr, b"coarse_labels": [0] * (2 * n), b"data": xtr.reshape(2 * n, -1)}),
             "cifar-100-python/test": dump({b"fine_labels": yte, b"coarse_labels": [0] * n, b"data": xte.reshape(n, -1)}),
             "cifar-100-python/meta": dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                            b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})}
    return files, xtr, np.array(ytr), xte, np.array(yte)


def write_cifar(base: Path, name, archive: bool):
    files, *arrays = cifar_files(name)
    base.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(base / data._CIFAR[name][1], "w:gz") as tf:
            for rel, b in files.items():
                info = tarfile.TarInfo(rel); info.size = len(b)
                tf.addfile(info, io.BytesIO(b))
    else:
        for rel, b in files.items():
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_bytes(b)
    return arrays


def check_loaded(ds, name, xtr, ytr, xte, yte):
    assert ds.name == name
    assert torch.equal(ds.train.x, torch.from_numpy(xtr)) and torch.equal(ds.test.x, torch.from_numpy(xte))
    assert ds.train.y.tolist() == list(ytr) and ds.test.y.tolist() == list(yte)
    assert ds.train.y.dtype == torch.int64 and ds.train.x.dtype == torch.uint8


# ---- loading --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_from_kdbook_data_subfolder(isolated, monkeypatch, gz):
    monkeypatch.setenv("KDBOOK_DATA", str(isolated / "data"))
    xtr, ytr, xte, yte = write_fmnist(isolated / "data" / "fashion-mnist", gz)
    assert find_dataset("fashion-mnist") == str(isolated / "data" / "fashion-mnist")
    ds = load_dataset("fashion-mnist", download=False)
    check_loaded(ds, "fashion-mnist", xtr[:, None], ytr, xte[:, None], yte)
    assert (ds.pad, ds.flip, ds.in_channels, ds.image_size, ds.n_classes) == (2, True, 1, 28, 10)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_fashion_mnist_search_order(isolated, monkeypatch):
    monkeypatch.setenv("KDBOOK_DATA", str(isolated / "data"))
    write_fmnist(isolated / "debian", gz=True)
    places = dataset_locations("fashion-mnist")
    assert [p for p, _ in places] == [str(isolated / "data"), str(isolated / "data" / "fashion-mnist"),
                                      str(isolated / "home/.cache/kdbook/fashion-mnist"),
                                      str(isolated / "home/.cache/kdbook/FashionMNIST/raw"), str(isolated / "debian")]
    assert [ok for _, ok in places] == [False, False, False, False, True]
    write_fmnist(isolated / "home/.cache/kdbook/fashion-mnist", gz=False)
    assert find_dataset("fashion-mnist") == str(isolated / "home/.cache/kdbook/fashion-mnist")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archive_in_kdbook_data_is_extracted_into_the_cache(isolated, monkeypatch, name):
    monkeypatch.setenv("KDBOOK_DATA", str(isolated / "data"))
    arrays = write_cifar(isolated / "data", name, archive=True)
    folder, archive, _ = data._CIFAR[name]
    assert find_dataset(name) == str(isolated / "data" / archive)
    ds = load_dataset(name, download=False)
    check_loaded(ds, name, *arrays)
    assert ds.source == str(isolated / "home/.cache/kdbook" / folder)
    assert find_dataset(name) == str(isolated / "data" / archive)  # still first in the search order
    (isolated / "data" / archive).unlink()
    assert find_dataset(name) == str(isolated / "home/.cache/kdbook" / folder)
    check_loaded(load_dataset(name, download=False), name, *arrays)
    assert len(ds.classes) == (10 if name == "cifar10" else 100) and ds.classes[3] in ("c3", "f3")
    assert ds.pad == 4 and ds.flip and ds.in_channels == 3 and ds.image_size == 32


def test_cache_dir_honours_kdbook_cache(isolated, monkeypatch):
    assert cache_dir() == isolated / "home/.cache/kdbook" and cache_dir("teachers") == isolated / "home/.cache/kdbook/teachers"
    monkeypatch.setenv("KDBOOK_CACHE", "")
    assert cache_dir() == isolated / "home/.cache/kdbook"
    monkeypatch.setenv("KDBOOK_CACHE", str(isolated / "cache"))
    assert cache_dir() == isolated / "cache" and cache_dir("teachers") == isolated / "cache/teachers"
    assert [p for p, _ in dataset_locations("fashion-mnist")][:2] == [str(isolated / "cache/fashion-mnist"),
                                                                      str(isolated / "cache/FashionMNIST/raw")]
    monkeypatch.setenv("KDBOOK_DATA", str(isolated / "data"))
    arrays = write_cifar(isolated / "data", "cifar100", archive=True)
    ds = load_dataset("cifar100", download=False)  # the archive is extracted into $KDBOOK_CACHE
    check_loaded(ds, "cifar100", *arrays)
    assert ds.source == str(isolated / "cache/cifar-100-python") and not (isolated / "home").exists()


def test_cifar_folder_through_root(isolated):
    arrays = write_cifar(isolated / "mine", "cifar100", archive=False)
    ds = load_dataset("cifar100", root=isolated / "mine", download=False)
    check_loaded(ds, "cifar100", *arrays)
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)
    arrays = write_cifar(isolated / "c10", "cifar10", archive=False)
    ds = load_dataset("cifar10", root=isolated / "c10", download=False)
    check_loaded(ds, "cifar10", *arrays)
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)


def test_archive_members_must_be_regular_files(isolated):
    base = isolated / "bad"; base.mkdir()
    with tarfile.open(base / "cifar-100-python.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("cifar-100-python/train"); info.type = tarfile.SYMTYPE; info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DatasetFormatError, match="is not a regular file"):
        load_dataset("cifar100", root=base, download=False)
    assert not (base / "cifar-100-python").exists()


def test_corrupt_files_fail_clearly(isolated):
    folder = isolated / "fm"
    write_fmnist(folder, gz=True)
    p = folder / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz: cannot read"):
        load_dataset("fashion-mnist", root=folder, download=False)
    raw = isolated / "raw"
    raw.write_bytes(b"\x00\x00\x0d\x03" + bytes(20))
    with pytest.raises(DatasetFormatError, match="not an unsigned-byte idx file"):
        read_idx(raw)
    base = isolated / "c"
    write_cifar(base, "cifar10", archive=False)
    (base / "cifar-10-batches-py/data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetFormatError, match=r"data_batch_3: data \(2, 5\) and 2 labels are not CIFAR's"):
        load_dataset("cifar10", root=base, download=False)


def test_pickles_cannot_run_code(isolated):
    base = isolated / "evil"
    write_cifar(base, "cifar10", archive=False)

    class Boom:
        def __reduce__(self): return (print, ("pwned",))
    (base / "cifar-10-batches-py/batches.meta").write_bytes(pickle.dumps({b"label_names": Boom()}))
    with pytest.raises(DatasetFormatError, match="refusing to load builtins.print"):
        load_dataset("cifar10", root=base, download=False)


def test_not_found_names_every_place_and_the_remedies(isolated, monkeypatch):
    monkeypatch.setenv("KDBOOK_DATA", str(isolated / "data"))
    for name in ("fashion-mnist", "cifar10", "cifar100"):
        assert find_dataset(name) is None
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset(name, download=False)
        assert isinstance(e.value, FileNotFoundError)
        for place, ok in dataset_locations(name):
            assert place in str(e.value) and not ok
        assert "KDBOOK_DATA" in str(e.value) and "download=True" in str(e.value)
        assert ("apt-get install dataset-fashion-mnist" in str(e.value)) == (name == "fashion-mnist")


def test_unknown_name():
    for f in (load_dataset, find_dataset, dataset_locations):
        with pytest.raises(ValueError, match="unknown dataset 'mnist'; known datasets: digits, fashion-mnist, cifar10, cifar100"):
            f("mnist")
    assert DATASETS == ("digits", "fashion-mnist", "cifar10", "cifar100")


def test_digits_is_fixed_and_scaled():
    ds = load_dataset("digits")
    assert (len(ds.train), len(ds.test), ds.pad, ds.flip) == (1437, 360, 0, False)
    from sklearn.datasets import load_digits
    raw = load_digits().images
    assert set(np.unique(ds.train.x.numpy())) <= set(np.round(np.arange(17) * 255 / 16).astype(int))
    assert torch.equal(torch.cat([ds.train.x, ds.test.x]).double().sum(), torch.tensor(np.round(raw * 255 / 16).sum()))
    assert torch.equal(load_dataset("digits").test.y, ds.test.y)
    assert find_dataset("digits") == "scikit-learn (embedded)"


DEBIAN = FASHION_MNIST


def test_real_debian_fashion_mnist():
    require_system((DEBIAN / "train-images-idx3-ubyte.gz").exists(), "Debian's dataset-fashion-mnist")
    ds = load_dataset("fashion-mnist", root=DEBIAN, download=False)
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert ds.train.x.shape[1:] == (1, 28, 28) and ds.test.x.shape[1:] == (1, 28, 28)
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10


# ---- subsets, expert splits, exemplar memory -------------------------------------------------------------

def toy_dataset(n_per_class=(30, 20, 10, 40), size=4, channels=1):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    x = torch.randint(0, 256, (len(y), channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageDataset("toy", Split(x, y), Split(x.clone(), y.clone()), [str(c) for c in range(len(n_per_class))],
                        (0.5,) * channels, (0.25,) * channels, 1, True, "test")


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 100), st.integers(0, 1000))
def test_subset_is_stratified_and_seeded(n, seed):
    ds = toy_dataset()
    sub = ds.subset(n, None, seed)
    counts = torch.bincount(sub.train.y, minlength=4).double()
    assert len(sub.train) == n and len(sub.test) == len(ds.test)
    assert ((counts - n * torch.tensor([30, 20, 10, 40.]) / 100).abs() < 1 + 1e-9).all()
    assert torch.equal(sub.train.x, ds.subset(n, None, seed).train.x)


def test_expert_split():
    ds = toy_dataset(n_per_class=tuple(range(5, 15)))
    ex = expert_split(ds, 3, 3, seed=4)
    got = torch.cat([e.classes for e in ex])
    assert len(got.unique()) == 9 and got.dtype == torch.int64
    for e in ex:
        assert e.train.y.unique().tolist() == [0, 1, 2]
        assert torch.equal(e.classes[e.train.y], ds.train.y[torch.isin(ds.train.y, e.classes)])
        assert torch.equal(e.train.x, ds.train.x[torch.isin(ds.train.y, e.classes)])
    assert [e.classes.tolist() for e in ex] == [e.classes.tolist() for e in expert_split(ds, 3, 3, seed=4)]
    assert [e.classes.tolist() for e in ex] != [e.classes.tolist() for e in expert_split(ds, 3, 3, seed=5)]
    with pytest.raises(ValueError, match="4 experts x 3 classes = 12 > 10 classes in toy"):
        expert_split(ds, 4, 3)
    with pytest.raises(ValueError, match="n_experts must be >= 1, got 0"):
        expert_split(ds, 0, 3)
    with pytest.raises(ValueError, match="classes_per_expert must be >= 2"):
        expert_split(ds, 2, 1)


def brute_exemplars(feats, labels, k):
    out = []
    for c in sorted(set(labels.tolist())):
        members = [i for i in range(len(labels)) if labels[i] == c]
        mu = sum(feats[i] for i in members) / len(members)
        out += sorted(members, key=lambda i: (float(((feats[i] - mu) ** 2).sum()), i))[:k]
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 5), st.booleans())
def test_exemplar_memory_matches_brute_force(seed, n_classes, k, ties):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (40,), generator=g)
    labels[:n_classes * k] = torch.arange(n_classes).repeat_interleave(k)
    feats = torch.randint(-2, 3, (40, 3), generator=g).double() if ties else torch.randn(40, 3, generator=g, dtype=torch.float64)
    assert exemplar_memory(feats, labels, k).tolist() == brute_exemplars(feats, labels, k)


def test_exemplar_memory_errors():
    with pytest.raises(ValueError, match="class 1 has 2 samples, fewer than k=3"):
        exemplar_memory(torch.randn(7, 2), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2][:7]), 3)
    with pytest.raises(ValueError, match="feats must be"):
        exemplar_memory(torch.randn(7), torch.zeros(7, dtype=torch.long), 1)


# ---- the device loader -----------------------------------------------------------------------------------

def test_crop_flip_is_torchvisions_crop_for_every_offset():
    x = torch.randint(0, 256, (1, 3, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    p = 3
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            for f in (False, True):
                ours = crop_flip(x, torch.tensor([dy]), torch.tensor([dx]), torch.tensor([f]), p)[0]
                ref = TF.crop(TF.pad(x[0], p), dy, dx, 6, 5)
                assert torch.equal(ours, TF.hflip(ref) if f else ref), (dy, dx, f)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 4), st.integers(0, 99))
def test_crop_flip_batched_equals_per_sample(b, c, h, w, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    dy, dx = torch.randint(0, 2 * p + 1, (b,), generator=g), torch.randint(0, 2 * p + 1, (b,), generator=g)
    f = torch.rand(b, generator=g) < 0.5
    out = crop_flip(x, dy, dx, f, p)
    for i in range(b):
        ref = TF.crop(TF.pad(x[i], p), int(dy[i]), int(dx[i]), h, w)
        assert torch.equal(out[i], TF.hflip(ref) if f[i] else ref)


def outcome_histogram(outs, img, p):
    "Counts of each (dy, dx, flip), recovered by matching every output against every candidate."
    keys = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (False, True)]
    cands = torch.stack([crop_flip(img[None], torch.tensor([dy]), torch.tensor([dx]), torch.tensor([f]), p)[0]
                         for dy, dx, f in keys]).flatten(1)
    hits = (outs.flatten(1)[:, None] == cands[None]).all(-1)
    assert (hits.sum(1) == 1).all()
    return np.bincount(hits.int().argmax(1).numpy(), minlength=len(keys))


def test_augmentation_distribution_matches_torchvision():
    p, n = 2, 4000
    img = (torch.randperm(200, generator=torch.Generator().manual_seed(0))[:2 * 6 * 6] + 1).to(torch.uint8).view(2, 6, 6)
    split = Split(img[None].expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long))
    loader = DeviceLoader(split, 1000, train=True, mean=(0, 0), std=(1 / 255, 1 / 255), pad=p, flip=True, seed=3)
    ours = torch.cat([b[0] for b in loader]).round().to(torch.uint8)
    torch.manual_seed(0)
    tv = T.Compose([T.RandomCrop(6, padding=p), T.RandomHorizontalFlip()])
    theirs = torch.stack([tv(img) for _ in range(n)])
    h_ours, h_tv = outcome_histogram(ours, img, p), outcome_histogram(theirs, img, p)
    assert stats.chisquare(h_ours).pvalue > 1e-3
    assert stats.chisquare(h_tv).pvalue > 1e-3
    assert stats.chi2_contingency(np.stack([h_ours, h_tv])).pvalue > 1e-3


def test_epochs_are_seeded_permutations_and_resume_exactly():
    ds = toy_dataset()
    kw = dict(train=True, mean=(0.5,), std=(0.25,), pad=1, flip=True, seed=11)
    a = DeviceLoader(ds.train, 16, **kw)
    assert len(a) == 6 and a.drop_last
    def run(loader, epoch):
        loader.set_epoch(epoch)
        return [tuple(t.clone() for t in b) for b in loader]
    e = {k: run(a, k) for k in (0, 1, 2)}
    for batches in e.values():
        idx = torch.cat([b[2] for b in batches])
        assert len(idx.unique()) == 96 and all(len(b[2]) == 16 for b in batches)
        assert torch.equal(torch.cat([b[1] for b in batches]), ds.train.y[idx])
    assert not torch.equal(e[0][0][2], e[1][0][2])
    fresh = DeviceLoader(ds.train, 16, **kw)
    for got, want in zip(run(fresh, 2), e[2]):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(g, w) for g, w in zip(run(a, 0)[0], e[0][0]))


def test_eval_is_sequential_complete_and_normalised():
    ds = toy_dataset(channels=3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    ev = DeviceLoader(ds.test, 32, train=False, mean=mean, std=std, pad=4, flip=True)
    batches = list(ev)
    assert len(ev) == 4 and [len(b[1]) for b in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(100))
    want = (ds.test.x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.cat([b[0] for b in batches]).double(), want, rtol=0, atol=1e-5)


def test_channels_last_option():
    ds = toy_dataset(channels=3)
    x = next(iter(DeviceLoader(ds.test, 8, train=False, mean=(0,) * 3, std=(1,) * 3, channels_last=True)))[0]
    assert x.is_contiguous(memory_format=torch.channels_last)
    x = next(iter(DeviceLoader(ds.test, 8, train=False, mean=(0,) * 3, std=(1,) * 3)))[0]
    assert x.is_contiguous()


@pytest.mark.parametrize("kw,msg", [
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(batch_size=2.5), "batch_size must be an int >= 1, got 2.5"),
    (dict(batch_size=101), "batch_size 101 > 100 samples with drop_last=True"),
    (dict(pad=-2), "pad must be an int >= 0, got -2"),
    (dict(mean=(0.5, 0.5)), r"mean and std need one value per channel \(1\), got 2 and 1"),
    (dict(std=()), r"mean and std need one value per channel \(1\), got 1 and 0"),
    (dict(std=(-1.0,)), "std must be > 0"),
])
def test_loader_argument_errors(kw, msg):
    args = dict(batch_size=10, train=True, mean=(0.5,), std=(0.25,)) | kw
    with pytest.raises(ValueError, match=msg):
        DeviceLoader(toy_dataset().train, args.pop("batch_size"), **args)


def test_make_loaders():
    ds = toy_dataset(channels=3)  # pad 1, flip
    tr, te = make_loaders(ds, 16, seed=5)
    assert (tr.train, tr.pad, tr.flip, tr.seed, tr.batch_size, tr.drop_last, tr.channels_last) == (True, 1, True, 5, 16, True, False)
    assert (te.train, te.batch_size, te.drop_last, len(te)) == (False, 32, False, 4)
    assert torch.equal(tr.x, ds.train.x) and torch.equal(te.x, ds.test.x)
    want = DeviceLoader(ds.train, 16, train=True, mean=ds.mean, std=ds.std, pad=1, flip=True, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(next(iter(tr)), next(iter(want))))
    tr, te = make_loaders(ds, 16, augment=False, eval_batch_size=7, channels_last=True)
    assert (tr.pad, tr.flip, tr.seed, te.batch_size, tr.channels_last, te.channels_last) == (0, False, 0, 7, True, True)
    assert next(iter(te))[0].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"batch_size 101 is larger than the training split \(100 samples\)"):
        make_loaders(ds, 101)
    with pytest.raises(TypeError):
        make_loaders(ds, 16, "cpu")  # keyword-only options


def test_device_sync_and_median_times():
    cuda = ("cuda", torch.device("cuda", 0)) if torch.cuda.is_available() else ()
    for dev in ("cpu", torch.device("cpu"), None, *cuda):
        assert device_sync(dev) is None
    calls = []
    fns = [lambda: calls.append(0), lambda: calls.append(1)]
    times = median_times(fns, reps=4, warmup=2, device="cpu")
    assert calls == [0, 1] * 6 and len(times) == 2 and all(t >= 0 for t in times)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="reps must be an integer >= 1"):
            median_times(fns, reps=bad)


def test_bench_loader_reports_both_rates_and_their_ratio():
    r = bench_loader(toy_dataset(size=8), batch_size=16, n_batches=2)
    assert r["device_loader"] > 0 and r["dataloader"] > 0
    assert r["ratio"] == pytest.approx(r["device_loader"] / r["dataloader"])
    assert (r["n_batches"], r["batch_size"], r["device"]) == (2, 16, "cpu")
