"""ImageFolderDataModule: discovery, validation, SDXL size conditioning, buckets, caption
dropout, held-out split, cache, exact resume (also through Lightning) and DDP sharding."""

import io
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgm.data.buckets import BucketBatchSampler, aspect_error, make_buckets
from sgm.data.datamodule import ImageFolderDataModule
from sgm.data.transforms import load_view, plan_crop

GOOD = {  # name: (size (w, h) as PIL gives it, mode)
    "a_wide.png": ((40, 24), "RGB"),
    "b_tall.jpg": ((24, 40), "RGB"),
    "c_square.png": ((64, 64), "RGB"),
    "sub/d_gray.png": ((48, 32), "L"),
    "e_rgba.png": ((32, 32), "RGBA"),
    "f_palette.png": ((32, 48), "P"),
    "g_nocap.webp": ((36, 36), "RGB"),
    "sub/deeper/h_wide2.bmp": ((56, 24), "RGB"),
}
BAD = {"bad_corrupt.png": "not a valid image", "bad_trunc.jpg": "cannot be decoded",
       "bad_empty.png": "empty file", "bad_small.png": "too small"}


def _noise(w, h, seed, channels=3):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    return arr


def make_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k, (name, ((w, h), mode)) in enumerate(GOOD.items()):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if mode == "L":
            im = Image.fromarray(_noise(w, h, k, 1), "L")
        elif mode == "RGBA":
            arr = np.concatenate([_noise(w, h, k), np.full((h, w, 1), 255, np.uint8)], axis=2)
            arr[:, : w // 2, 3] = 0  # left half fully transparent -> white
            im = Image.fromarray(arr, "RGBA")
        elif mode == "P":
            im = Image.fromarray(_noise(w, h, k), "RGB").quantize(16)
        else:
            im = Image.fromarray(_noise(w, h, k), "RGB")
        im.save(p, quality=95) if p.suffix == ".jpg" else im.save(p)
    (root / "a_wide.txt").write_text("a wide image\n")
    (root / "c_square.txt").write_text("a square")
    (root / "e_rgba.txt").write_text("half transparent")
    (root / "f_palette.txt").write_text("few colours")
    (root / "sub/deeper/h_wide2.txt").write_text("very wide")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b_tall.jpg", "text": "a tall image"}) + "\n"
        + json.dumps({"file_name": "sub/d_gray.png", "caption": "grey", "aesthetic_score": 5.0}) + "\n"
        + json.dumps({"file_name": "a_wide.png", "text": "loses to the .txt file"}) + "\n")
    (root / "notes.md").write_text("not an image")
    (root / "bad_corrupt.png").write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(_noise(40, 40, 9)).save(buf, "JPEG", quality=95)
    (root / "bad_trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "bad_empty.png").write_bytes(b"")
    Image.fromarray(_noise(8, 8, 10)).save(root / "bad_small.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


def dm_for(root, **kw):
    kw = {"resolution": 32, "min_size": 16, "bucket_step": 8, **kw}
    dm = ImageFolderDataModule(str(root), **kw)
    dm.setup("fit")
    return dm


def epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [b for b in loader]


# -- discovery and validation -------------------------------------------------------------
def test_discovery_captions_and_skipped_files(folder, caplog):
    caplog.set_level(logging.WARNING, logger="sgm.data.images")
    dm = dm_for(folder)
    rels = [r.relpath for r in dm.train_records]
    assert rels == sorted(GOOD, key=str)  # sorted, recursive, no bad or non-image files
    skipped = {Path(p).name: reason for p, reason in dm.skipped}
    assert set(skipped) == set(BAD)
    for name, why in BAD.items():
        assert why in skipped[name], (name, skipped[name])
        assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), name
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() and "of" in r.getMessage()]
    assert len(summary) == 1 and summary[0].startswith("4 of 12 image files")
    caps = {r.relpath: r.caption for r in dm.train_records}
    assert caps["a_wide.png"] == "a wide image"  # the .txt beats metadata.jsonl
    assert caps["b_tall.jpg"] == "a tall image" and caps["sub/d_gray.png"] == "grey"
    assert caps["g_nocap.webp"] == "" and [Path(p).name for p in dm.missing_captions] == ["g_nocap.webp"]
    assert any("1 of 8 images" in r.getMessage() and "no caption" in r.getMessage() for r in caplog.records)
    sizes = {r.relpath: r.size for r in dm.train_records}
    assert all(sizes[n] == (wh[1], wh[0]) for n, (wh, _) in GOOD.items())


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=str(tmp_path)):
        dm_for(tmp_path)
    with pytest.raises(FileNotFoundError):
        dm_for(tmp_path / "missing")


# -- resize, crop, conditioning -----------------------------------------------------------
def test_center_crop_sizes_and_pixels(folder):
    dm = dm_for(folder, shuffle=False)
    ds = dm.train_dataset
    by = {Path(r.path).name: i for i, r in enumerate(ds.records)}
    # wide 40x24 (h=24, w=40) -> covers 32x32 at scale 4/3: resized (32, 53), centred left = (53-32)//2 = 10
    it = ds.get_item(by["a_wide.png"])
    assert it["original_size_as_tuple"] == (24, 40) and it["target_size_as_tuple"] == (32, 32)
    assert it["crop_coords_top_left"] == (0, 10)
    # tall 24x40 -> resized (53, 32), top = 10; 64x64 -> (32, 32), no crop; 56x24 -> (32, 75), left 21
    assert ds.get_item(by["b_tall.jpg"])["crop_coords_top_left"] == (10, 0)
    assert ds.get_item(by["c_square.png"])["crop_coords_top_left"] == (0, 0)
    assert ds.get_item(by["h_wide2.bmp"])["crop_coords_top_left"] == (0, 21)
    x = it["jpg"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    ref = Image.open(ds.records[by["a_wide.png"]].path).convert("RGB").resize((53, 32), Image.Resampling.LANCZOS,
                                                                              reducing_gap=3.0)
    ref = np.asarray(ref.crop((10, 0, 42, 32)), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(x, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-6)
    # a [h, w] resolution
    assert dm_for(folder, resolution=[16, 32]).train_dataset.get_item(by["c_square.png"])["crop_coords_top_left"] == (8, 0)


def test_modes_are_converted_to_rgb(folder):
    ds = dm_for(folder).train_dataset
    by = {Path(r.path).name: i for i, r in enumerate(ds.records)}
    gray = ds.get_item(by["d_gray.png"])["jpg"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = ds.get_item(by["e_rgba.png"])["jpg"]  # 32x32: no resize; left half transparent -> white
    assert torch.all(rgba[:, :, :14] == 1.0) and rgba[:, :, 18:].min() < 0.5
    pal = ds.get_item(by["f_palette.png"])["jpg"]
    ref = np.asarray(Image.open(ds.records[by["f_palette.png"]].path).convert("RGB"), np.float32)[8:40] / 127.5 - 1
    assert torch.allclose(pal, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-6)  # 32x48 -> crop top 8


def test_exif_orientation_and_16_bit(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 24 high, shown rotated: 24 wide x 40 high
    Image.fromarray(_noise(40, 24, 3)).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    grey16 = np.zeros((32, 32), np.uint16)
    grey16[:, 16:] = 65535
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    ds = dm_for(tmp_path, shuffle=False).train_dataset
    rec = {Path(r.path).name: (i, r) for i, r in enumerate(ds.records)}
    i, r = rec["rotated.jpg"]
    assert r.size == (40, 24) and ds.get_item(i)["original_size_as_tuple"] == (40, 24)
    assert ds.get_item(i)["crop_coords_top_left"] == (10, 0)  # a tall image: cropped vertically
    x = ds.get_item(rec["grey16.png"][0])["jpg"]
    assert torch.all(x[:, :, :16] == -1.0) and torch.all(x[:, :, 16:] == 1.0)


def test_random_crop_and_flip(folder):
    dm = dm_for(folder, random_crop=True, flip=True)
    ds = dm.train_dataset
    seen_crops, flips = set(), []
    for epoch in range(12):
        for i in range(len(ds)):
            plan, _ = ds.plan(i, epoch)
            (rh, rw), (th, tw) = plan.resized, plan.target
            assert 0 <= plan.top <= rh - th and 0 <= plan.left <= rw - tw
            top, left = plan.crop_coords
            assert 0 <= top <= rh - th and 0 <= left <= rw - tw
            seen_crops.add((i, plan.top, plan.left))
            flips.append(plan.flip)
    assert len(seen_crops) > 2 * len(ds) and 0.3 < np.mean(flips) < 0.7
    # a mirrored item is the crop at crop_coords of the mirrored resized image
    i, epoch = next((i, e) for e in range(12) for i in range(len(ds)) if ds.plan(i, e)[0].flip and
                    ds.records[i].relpath == "sub/deeper/h_wide2.bmp")
    item = ds.get_item(i, epoch)
    plan = ds.plan(i, epoch)[0]
    top, left = item["crop_coords_top_left"]
    assert (top, left) == (plan.top, plan.resized[1] - 32 - plan.left)
    full = Image.open(ds.records[i].path).convert("RGB").resize(plan.resized[::-1], Image.Resampling.LANCZOS,
                                                                 reducing_gap=3.0)
    full = full.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((left, top, left + 32, top + 32))
    ref = torch.from_numpy(np.asarray(full, np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(item["jpg"], ref, atol=1e-6)
    unflipped = load_view(ds.records[i].path, plan_crop(ds.records[i].size, (32, 32), True, False, (0, 0)))
    assert unflipped.shape == ref.shape
    assert torch.equal(ds.get_item(i, epoch)["jpg"], item["jpg"])  # deterministic per (epoch, index)


# -- buckets ------------------------------------------------------------------------------
def test_bucket_list():
    b = make_buckets((1024, 1024), 64)
    assert {(1024, 1024), (896, 1152), (832, 1216), (768, 1344), (704, 1408), (1408, 704)} <= set(b)
    for h, w in b:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2 and max(h, w) <= 2 * min(h, w)
    with pytest.raises(ValueError, match="divide"):
        make_buckets((1000, 1000), 64)


def test_buckets_give_single_shape_batches_with_closest_aspect(folder):
    dm = dm_for(folder, buckets=True, batch_size=2)
    ds = dm.train_dataset
    for i, r in enumerate(ds.records):
        err = aspect_error(r.size, ds.targets[i])
        assert err == pytest.approx(min(aspect_error(r.size, b) for b in dm.bucket_sizes)), r.relpath
        assert ds.targets[i] in dm.bucket_sizes
    assert len(set(ds.targets)) >= 3  # wide, tall and square images land in different buckets
    loader = dm.train_dataloader()
    seen = []
    for b in epoch_batches(loader, 0):
        shapes = {tuple(t.tolist()) for t in b["target_size_as_tuple"]}
        assert len(shapes) == 1 and b["jpg"].shape[2:] == tuple(int(v) for v in shapes.pop())
        seen += b["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))


# -- captions -----------------------------------------------------------------------------
def test_caption_dropout_rate_and_determinism(folder):
    ds = dm_for(folder, caption_dropout=0.3).train_dataset
    flags = [ds.plan(i, e)[1] for e in range(300) for i in range(len(ds))]
    assert abs(np.mean(flags) - 0.3) < 0.04
    again = dm_for(folder, caption_dropout=0.3).train_dataset
    assert flags[:200] == [again.plan(i, e)[1] for e in range(25) for i in range(len(ds))]
    i, e = next((i, e) for e in range(300) for i in range(len(ds)) if ds.plan(i, e)[1] and ds.records[i].caption)
    assert ds.get_item(i, e)["txt"] == "" and ds.get_item(i, e)["caption_dropped"]
    assert ds.get_item(i, e, deterministic=True)["txt"] == ds.records[i].caption


# -- batches and the held-out split --------------------------------------------------------
def test_batch_format(folder):
    dm = dm_for(folder, batch_size=3, shuffle=False)
    b = next(iter(dm.train_dataloader()))
    assert b["jpg"].shape == (3, 3, 32, 32) and b["jpg"].dtype == torch.float32
    assert isinstance(b["txt"], list) and isinstance(b["path"], list) and len(b["txt"]) == 3
    for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
        assert b[k].shape == (3, 2) and b[k].dtype == torch.float32
    assert b["aesthetic_score"].shape == (3, 1) and b["index"].dtype == torch.long
    by_name = {Path(p).name: s for p, s in zip(b["path"], b["aesthetic_score"][:, 0].tolist())}
    assert by_name.get("d_gray.png", 5.0) == 5.0 and all(v in (5.0, 6.0) for v in by_name.values())


def test_val_split_is_disjoint_and_deterministic(folder, tmp_path):
    dm = dm_for(folder, val_fraction=0.3, caption_dropout=0.5, random_crop=True, flip=True)
    train, val = {r.relpath for r in dm.train_records}, {r.relpath for r in dm.val_records}
    assert len(val) == 2 and not train & val and train | val == set(GOOD)
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    assert {r.relpath for r in dm_for(moved, val_fraction=0.3).val_records} == val  # location independent
    train_paths = {p for e in range(2) for b in epoch_batches(dm.train_dataloader(), e) for p in b["path"]}
    assert {Path(p).relative_to(folder).as_posix() for p in train_paths} == train
    v1, v2 = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert [b["path"] for b in v1] == [b["path"] for b in v2]
    for a, b in zip(v1, v2):
        assert torch.equal(a["jpg"], b["jpg"]) and not a["caption_dropped"].any()
        assert a["txt"] == [dm.val_dataset.records[i].caption for i in a["index"].tolist()]
    ds = dm.val_dataset
    assert all(ds.plan(i, 7)[0] == plan_crop(ds.records[i].size, ds.targets[i]) for i in range(len(ds)))
    other = dm_for(folder, val_root=str(moved / "sub"))
    assert len(other.val_records) == 2 and len(other.train_records) == len(GOOD)


# -- cache --------------------------------------------------------------------------------
class Encoder:
    def __init__(self):
        self.items = 0

    def __call__(self, batch):
        self.items += len(batch["index"])
        x = batch["jpg"]
        return {"latent": torch.nn.functional.avg_pool2d(x, 8) * 2.0,
                "vector": torch.cat([batch["original_size_as_tuple"], batch["crop_coords_top_left"],
                                     batch["target_size_as_tuple"]], 1)}


def test_cache_builds_once_reuses_and_invalidates(folder, tmp_path):
    root = shutil.copytree(folder, tmp_path / "imgs")
    cache = tmp_path / "cache"
    kw = dict(cache_dir=str(cache), val_fraction=0.25, buckets=True, batch_size=2, shuffle=False)
    enc = Encoder()
    dm = dm_for(root, **kw)
    assert dm.build_cache(enc, tag="enc-v1") == {"encoded": len(GOOD), "reused": 0}
    assert enc.items == len(GOOD)
    assert len(list(cache.rglob("*.safetensors"))) == len(GOOD) and not list(cache.rglob("*.tmp"))
    # a second run reuses every entry: encode is not called
    enc2 = Encoder()
    dm2 = dm_for(root, **kw)
    assert dm2.build_cache(enc2, tag="enc-v1") == {"encoded": 0, "reused": len(GOOD)} and enc2.items == 0
    # cached batches equal what encode gives for the direct (decoded) batch
    direct = dm_for(root, **{k: v for k, v in kw.items() if k != "cache_dir"})
    for cached_loader, direct_loader in ((dm2.train_dataloader(), direct.train_dataloader()),
                                         (dm2.val_dataloader(), direct.val_dataloader())):
        for cb, db in zip(cached_loader, direct_loader):
            assert "jpg" not in cb and cb["path"] == db["path"] and cb["txt"] == db["txt"]
            want = Encoder()(db)
            assert torch.equal(cb["latent"], want["latent"]) and torch.equal(cb["vector"], want["vector"])
            for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple", "index"):
                assert torch.equal(cb[k], db[k])
    # changing one image (new mtime and content) invalidates its entry only
    p = root / "c_square.png"
    Image.fromarray(_noise(64, 64, 99)).save(p)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    enc3 = Encoder()
    assert dm_for(root, **kw).build_cache(enc3, tag="enc-v1") == {"encoded": 1, "reused": len(GOOD) - 1}
    assert enc3.items == 1
    # another tag (another encoder) is another cache
    assert dm_for(root, **kw).build_cache(Encoder(), tag="enc-v2")["encoded"] == len(GOOD)


def test_cache_refuses_random_views(folder, tmp_path):
    for bad in ({"random_crop": True}, {"flip": True}):
        with pytest.raises(ValueError, match="cache_dir"):
            ImageFolderDataModule(str(folder), cache_dir=str(tmp_path), **bad)


def test_cache_with_caption_dropout_keeps_text(folder, tmp_path):
    dm = dm_for(folder, cache_dir=str(tmp_path / "c"), caption_dropout=1.0, batch_size=4, shuffle=False)
    dm.build_cache(Encoder())
    b = next(iter(dm.train_dataloader()))
    assert b["caption_dropped"].all()
    assert b["txt"] == [dm.train_dataset.records[i].caption for i in b["index"].tolist()]


# -- resume -------------------------------------------------------------------------------
def _indices(batches):
    return [tuple(b["index"].tolist()) for b in batches]


def test_order_depends_on_seed_and_epoch_only(folder):
    a = dm_for(folder, batch_size=2, buckets=True).train_dataloader()
    b = dm_for(folder, batch_size=2, buckets=True).train_dataloader()
    e0, e1 = _indices(epoch_batches(a, 0)), _indices(epoch_batches(a, 1))
    assert _indices(epoch_batches(b, 1)) == e1 and _indices(epoch_batches(b, 0)) == e0 and e0 != e1
    assert _indices(epoch_batches(dm_for(folder, batch_size=2, buckets=True, seed=1).train_dataloader(), 0)) != e0


@pytest.mark.parametrize("k", [0, 2, 4])
def test_resume_continues_with_the_same_batches(folder, k):
    kw = dict(batch_size=2, random_crop=True, flip=True, caption_dropout=0.3)
    full = dm_for(folder, **kw).train_dataloader()
    want = epoch_batches(full, 0) + epoch_batches(full, 1)
    dm = dm_for(folder, **kw)
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = [next(it) for _ in range(k)]
    state = dm.state_dict()
    assert state["epoch"] == (1 if k == len(loader) else 0) and state["batches_consumed"] == k % len(loader)
    dm2 = dm_for(folder, **kw)
    dm2.load_state_dict(state)
    loader2 = dm2.train_dataloader()
    assert len(loader2) == len(loader)  # the full epoch length, as Lightning expects
    got = seen + list(loader2)  # the loader continues in the state's epoch: rest of 0, or all of 1
    if state["epoch"] == 0:
        got += epoch_batches(loader2, 1)
    assert _indices(got) == _indices(want)
    for a, b in zip(got, want):
        assert torch.equal(a["jpg"], b["jpg"]) and a["txt"] == b["txt"]
        assert torch.equal(a["crop_coords_top_left"], b["crop_coords_top_left"])


def test_worker_processes_give_the_same_batches(folder):
    kw = dict(batch_size=2, buckets=True, random_crop=True, flip=True, caption_dropout=0.5)
    main = dm_for(folder, **kw).train_dataloader()
    workers = dm_for(folder, num_workers=2, **kw).train_dataloader()  # persistent workers
    for epoch in (0, 1):
        for a, b in zip(epoch_batches(main, epoch), epoch_batches(workers, epoch), strict=True):
            assert a["path"] == b["path"] and a["txt"] == b["txt"] and torch.equal(a["jpg"], b["jpg"])
    workers._iterator._shutdown_workers()  # persistent workers: stop them now, not at interpreter exit


def test_resume_through_lightning_checkpoints(folder, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(tuple(batch["index"].tolist()))
            return (self.w - batch["jpg"].mean()).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(**kw):
        return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), **kw)

    kw = dict(batch_size=2, buckets=True)
    ref = Tiny()
    trainer(max_epochs=2, enable_checkpointing=False).fit(ref, datamodule=dm_for(folder, **kw))
    steps = len(ref.seen) // 2
    # saved after batch 3 (mid-epoch), after the last batch of epoch 0, and at the end of epoch 0
    for name, k in (("mid", 3), ("last_batch", steps), ("epoch_end", None)):
        first, folder_k = Tiny(), tmp_path / name
        if k is None:
            ck = ModelCheckpoint(dirpath=str(folder_k))  # Lightning's default: on_train_epoch_end
            trainer(max_epochs=1, callbacks=[ck]).fit(first, datamodule=dm_for(folder, **kw))
        else:
            ck = ModelCheckpoint(dirpath=str(folder_k), every_n_train_steps=k, save_top_k=-1)
            trainer(max_steps=k, callbacks=[ck]).fit(first, datamodule=dm_for(folder, **kw))
        path = str(next(folder_k.glob("*.ckpt")))
        state = torch.load(path, weights_only=False)["ImageFolderDataModule"]
        assert (state["epoch"], state["batches_consumed"]) == ((0, k) if k and k < steps else (1, 0)), name
        second = Tiny()
        trainer(max_epochs=2, enable_checkpointing=False).fit(second, datamodule=dm_for(folder, **kw), ckpt_path=path)
        assert first.seen + second.seen == ref.seen, name


# -- DDP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 2])
def test_ddp_ranks_get_disjoint_complete_shards(folder, batch_size):
    # buckets here: 2 + 2 + 3 + 1 images -> 8 batches of 1 (even), or 1 + 1 + 2 + 1 = 5 batches of 2 (odd)
    for epoch in (0, 1):
        whole = _indices(epoch_batches(dm_for(folder, batch_size=batch_size, buckets=True).train_dataloader(), epoch))
        shards = [_indices(epoch_batches(dm_for(folder, batch_size=batch_size, rank=r, world_size=2,
                                                buckets=True).train_dataloader(), epoch)) for r in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == math.ceil(len(whole) / 2)  # same step count on every rank
        padded = whole + whole[: len(whole) % 2]
        assert shards[0] == padded[0::2] and shards[1] == padded[1::2]
        flat = [[i for b in s for i in b] for s in shards]
        assert set(flat[0]) | set(flat[1]) == set(range(len(GOOD)))  # complete
        if len(whole) % 2 == 0:
            assert not set(flat[0]) & set(flat[1])  # disjoint
            assert sorted(flat[0] + flat[1]) == list(range(len(GOOD)))
        else:  # padded with the epoch's first batch: the only overlap
            assert set(flat[0]) & set(flat[1]) == set(whole[0])
    assert len(BucketBatchSampler([0, 0, 1, 1, 1], 1, rank=0, world_size=2, drop_last=True)) == 2


def test_hydra_config_builds_the_datamodule(compose, folder):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose("train", [f"data.root={folder}", "data.resolution=32", "data.min_size=16"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageFolderDataModule) and dm.resolution == (32, 32)
    dm.setup("fit")
    assert len(dm.train_records) == len(GOOD)
    assert OmegaConf.is_missing(compose("train").data, "root")  # root is required
