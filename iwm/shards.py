"""Tar shards in WebDataset format (`data.dataset: webdataset`, `data.shards: <pattern or list>`).

Format: each shard is an uncompressed tar; members whose names share a key (the name up to the first
"." of its last path component) and follow one another form one sample: an image (`.jpg`, `.png`, ...)
and optionally its label (`.cls`, an integer as text). Shards written by the `webdataset` package's
TarWriter, or by `python -m iwm.shards --from-folder DIR --out PATTERN --per-shard N`, read alike.

Design: the shards are indexed once at start from their tar headers (each sample's image offset and
size; nothing decoded), so the dataset is map-style with random access by index (one positioned read
into the tar). The batch order, the per-(seed, step, index) crops, the rank split, exact resume and the
counting of unreadable images are then those of the image-folder dataset, unchanged: a streaming
reader (the webdataset package's pipeline) has no sample-exact resume state, hence this design, which
needs nothing beyond the standard library.
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import re
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, ImageFolderDataset, Sample, load_and_crop

# Image member extensions in order of preference when a sample has several.
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_LABEL_EXT = "cls"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_pattern(pattern: str) -> list[str]:
    """Brace expansion as WebDataset's shard lists write it: `{000..099}` (zero-padded to the first
    bound's width) and `{a,b,c}`, any number of groups; a pattern without braces is itself."""
    m = _BRACE.search(pattern)
    if m is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"data.shards: unbalanced or nested braces in {pattern!r}")
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise ValueError(f"data.shards: empty range {{{body}}} in {pattern!r}")
        width = len(rng.group(1))
        items = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"data.shards: {{{body}}} in {pattern!r} is neither a range a..b nor a list a,b")
    return [head + item + rest for item in items for rest in expand_pattern(tail)]


def shard_paths(spec) -> list[Path]:
    """The shard files of `data.shards`: a pattern (braces, or a glob with * ? [) or a list of them."""
    patterns = [spec] if isinstance(spec, str) else list(spec or ())
    if not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise ValueError(f"data.shards: expected a shard pattern or a list of them, got {spec!r}")
    paths: list[Path] = []
    for pattern in patterns:
        for name in expand_pattern(pattern.strip()):
            if any(c in name for c in "*?["):
                found = sorted(glob.glob(name))
                if not found:
                    raise FileNotFoundError(f"data.shards: no file matches {name!r}")
                paths.extend(Path(f) for f in found)
            else:
                paths.append(Path(name))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"data.shards: {len(missing)} of {len(paths)} shard(s) missing, e.g. {missing[0]}")
    return paths


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, the WebDataset way: "a/b.c.jpg" -> ("a/b", "c.jpg")."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def _image_member(fields: dict) -> tuple[str, tarfile.TarInfo] | None:
    for ext in _IMAGE_EXTS:
        for field, info in fields.items():
            if field == ext or field.endswith("." + ext):
                return field, info
    return None


def index_shard(path: Path, shard_id: int, labels_out: list, rows_out: list) -> int:
    """Append (shard, offset, size) rows and labels for each sample with an image; returns how many.
    A shard cut short keeps the samples before the cut (a warning says so); the image at the cut reads
    short and is then counted unreadable like any corrupt member."""
    count = 0
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError as exc:
        raise ValueError(f"data.shards: {path} is not an uncompressed tar ({exc}); compressed shards "
                         f"cannot be read by offset") from None

    def flush(fields):
        nonlocal count
        found = _image_member(fields)
        if found is None:
            return
        _, info = found
        label = -1
        cls = fields.get(_LABEL_EXT)
        if cls is not None:
            try:
                label = int(tar.extractfile(cls).read().decode().strip())
            except (ValueError, UnicodeDecodeError, tarfile.TarError, OSError):
                label = -1  # an unreadable label: the image still trains (labels only feed the probes)
        rows_out.append((shard_id, info.offset_data, info.size))
        labels_out.append(label)
        count += 1

    with tar:
        key, fields = None, {}
        try:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_key(info.name)
                if k != key:
                    flush(fields)
                    key, fields = k, {}
                fields.setdefault(ext, info)
        except (tarfile.TarError, OSError) as exc:
            warnings.warn(f"data.shards: {path} is cut short or damaged after {count} samples ({exc}); "
                          f"reading the samples before it")
        flush(fields)
    return count


class ShardDataset(ImageFolderDataset):
    """The samples of WebDataset tar shards, by index (see the module docstring).

    Everything but how a sample's bytes are found is the image-folder dataset's: the crop and flip per
    (seed, step, index), `data.decode` (draft / pil / gpu), and an unreadable image replaced by the
    next readable one and reported once by its own index.
    """

    def __init__(self, shards, size: int, *, seed: int = 0, scale: Sequence[float] = (0.3, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5, random_crops: bool = True,
                 decode: str = "draft"):
        from .image_decode import DECODE_MODES

        if decode not in DECODE_MODES:
            raise ValueError(f"decode: expected one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.shards = [str(p) for p in shard_paths(shards)]
        rows: list = []
        labels: list = []
        for i, path in enumerate(self.shards):
            index_shard(Path(path), i, labels, rows)
        if not rows:
            raise FileNotFoundError(f"data.shards: no image samples in {len(self.shards)} shard(s), e.g. "
                                    f"{self.shards[0]}")
        # Compact arrays (they are copied to every DataLoader worker): shard id, data offset, size.
        self.index = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.files = _SampleNames(self)  # what ImageFolderDataset's lookup and messages read
        self.root = f"{len(self.shards)} shard(s) {self.shards[0]} ..."
        self.classes = [str(c) for c in sorted(set(labels)) if c >= 0]
        self.decode_mode, self.size, self.seed = decode, size, seed
        self.flip_p, self.random_crops = float(flip_p), random_crops
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self._known_unreadable: set[int] = set()
        self._fds: dict[int, int] = {}
        self._fd_pid = os.getpid()

    def __getstate__(self):  # open descriptors stay in the process that opened them
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def read_bytes(self, sample_index: int) -> bytes:
        """The image member's bytes of sample `sample_index` (one positioned read; short if cut off)."""
        shard, offset, size = (int(v) for v in self.index[sample_index])
        if self._fd_pid != os.getpid():  # a forked worker: its own descriptors, no shared file position
            self._fds, self._fd_pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes (shard cut short)")
        return data

    def load(self, file_index: int, gen: torch.Generator) -> Sample:
        """The sample at `file_index` with the crop drawn from `gen` (ImageFolderDataset.load with the
        bytes from the shard); raises when the image is unreadable."""
        return load_and_crop(self.read_bytes(file_index), int(self.labels[file_index]), self.size,
                             self.decode_mode, lambda height, width: self.geometry(height, width, gen))


class _SampleNames:
    """files[i] -> (a name for messages, label), as ImageFolderDataset.files gives (path, label)."""

    def __init__(self, ds: ShardDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds.index)

    def __getitem__(self, i: int):
        shard, offset, _ = (int(v) for v in self.ds.index[i])
        return f"{self.ds.shards[shard]}@{offset} (sample {i})", int(self.ds.labels[i])


# ---- writing shards -----------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: the same folder gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: str | Path, out_pattern: str, per_shard: int) -> list[Path]:
    """Shards of an ImageFolder `folder/<class>/<image>`, in ImageFolderDataset's file order (so sample i
    of the shards is file i of the folder); `out_pattern` holds one printf-style integer field
    ("train-%06d.tar"). Each sample: "<index>.<ext>" (the file's bytes) and "<index>.cls" (its class)."""
    if per_shard < 1:
        raise ValueError(f"--per-shard: must be >= 1, got {per_shard}")
    try:
        out_pattern % 0
    except (TypeError, ValueError):
        raise ValueError(f"--out: expected a pattern with one integer field such as train-%06d.tar, "
                         f"got {out_pattern!r}") from None
    if out_pattern % 0 == out_pattern % 1:
        raise ValueError(f"--out: {out_pattern!r} names every shard alike (use a field such as %06d)")
    files = ImageFolderDataset(folder, 8).files  # the folder dataset's own scan and order
    written = []
    for start in range(0, len(files), per_shard):
        path = Path(out_pattern % (start // per_shard))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (file, label) in enumerate(files[start:start + per_shard], start):
                ext = file.suffix.lower().lstrip(".")
                _add(tar, f"{i:09d}.{ext}", file.read_bytes())
                _add(tar, f"{i:09d}.{_LABEL_EXT}", str(label).encode())
        os.replace(tmp, path)  # never a half-written shard under the final name
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m iwm.shards",
                                description="Write WebDataset tar shards from an ImageFolder directory.")
    p.add_argument("--from-folder", required=True, help="ImageFolder root: <folder>/<class>/<image>")
    p.add_argument("--out", required=True, help="output pattern with one integer field, e.g. /data/train-%%06d.tar")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    args = p.parse_args(argv)
    try:
        written = write_shards(args.from_folder, args.out, args.per_shard)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    n = len(written)
    last = n - 1
    width = re.search(r"%0?(\d*)d", args.out)
    digits = int(width.group(1)) if width and width.group(1) else 1
    brace = re.sub(r"%0?\d*d", f"{{{0:0{digits}d}..{last:0{digits}d}}}", args.out, count=1)
    print(f"wrote {n} shard(s); use data.dataset=webdataset data.shards={brace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
