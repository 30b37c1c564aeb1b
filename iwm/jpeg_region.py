"""Decode only a JPEG's crop region, through the system libjpeg-turbo (data.decode=fast).

libjpeg-turbo (>= 1.5) can skip the rows above a region without inverse-DCT or colour work
(`jpeg_skip_scanlines`), decode only the iMCU columns that cover it (`jpeg_crop_scanline`) and stop
after its last row; with the DCT scaling of `iwm.image_decode` that is all the decoding a crop needs.
Neither Pillow nor simplejpeg exposes these calls, so a small C function is compiled on first use
with the system compiler against the system's libjpeg (`cc -shared ... -ljpeg`, cached under
~/.cache/iwm, or $IWM_JPEG_CACHE) and called through ctypes. Where that cannot be built (no compiler,
no libjpeg-turbo headers, IWM_NO_JPEG_REGION=1) `decode_region` returns None and the caller decodes the
whole image instead. The pixels equal a full decode's except within a pixel or two of the region's
edges, where chroma upsampling sees the region's border instead of the neighbouring pixels.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

_SOURCE = r"""
#include <stdio.h>
#include <string.h>
#include <setjmp.h>
#include <jpeglib.h>

struct iwm_err { struct jpeg_error_mgr pub; jmp_buf jump; };
static void iwm_error_exit(j_common_ptr c) { longjmp(((struct iwm_err *)c->err)->jump, 1); }
static void iwm_message(j_common_ptr c, int level) { if (level < 0) c->err->num_warnings++; }

/* Rows [top, top + h), columns [left, left + w) of the image scaled by 1/denom, as RGB, into out as a dense
   [h, w, 3] array (`capacity` bytes: h * w * 3 plus the iMCU widening of the last row). info[0], info[1]:
   the scaled image's width and height. Returns 0; -1 a decoder error, -2 a decoder warning (corrupt data),
   -3 a colour space other than YCbCr / gray, -4 a region outside the image, -5 the buffer too small. */
int iwm_jpeg_region(const unsigned char *data, unsigned long size, int denom, int top, int left, int h,
                    int w, unsigned char *out, long capacity, int *info) {
    struct jpeg_decompress_struct cinfo;
    struct iwm_err jerr;
    volatile int status = 0;
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = iwm_error_exit;
    jerr.pub.emit_message = iwm_message;
    if (setjmp(jerr.jump)) { jpeg_destroy_decompress(&cinfo); return -1; }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE) {
        jpeg_destroy_decompress(&cinfo); return -3;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    jpeg_start_decompress(&cinfo);
    info[0] = (int)cinfo.output_width; info[1] = (int)cinfo.output_height;
    if (top < 0 || left < 0 || h < 1 || w < 1 || top + h > info[1] || left + w > info[0]) {
        jpeg_destroy_decompress(&cinfo); return -4;
    }
    JDIMENSION xoff = (JDIMENSION)left, width = (JDIMENSION)w;
    if (left > 0 || w < info[0]) jpeg_crop_scanline(&cinfo, &xoff, &width);
    else width = cinfo.output_width;
    long row_bytes = 3L * w, start = 3L * (left - (long)xoff);
    if (start < 0 || start + row_bytes > 3L * (long)width
        || row_bytes * (h - 1) + 3L * (long)width > capacity) { jpeg_destroy_decompress(&cinfo); return -5; }
    if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    for (int row = 0; row < h; row++) {
        /* The decoded row (iMCU-aligned, wider than the crop) lands where the crop's row starts and spills
           into the rows not yet written; the crop's columns then move to the front: a dense crop, so the
           resize reads it without another copy. */
        JSAMPROW ptr = out + row_bytes * row;
        if (jpeg_read_scanlines(&cinfo, &ptr, 1) != 1) { status = -1; break; }
        if (start) memmove(ptr, ptr + start, (size_t)row_bytes);
    }
    if (status == 0 && jerr.pub.num_warnings) status = -2;
    jpeg_abort_decompress(&cinfo);  /* the rows below the region are never decoded */
    jpeg_destroy_decompress(&cinfo);
    return status;
}
"""

_buffers = threading.local()
_build_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("IWM_JPEG_CACHE") or Path.home() / ".cache" / "iwm")


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc / gcc) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "iwm_jpeg_region.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(src), "-o", str(out), "-ljpeg"], check=True,
                       capture_output=True, timeout=120)
        os.replace(out, target)  # atomic: a process loading it never sees half a library


@functools.lru_cache(maxsize=1)
def library():
    """The compiled function (ctypes), or None where it cannot be built or loaded here."""
    if os.environ.get("IWM_NO_JPEG_REGION", "0") not in ("", "0"):
        return None
    key = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    target = cache_dir() / f"iwm_jpeg_region-{key}.so"
    try:
        with _build_lock:
            if not target.exists():
                _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    fn = lib.iwm_jpeg_region
    fn.argtypes = [ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_long,
                                                                               ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def _buffer(nbytes: int) -> np.ndarray:
    buf = getattr(_buffers, "array", None)
    if buf is None or buf.size < nbytes:
        buf = _buffers.array = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        _buffers.info = np.zeros(2, dtype=np.int32)  # the scaled size the C function reports
    return buf


def decode_region(data: bytes, full: tuple[int, int], k: int, top: int, left: int, h: int,
                  w: int) -> Optional[np.ndarray]:
    """uint8 [h, w, 3] RGB, dense: rows top..top+h, columns left..left+w of the JPEG `data` (full size
    `full` = (width, height)) decoded at 1/k, in the 1/k image's pixels. A view of this thread's reused
    buffer: copy it before the next call. None when the function is unavailable or the decoder refuses
    or warns (the caller then lets Pillow decide, as for any odd file)."""
    fn = library()
    if fn is None:
        return None
    # The last row is decoded iMCU-aligned: at most one iMCU (<= 32 px) wider on each side.
    nbytes = 3 * w * h + 3 * 80
    buf = _buffer(nbytes)
    info = _buffers.info
    status = fn(data, len(data), k, top, left, h, w, buf.ctypes.data, buf.size, info.ctypes.data)
    if status != 0 or int(info[0]) != -(-full[0] // k) or int(info[1]) != -(-full[1] // k):
        return None
    return buf[:3 * w * h].reshape(h, w, 3)


# JPEG start-of-frame markers the fast path takes: baseline, extended and progressive Huffman. Anything
# else (lossless, arithmetic, hierarchical, 12-bit) goes through Pillow.
_SOF = (0xC0, 0xC1, 0xC2)
_STANDALONE = frozenset([0x01] + list(range(0xD0, 0xD8)))  # TEM, RST0..7: no length field


def jpeg_header(data: bytes) -> Optional[tuple[int, int, int]]:
    """(width, height, components) from an 8-bit baseline / progressive JPEG's frame header, read without
    Pillow (whose open costs as much as the rest of a crop's bookkeeping); None for anything else (not a
    JPEG, another frame type, 12-bit, a size left to a DNL marker, a truncated header, a second SOI):
    the caller then opens the file with Pillow as before."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[2] != 0xFF:
        return None
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or scan data before any frame header
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            if marker not in _SOF or length < 8 or pos + 10 > n or data[pos + 4] != 8:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            components = data[pos + 9]
            if width == 0 or height == 0 or length != 8 + 3 * components:
                return None
            return width, height, components
        pos += 2 + length
    return None
