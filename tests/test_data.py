"""Data layer: Fashion-MNIST and image folders to FFCV and back, verification, deterministic loaders, CLI."""
import functools
import gzip
import importlib.util
import os
import shutil
import struct

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from typer.testing import CliRunner

from bvit.config import DataConfig
from bvit.data.fashion_mnist import DEBIAN_FASHION_MNIST, prepare_fashion_mnist, read_idx
from bvit.data.format import DataError, load_metadata
from bvit.data.image_folder import prepare_image_folder
from bvit.data.loaders import epoch_order, make_loaders, mixup, pad_crop_flip, random_resized_crop_flip
from orchestrator.cli.app import data_app as app

runner = CliRunner()


@functools.cache
def idx(split: str, what: str) -> np.ndarray:
    stem = {"train": "train", "test": "t10k"}[split]
    kind = {"images": "images-idx3", "labels": "labels-idx1"}[what]
    return read_idx(DEBIAN_FASHION_MNIST / f"{stem}-{kind}-ubyte.gz", ndim=3 if what == "images" else 1)


def read_beton(path) -> tuple[np.ndarray, np.ndarray]:
    """Every stored item, in file order, straight from FFCV (no augmentation, no normalisation)."""
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(path), batch_size=5000, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [NDArrayDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]})
    images, labels = zip(*[(x.numpy().copy(), y.numpy().ravel().copy()) for x, y in loader], strict=True)
    return np.concatenate(images), np.concatenate(labels)


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"num_workers": 1, **kw})


# ---- Fashion-MNIST --------------------------------------------------------------------------------------

@pytest.mark.parametrize("split, count", [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist_reads_back_every_item_equal_to_idx(fmnist_dir, split, count):
    images, labels = read_beton(fmnist_dir / f"{split}.beton")
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [count // 10] * 10
    np.testing.assert_array_equal(labels, idx(split, "labels"))
    np.testing.assert_array_equal(images, idx(split, "images"))


def test_fashion_mnist_metadata(fmnist_dir):
    meta = load_metadata(fmnist_dir)
    assert meta["num_classes"] == 10 and meta["class_names"][0] == "T-shirt/top" and meta["class_names"][9] == "Ankle boot"
    assert meta["image_shape"] == [1, 28, 28]
    assert (meta["train_count"], meta["test_count"]) == (60_000, 10_000)
    train = idx("train", "images").astype(np.float64)
    assert meta["mean"] == pytest.approx([train.mean()], abs=1e-3)  # 72.94 in pixel units
    assert meta["std"] == pytest.approx([train.std()], abs=1e-3)  # 90.02
    assert meta["ffcv_version"] == "1.0.2"
    assert len(meta["source"]["files"]) == 4 and all(d.startswith("sha256:") for d in meta["source"]["files"].values())


def test_rerun_on_up_to_date_output_does_nothing(fmnist_dir):
    before = {p.name: p.stat().st_mtime_ns for p in fmnist_dir.iterdir()}
    result = runner.invoke(app, ["prepare", "fashion-mnist", "--out", str(fmnist_dir)])
    assert result.exit_code == 0, result.output
    assert "up to date, nothing to do" in result.output and "60,000 train / 10,000 test" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in fmnist_dir.iterdir()} == before


@pytest.fixture
def fmnist_copy(fmnist_dir, tmp_path):
    return shutil.copytree(fmnist_dir, tmp_path / "copy")


def test_truncated_beton_is_refused_naming_the_file_then_rebuilt(fmnist_copy):
    beton = fmnist_copy / "train.beton"
    with open(beton, "r+b") as f:
        f.truncate(beton.stat().st_size // 2)
    with pytest.raises(DataError, match=r"train\.beton: truncated .*re-run `bvit-sweep data prepare fashion-mnist"):
        load_metadata(fmnist_copy)
    with pytest.raises(DataError, match=r"train\.beton: truncated"):
        make_loaders(cfg(fmnist_copy), img_size=28, seed=0)
    verify = runner.invoke(app, ["verify", str(fmnist_copy)])
    assert verify.exit_code == 2 and "train.beton: truncated" in verify.output  # a damaged file: bad input
    result = prepare_fashion_mnist(out=fmnist_copy)
    assert result["status"] == "written" and "truncated" in result["reason"]
    assert load_metadata(fmnist_copy)["train_count"] == 60_000
    assert "ok -- fashion-mnist, 60,000 train / 10,000 test" in runner.invoke(app, ["verify", str(fmnist_copy)]).output


def test_modified_or_swapped_beton_is_refused(fmnist_copy):
    beton = fmnist_copy / "test.beton"
    with open(beton, "r+b") as f:
        f.seek(beton.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match=r"test\.beton: content does not match the checksum"):
        load_metadata(fmnist_copy)
    shutil.copy(fmnist_copy / "train.beton", beton)
    with pytest.raises(DataError, match=r"test\.beton: larger than recorded"):
        load_metadata(fmnist_copy)
    (fmnist_copy / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json: missing .*never prepared or preparation was interrupted"):
        load_metadata(fmnist_copy)


def test_missing_source_says_which_package_or_option(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: Fashion-MNIST directory not found; install the Debian package "
                                        r"\(apt-get install dataset-fashion-mnist\) or pass --source"):
        prepare_fashion_mnist(out=tmp_path / "out", source=tmp_path / "nowhere")
    src = tmp_path / "partial"
    src.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(DEBIAN_FASHION_MNIST / name, src)
    result = runner.invoke(app, ["prepare", "fashion-mnist", "--source", str(src), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "t10k-labels-idx1-ubyte.gz: missing" in result.output and "dataset-fashion-mnist" in result.output


def write_idx(path, array: np.ndarray, *, magic: bytes | None = None, dims=None, compress=True):
    magic = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    blob = magic + struct.pack(f">{array.ndim}I", *(dims or array.shape)) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)


@pytest.fixture
def small_idx(tmp_path):
    """A valid 40/20-item Fashion-MNIST-format source (uncompressed labels: both forms are accepted)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for stem, n in (("train", 40), ("t10k", 20)):
        write_idx(src / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(src / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10, compress=False)
    return src


def test_small_idx_source_prepares(small_idx, tmp_path):
    meta = prepare_fashion_mnist(out=tmp_path / "o", source=small_idx)
    assert (meta["train_count"], meta["test_count"], meta["train_per_class"]) == (40, 20, [4] * 10)
    images, labels = read_beton(tmp_path / "o" / "train.beton")
    np.testing.assert_array_equal(images, read_idx(small_idx / "train-images-idx3-ubyte.gz", ndim=3))


@pytest.mark.parametrize("damage, message", [
    ("magic", r"train-images-idx3-ubyte\.gz: bad IDX magic 00000903"),
    ("truncated", r"train-images-idx3-ubyte\.gz: truncated: header says 40x28x28 items = 31376 bytes"),
    ("trailing", r"train-images-idx3-ubyte\.gz: has trailing bytes"),
    ("gzip", r"train-images-idx3-ubyte\.gz: cannot read .*damaged"),
    ("count", r"t10k-labels-idx1-ubyte: 19 labels for 20 images"),
    ("label", r"train-labels-idx1-ubyte: label 12 out of range 0\.\.9"),
    ("shape", r"train-images-idx3-ubyte\.gz: images are 28x27"),
])
def test_corrupt_idx_is_a_clear_error_naming_the_file(small_idx, tmp_path, damage, message):
    images = small_idx / "train-images-idx3-ubyte.gz"
    pixels = np.zeros((40, 28, 28))
    if damage == "magic":
        write_idx(images, pixels, magic=bytes([0, 0, 9, 3]))
    elif damage == "truncated":
        images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))
    elif damage == "trailing":
        images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes()) + b"\0"))
    elif damage == "gzip":
        images.write_bytes(images.read_bytes()[:500])
    elif damage == "count":
        write_idx(small_idx / "t10k-labels-idx1-ubyte", np.arange(19) % 10, compress=False)
    elif damage == "label":
        write_idx(small_idx / "train-labels-idx1-ubyte", np.full(40, 12), compress=False)
    elif damage == "shape":
        write_idx(images, np.zeros((40, 28, 27)))
    with pytest.raises(DataError, match=message):
        prepare_fashion_mnist(out=tmp_path / "o", source=small_idx)
    assert not (tmp_path / "o" / "meta.json").exists()


# ---- loaders --------------------------------------------------------------------------------------------

def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_train_batches_are_a_function_of_seed_and_epoch_only(fmnist_dir):
    c = cfg(fmnist_dir, train_subset=1024, batch_size=128, augment="crop-flip", mixup=0.4)
    fresh = batches(make_loaders(c, img_size=28, seed=7).train(3))
    used = make_loaders(c, img_size=28, seed=7)
    epoch1, _ = batches(used.train(1)), batches(used.train(2))
    assert same(batches(used.train(3)), fresh)
    assert same(batches(used.train(1)), epoch1)
    assert not same(epoch1, fresh)
    assert not same(batches(make_loaders(c, img_size=28, seed=8).train(3)), fresh)
    x, target = fresh[0]
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32
    assert target.shape == (128, 10) and target.dtype == torch.float32  # mixup: soft targets
    torch.testing.assert_close(target.sum(1), torch.ones(128))


def test_train_order_and_pixels_match_the_source(fmnist_dir):
    meta = load_metadata(fmnist_dir)
    loaders = make_loaders(cfg(fmnist_dir, train_subset=1000, batch_size=128, augment="none"), img_size=28, seed=3)
    assert loaders.steps_per_epoch == 7  # drop-last: 1000 // 128
    got = batches(loaders.train(5))
    assert [len(y) for _, y in got] == [128] * 7
    order = epoch_order(np.arange(1000), seed=3, epoch=5)[:7 * 128]
    labels, images = idx("train", "labels"), idx("train", "images")
    np.testing.assert_array_equal(torch.cat([y for _, y in got]).numpy(), labels[order])
    x = torch.cat([x for x, _ in got])
    assert x.shape == (896, 1, 28, 28)
    np.testing.assert_array_equal((x * meta["std"][0] + meta["mean"][0]).round().to(torch.uint8)[:, 0].numpy(),
                                  images[order])
    augmented = batches(make_loaders(cfg(fmnist_dir, train_subset=1000, batch_size=128), img_size=28, seed=3).train(5))
    assert torch.equal(torch.cat([y for _, y in augmented]), torch.cat([y for _, y in got]))  # same order
    assert not torch.equal(torch.cat([a for a, _ in augmented]), x)  # crop-flip changed the pixels


def test_eval_sees_every_test_image_once_in_order(fmnist_dir):
    loaders = make_loaders(cfg(fmnist_dir, train_subset=512, eval_batch_size=3000), img_size=28, seed=0)
    got = batches(loaders.eval())
    assert [len(y) for _, y in got] == [3000, 3000, 3000, 1000] and loaders.eval_steps == 4
    y = torch.cat([y for _, y in got])
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), idx("test", "labels"))
    x = torch.cat([x for x, _ in got])
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # normalised


def test_loaders_leave_torch_thread_count_alone(fmnist_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loaders = make_loaders(cfg(fmnist_dir, train_subset=512, num_workers=1), img_size=28, seed=0)
        for _ in loaders.train(0):
            pass
        for _ in loaders.eval():
            pass
        assert torch.get_num_threads() == 2  # FFCV alone would have set it to num_workers=1
    finally:
        torch.set_num_threads(before)


def test_config_mismatches_are_clear_errors(fmnist_dir):
    with pytest.raises(DataError, match=r"images are 28x28 px but model\.img_size=32"):
        make_loaders(cfg(fmnist_dir), img_size=32, seed=0)
    with pytest.raises(DataError, match=r"data\.train_subset=70000 exceeds the 60000 training items"):
        make_loaders(cfg(fmnist_dir, train_subset=70_000), img_size=28, seed=0)
    with pytest.raises(DataError, match=r"data\.batch_size=256 exceeds the 100 training items"):
        make_loaders(cfg(fmnist_dir, train_subset=100), img_size=28, seed=0)


def test_epoch_order_shards_like_distributed_sampler():
    indices = np.arange(10)
    shards = [epoch_order(indices, seed=1, epoch=4, rank=r, world=3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    whole = epoch_order(indices, seed=1, epoch=4)
    assert sorted(np.concatenate(shards).tolist()) == sorted(indices.tolist() + whole[:2].tolist())  # 2 wrapped
    np.testing.assert_array_equal(shards[1], epoch_order(indices, seed=1, epoch=4, rank=1, world=3))
    assert not np.array_equal(epoch_order(indices, seed=0, epoch=1), epoch_order(indices, seed=1, epoch=0))


def _shard_worker(rank: int, world: int, port: int, path: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loaders = make_loaders(cfg(path, train_subset=1000, batch_size=100, augment="none"), img_size=28, seed=5,
                           distributed=True)
    labels = torch.cat([y for _, y in loaders.train(2)])
    n_eval = sum(len(y) for _, y in loaders.eval())
    torch.save({"labels": labels, "steps": loaders.steps_per_epoch, "eval": n_eval}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_read_disjoint_shards_of_the_epoch(fmnist_dir, tmp_path, free_port):
    mp.spawn(_shard_worker, args=(2, free_port, str(fmnist_dir), str(tmp_path / "r")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"r.{r}") for r in range(2))
    assert r0["steps"] == r1["steps"] == 5 and r0["eval"] == r1["eval"] == 10_000
    order = epoch_order(np.arange(1000), seed=5, epoch=2)
    labels = idx("train", "labels")
    np.testing.assert_array_equal(r0["labels"].numpy(), labels[order[0::2]])
    np.testing.assert_array_equal(r1["labels"].numpy(), labels[order[1::2]])


def test_pad_crop_flip_yields_a_shifted_or_mirrored_window():
    x = torch.randint(0, 256, (64, 2, 6, 6), dtype=torch.uint8)
    out = pad_crop_flip(x, 2, np.random.default_rng(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(64):
        windows = {(dy, dx): padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)}
        hits = [(dy, dx, f) for (dy, dx), w in windows.items() for f in (0, 1)
                if torch.equal(out[i], w.flip(-1) if f else w)]
        assert hits, f"image {i} is no window of its padded input"
        seen.update(hits)
    assert {f for *_, f in seen} == {0, 1} and len({(dy, dx) for dy, dx, _ in seen}) > 10


def test_rrc_at_full_scale_is_identity_or_mirror_and_mixup_mixes():
    x = torch.rand(32, 3, 12, 12)
    out = random_resized_crop_flip(x, 12, np.random.default_rng(0), scale=(1, 1), ratio=(1, 1))
    flipped = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x, strict=True)]
    assert all(f or torch.allclose(o, i, atol=1e-5) for f, o, i in zip(flipped, out, x, strict=True)) and 0 < sum(flipped) < 32
    assert random_resized_crop_flip(x, 7, np.random.default_rng(0)).shape == (32, 3, 7, 7)
    y = torch.arange(32) % 10
    mixed, target = mixup(x, y, alpha=1.0, num_classes=10, rng=np.random.default_rng(1))
    lam = target[0, y[0]].item()  # y[0] != y[-1]
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(target.sum(1), torch.ones(32))


# ---- image folders --------------------------------------------------------------------------------------

def save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


@pytest.fixture
def folder(tmp_path):
    """3 classes; PNG (RGB, grey, RGBA) and JPEG of odd sizes; a corrupt JPEG, a truncated PNG, a text file."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for c, name in enumerate(("cat", "dog", "frog")):
        for i in range(5):
            h, w = 17 + 6 * i + c, 23 + 4 * i
            save(src / "train" / name / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            save(src / "train" / name / f"{i}.jpg", rng.integers(0, 256, (w, h, 3), dtype=np.uint8), quality=95)
        save(src / "train" / name / "grey.png", rng.integers(0, 256, (19, 21), dtype=np.uint8))
        save(src / "train" / name / "alpha.png", rng.integers(0, 256, (21, 19, 4), dtype=np.uint8))
        if name != "frog":  # val lacks a class: allowed
            for i in range(3):
                ramp = np.linspace(0, 1, 24)[:, None, None] * rng.uniform(40, 200, 3) + rng.uniform(0, 50, 3)
                smooth = np.broadcast_to(ramp, (24, 24, 3)) + rng.uniform(0, 4, (24, 24, 3))
                save(src / "val" / name / f"v{i}.png", smooth.astype(np.uint8))
    (src / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (src / "train" / "cat" / "0.png").read_bytes()
    (src / "train" / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "train" / "frog" / "notes.txt").write_text("not an image")
    (src / "train" / "frog" / ".DS_Store").write_bytes(b"\0\0")
    return src


def test_image_folder_skips_and_reports_unreadable_files_and_reads_back(folder, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["prepare", "image-folder", "--src", str(folder), "--out", str(out),
                                 "--max-res", "30", "--raw", "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "skipped 3 unreadable file(s)" in result.output and "train/dog/broken.jpg" in result.output
    meta = load_metadata(out)
    assert meta["class_names"] == ["cat", "dog", "frog"] and meta["num_classes"] == 3
    assert (meta["train_count"], meta["test_count"]) == (36, 6)
    assert meta["train_per_class"] == [12, 12, 12] and meta["test_per_class"] == [3, 3, 0]
    assert sorted(s["path"] for s in meta["skipped"]) == [
        "train/cat/truncated.png", "train/dog/broken.jpg", "train/frog/notes.txt"]
    assert meta["image_shape"][0] == 3 and max(meta["image_shape"][1:]) <= 30 and not meta["fixed_size"]

    # val is 24x24: with img_size 24 the centre square is the whole image, pixel-exact in raw mode
    loaders = make_loaders(cfg(out, batch_size=8, eval_batch_size=4, augment="none"), img_size=24, seed=0)
    x, y = map(torch.cat, zip(*batches(loaders.eval()), strict=True))
    assert x.shape == (6, 3, 24, 24) and y.tolist() == [0, 0, 0, 1, 1, 1]
    pixels = (x * torch.tensor(meta["std"]).view(1, 3, 1, 1) + torch.tensor(meta["mean"]).view(1, 3, 1, 1))
    expected = np.stack([np.asarray(Image.open(folder / "val" / c / f"v{i}.png")) for c in ("cat", "dog")
                         for i in range(3)])
    np.testing.assert_array_equal(pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), expected)

    train = batches(make_loaders(cfg(out, batch_size=6, augment="rrc-flip"), img_size=16, seed=0).train(0))
    assert len(train) == 6 and train[0][0].shape == (6, 3, 16, 16)
    assert sorted(torch.cat([y for _, y in train]).tolist()) == [0] * 12 + [1] * 12 + [2] * 12

    again = runner.invoke(app, ["prepare", "image-folder", "--src", str(folder), "--out", str(out),
                                "--max-res", "30", "--raw", "--quiet"])
    assert "up to date, nothing to do" in again.output
    save(folder / "train" / "frog" / "new.png", np.zeros((9, 9, 3), np.uint8))
    redo = prepare_image_folder(src=folder, out=out, max_res=30, jpeg_quality=None, workers=1)
    assert redo["status"] == "written" and redo["reason"] == "source changed since the last preparation"
    assert redo["train_count"] == 37


def test_image_folder_jpeg_storage_is_close_to_source(folder, tmp_path):
    meta = prepare_image_folder(src=folder, out=tmp_path / "jpg", jpeg_quality=95, workers=1)
    assert meta["params"]["jpeg_quality"] == 95 and len(meta["skipped"]) == 3
    loaders = make_loaders(cfg(tmp_path / "jpg", batch_size=4, eval_batch_size=6, augment="crop-flip"),
                           img_size=24, seed=0)
    x, _ = next(iter(loaders.eval()))
    pixels = x * torch.tensor(meta["std"]).view(1, 3, 1, 1) + torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    source = torch.from_numpy(np.array(Image.open(folder / "val" / "cat" / "v0.png"))).permute(2, 0, 1).float()
    assert 0 < (pixels[0] - source).abs().mean() < 3  # lossy, but the same image


def test_image_folder_strict_stops_at_the_first_bad_file(folder, tmp_path):
    with pytest.raises(DataError, match=r"train/cat/truncated\.png: unreadable image .*without --strict"):
        prepare_image_folder(src=folder, out=tmp_path / "o", strict=True, workers=1)


def test_image_folder_layout_errors(folder, tmp_path):
    shutil.rmtree(folder / "val")
    with pytest.raises(DataError, match=r"src/val: missing; an image-folder data set needs"):
        prepare_image_folder(src=folder, out=tmp_path / "o", workers=1)
    (folder / "val" / "zebra").mkdir(parents=True)
    with pytest.raises(DataError, match=r"val/zebra: class not present under"):
        prepare_image_folder(src=folder, out=tmp_path / "o", workers=1)


# ---- benchmark --------------------------------------------------------------------------------------------

def test_loader_benchmark_prints_both_rates_and_ratio(fmnist_dir, capsys):
    spec = importlib.util.spec_from_file_location("bench_loader", os.path.join(os.path.dirname(__file__), "..",
                                                                              "bench", "loader.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rates = bench.main(["--data", str(fmnist_dir), "--max-items", "1024", "--workers", "1", "--model-steps", "1",
                        "--batch-size", "64"])
    out = capsys.readouterr().out
    assert "FFCV (bvit.data)" in out and "torch DataLoader + torchvision.transforms.v2" in out
    assert f"{rates['ratio']:.1f} x" in out and "bViT default training" in out
    # the printed table is the measurement returned (no machine-speed threshold: this is a shared CPU)
    assert rates["ratio"] == rates["ffcv"] / rates["dataloader"]
    for key in ("ffcv", "dataloader", "model"):
        assert f"{rates[key]:>12,.0f} img/s" in out, key


_DECODE_BOTH_MODES = """
import hashlib, sys
from pathlib import Path
import torch
if sys.argv[1] == "numba-dict":
    import ffcv  # FFCV's own import: IMAGE_MODES is numba's typed Dict
torch.set_num_threads(2)
from bvit.data.format import import_ffcv
import_ffcv()
import numba.typed
from ffcv.fields import rgb_image
from bvit.config import DataConfig
from bvit.data.image_folder import prepare_image_folder
from bvit.data.loaders import make_loaders
assert torch.get_num_threads() == 2, torch.get_num_threads()
digest = hashlib.sha256()
for quality in (None, 95):  # raw and JPEG storage: both decoders read IMAGE_MODES
    out = Path(sys.argv[2]) / f"{sys.argv[1]}-{quality}"
    prepare_image_folder(src=Path(sys.argv[3]), out=out, jpeg_quality=quality, workers=1)
    loaders = make_loaders(DataConfig(path=str(out), num_workers=1, batch_size=6, augment="rrc-flip"), img_size=16, seed=0)
    for x, y in [*loaders.eval(), *loaders.train(0)]:
        digest.update(x.numpy().tobytes() + y.numpy().tobytes())
print(type(rgb_image.IMAGE_MODES).__name__, dict(rgb_image.IMAGE_MODES), numba.typed.Dict.__module__, digest.hexdigest())
"""


def test_ffcv_imported_without_its_typed_dict_compile_decodes_the_same(folder, tmp_path):
    """`import_ffcv` skips FFCV's import-time numba compile (~1.8 s of every data process's start) by building
    FFCV's image-mode table as a plain dict: raw and JPEG images decode to the same bytes as with FFCV's own
    typed Dict, numba's `Dict` is numba's again afterwards, torch's thread count is kept."""
    import subprocess
    import sys

    def run(mode):
        proc = subprocess.run([sys.executable, "-c", _DECODE_BOTH_MODES, mode, str(tmp_path), str(folder)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.split()

    fast, numba_dict = run("fast"), run("numba-dict")
    assert fast[:3] == ["dict", "{'jpg':", "0,"] and numba_dict[0] == "Dict"
    assert fast[-2] == numba_dict[-2] == "numba.typed.typeddict"
    assert fast[-1] == numba_dict[-1]
