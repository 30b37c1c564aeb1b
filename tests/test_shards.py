"""data.dataset=webdataset (iwm.shards): tar shards read by index give the image-folder dataset's samples,
deterministic in workers, resumed exactly to the sample, split across ranks as the folder is; corrupt
members and a shard cut short are skipped and counted; the config keys, the brace patterns and the
shard-writing tool."""
import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from iwm import shards
from iwm.builders import build_dataset
from iwm.config import ConfigError, check_data_paths, load_config
from iwm.data import ImageFolderDataset, KeyedDataset, StepBatchSampler, StepCollator, builtin_photos

SIZE = 32


def make_folder(root, seed, count=10, classes=("a", "b", "c")):
    """`count` JPEGs (and one PNG) from the bundled photographs, spread over class folders."""
    rng = np.random.default_rng(seed)
    photos = builtin_photos(max_side=256)
    for i in range(count):
        _, img = photos[int(rng.integers(len(photos)))]
        w, h = [(160, 120), (120, 160), (150, 100)][i % 3]
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        ext = "png" if i == count - 1 else "jpg"
        Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w, h), Image.BICUBIC).save(folder / f"{i:03d}.{ext}")
    return root


@pytest.fixture
def folder(tmp_path, seed):
    return make_folder(tmp_path / "folder", seed)


@pytest.fixture
def pattern(tmp_path, folder):
    """The folder as 4 shards of 3 samples (the last one short)."""
    written = shards.write_shards(folder, str(tmp_path / "sh" / "train-%04d.tar"), per_shard=3)
    assert len(written) == 4
    return str(tmp_path / "sh" / "train-{0000..0003}.tar")


def batches(ds, batch, *, start_step=0, max_steps=6, world_size=1, rank=0, workers=0, seed=0):
    sampler = StepBatchSampler(len(ds), batch, world_size=world_size, rank=rank, seed=seed,
                               start_step=start_step, max_steps=max_steps)
    loader = torch.utils.data.DataLoader(KeyedDataset(ds), batch_sampler=sampler, collate_fn=StepCollator(),
                                         num_workers=workers)
    return [(b.step, b.images, b.labels) for b in loader]


@pytest.mark.parametrize("mode", ["draft", "pil", "gpu", "fast"],
                         ids=["decode_draft", "decode_pil", "decode_bytes", "decode_fast"])
def test_shards_give_the_folder_datasets_samples(folder, pattern, seed, mode):
    """Sample i of the tool's shards is file i of the folder: same image, crop, flip and label."""
    ref = ImageFolderDataset(folder, SIZE, seed=seed, decode=mode)
    ds = shards.ShardDataset(pattern, SIZE, seed=seed, decode=mode)
    assert len(ds) == len(ref) == 10
    for step in (0, 5):
        for i in range(len(ds)):
            a, b = ds[(step, i)], ref[(step, i)]
            assert a.label == b.label and a.box == b.box and a.flip == b.flip
            assert torch.equal(a.image, b.image)
            assert (a.encoded is None) == (b.encoded is None)
            if a.encoded is not None:
                assert torch.equal(a.encoded, b.encoded)
    assert len({ds[(0, i)].box for i in range(len(ds))}) > 1  # the crops really are random


def test_loader_work_is_deterministic_per_key_in_workers(pattern, seed):
    ds = shards.ShardDataset(pattern, SIZE, seed=seed)
    main = batches(ds, 3, seed=seed)
    worker = batches(ds, 3, seed=seed, workers=1)  # the dataset (and its index) copied to a worker
    again = batches(shards.ShardDataset(pattern, SIZE, seed=seed), 3, seed=seed)
    for (s0, x0, y0), (s1, x1, y1), (s2, x2, y2) in zip(main, worker, again):
        assert s0 == s1 == s2
        assert torch.equal(x0, x1) and torch.equal(x0, x2) and torch.equal(y0, y1)
    other = batches(shards.ShardDataset(pattern, SIZE, seed=seed + 1), 3, seed=seed)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(main, other))  # the seed matters


def test_a_resumed_run_sees_exactly_the_samples_of_the_uninterrupted_one(pattern, seed):
    ds = shards.ShardDataset(pattern, SIZE, seed=seed)
    full = batches(ds, 4, max_steps=7, seed=seed)  # 2 steps per epoch: the resume crosses epochs
    for start in (1, 3, 4):
        resumed = batches(shards.ShardDataset(pattern, SIZE, seed=seed), 4, start_step=start, max_steps=7, seed=seed)
        assert [s for s, _, _ in resumed] == list(range(start, 7))
        for (s0, x0, y0), (s1, x1, y1) in zip(full[start:], resumed):
            assert s0 == s1 and torch.equal(x0, x1) and torch.equal(y0, y1)


def test_ranks_partition_each_global_batch_as_one_process_sees_it(pattern, seed):
    ds = shards.ShardDataset(pattern, SIZE, seed=seed)
    one = batches(ds, 4, max_steps=4, seed=seed)
    r0 = batches(ds, 2, max_steps=4, world_size=2, rank=0, seed=seed)
    r1 = batches(ds, 2, max_steps=4, world_size=2, rank=1, seed=seed)
    for (s, x, y), (_, x0, y0), (_, x1, y1) in zip(one, r0, r1):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    # Each rank's keys are those the folder dataset's sampler gives that rank (same length, same order).
    keys = [list(StepBatchSampler(len(ds), 2, world_size=2, rank=r, seed=seed, max_steps=4)) for r in (0, 1)]
    for k0, k1 in zip(*keys):
        assert not {i for _, i in k0} & {i for _, i in k1}


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(seed, size=(90, 70)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["draft", "pil", "gpu"], ids=["decode_draft", "decode_pil", "decode_bytes"])
def test_corrupt_members_are_skipped_and_counted(tmp_path, seed, mode):
    good = [jpeg_bytes(seed + i) for i in range(5)]
    path = tmp_path / "s-0.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "k0.jpg", good[0][: len(good[0]) // 2])  # truncated
        add(tar, "k0.cls", b"3")
        add(tar, "k1.jpg", good[1])
        add(tar, "k1.cls", b"1")
        add(tar, "k2.jpg", b"\xff\xd8\xff garbage")
        add(tar, "k3.json", b"{}")  # a sample without an image is not a sample
        add(tar, "k4.meta.jpg", good[2])  # WebDataset keys stop at the first dot: field "meta.jpg"
        add(tar, "k4.cls", b"not a number")
    ds = shards.ShardDataset(str(path), SIZE, seed=seed, decode=mode)
    assert len(ds) == 4
    assert ds.labels.tolist() == [3, 1, -1, -1]
    samples = [ds[(0, i)] for i in range(len(ds))]
    assert [s.unreadable for s in samples] == [0, -1, 2, -1]
    assert [s.label for s in samples] == [1, 1, -1, -1]  # a stand-in brings its own label
    batch = StepCollator()([(0, s) for s in samples])
    assert batch.skipped == 2 and batch.unreadable_files == (0, 2)
    batch.images_on(torch.device("cpu"))
    assert batch.skipped == 2


def test_a_shard_cut_short_keeps_the_samples_before_the_cut(tmp_path, seed):
    path = tmp_path / "s-0.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            add(tar, f"k{i}.jpg", jpeg_bytes(seed + i))
    data = path.read_bytes()
    cut = data.rindex(b"\xff\xd9") - 200  # inside the last image's data
    path.write_bytes(data[:cut])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = shards.ShardDataset(str(path), SIZE, seed=seed)
    assert len(ds) == 3
    samples = [ds[(0, i)] for i in range(3)]
    assert [s.unreadable for s in samples] == [-1, -1, 2]  # the cut image reads short: counted
    with pytest.raises(OSError, match="short read"):
        ds.read_bytes(2)


def test_brace_patterns_globs_and_lists(tmp_path, folder):
    assert shards.expand_pattern("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert shards.expand_pattern("{x,y}-{0..1}") == ["x-0", "x-1", "y-0", "y-1"]
    assert shards.expand_pattern("plain.tar") == ["plain.tar"]
    for bad in ("a-{3..1}.tar", "a-{3}.tar", "a-{1..2.tar", "a-{{1..2}}.tar"):
        with pytest.raises(ValueError, match="data.shards"):
            shards.expand_pattern(bad)
    written = shards.write_shards(folder, str(tmp_path / "o" / "t-%03d.tar"), per_shard=4)
    assert [p.name for p in written] == ["t-000.tar", "t-001.tar", "t-002.tar"]
    listed = shards.ShardDataset([str(written[0]), str(tmp_path / "o" / "t-00[12].tar")], SIZE)
    assert len(listed) == 10
    with pytest.raises(FileNotFoundError, match="data.shards: 1 of 4 shard"):
        shards.shard_paths(str(tmp_path / "o" / "t-{000..003}.tar"))
    gz = tmp_path / "c.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        add(tar, "k.jpg", jpeg_bytes(0))
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        shards.ShardDataset(str(gz), SIZE)


def test_config_keys_build_the_dataset_and_errors_name_the_key(tmp_path, pattern, seed):
    cfg = load_config(overrides=["data.dataset=webdataset", f"data.shards={pattern}", f"data.crop_size={SIZE}",
                                 "mask.patch_size=8", "eval.tasks=[]"])
    check_data_paths(cfg)
    ds = build_dataset(cfg, seed)
    assert isinstance(ds, shards.ShardDataset) and len(ds) == 10
    with pytest.raises(ConfigError, match="data.shards: required"):
        load_config(overrides=["data.dataset=webdataset"])
    missing = load_config(overrides=["data.dataset=webdataset", f"data.shards={tmp_path}/none-{{0..1}}.tar",
                                      "eval.tasks=[]"])
    with pytest.raises(ConfigError, match="data.shards: 2 of 2 shard"):
        check_data_paths(missing)
    with pytest.raises(ConfigError, match="data.val_folder"):
        load_config(overrides=["data.dataset=webdataset", f"data.shards={pattern}", "eval.tasks=[mrr]",
                               "eval.at_end=true"])
    (tmp_path / "cfg.yaml").write_text(f"data:\n  dataset: webdataset\n  shards:\n    - {pattern}\n"
                                       f"eval:\n  tasks: []\n")
    assert len(shards.shard_paths(load_config(tmp_path / "cfg.yaml").data.shards)) == 4


def test_the_tool_writes_shards_and_says_how_to_use_them(tmp_path, folder, capsys):
    assert shards.main(["--from-folder", str(folder), "--out", str(tmp_path / "w-%05d.tar"), "--per-shard", "6"]) == 0
    out = capsys.readouterr().out
    assert f"data.shards={tmp_path}/w-{{00000..00001}}.tar" in out
    first = (tmp_path / "w-00000.tar").read_bytes()
    shards.main(["--from-folder", str(folder), "--out", str(tmp_path / "w-%05d.tar"), "--per-shard", "6"])
    assert (tmp_path / "w-00000.tar").read_bytes() == first  # reproducible bytes
    for bad in (["--out", str(tmp_path / "fixed.tar")], ["--per-shard", "0", "--out", str(tmp_path / "x-%d.tar")],
                ["--out", str(tmp_path / "x-%d.tar"), "--from-folder", str(tmp_path / "nothing")]):
        args = ["--from-folder", str(folder)] + bad if "--from-folder" not in bad else bad
        with pytest.raises(SystemExit):
            shards.main(args)


def test_shards_written_by_the_webdataset_package_read_alike(tmp_path, seed):
    wds = pytest.importorskip("webdataset")
    images = [jpeg_bytes(seed + i) for i in range(4)]
    path = tmp_path / "w.tar"
    with wds.TarWriter(str(path)) as sink:
        for i, data in enumerate(images):
            sink.write({"__key__": f"sample{i:04d}", "jpg": data, "cls": i + 10})
    ds = shards.ShardDataset(str(path), SIZE, seed=seed)
    assert len(ds) == 4 and ds.labels.tolist() == [10, 11, 12, 13]
    assert [ds.read_bytes(i) for i in range(4)] == images


def test_the_shard_dataset_sets_every_attribute_the_folder_dataset_has(folder, pattern):
    """ShardDataset replaces ImageFolderDataset.__init__ (no folder to scan): an attribute added there
    must be added here too, or the inherited lookup and decode would miss it."""
    assert set(vars(ImageFolderDataset(folder, SIZE))) <= set(vars(shards.ShardDataset(pattern, SIZE)))
