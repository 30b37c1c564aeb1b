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
#include <setjmp.h>
#include <jpeglib.h>

struct iwm_err { struct jpeg_error_mgr pub; jmp_buf jump; };
static void iwm_error_exit(j_common_ptr c) { longjmp(((struct iwm_err *)c->err)->jump, 1); }
static void iwm_message(j_common_ptr c, int level) { if (level < 0) c->err->num_warnings++; }

/* Rows [top, top + h) and at least columns [left, left + w) of the image scaled by 1/denom, as RGB, into
   out (row stride `stride` bytes, `capacity` bytes in all). *x0, *xw: the columns decoded (iMCU-aligned);
   *sw, *sh: the scaled image's size. Returns 0; -1 a decoder error, -2 a decoder warning (corrupt data),
   -3 a colour space other than YCbCr / gray, -4 a region outside the image, -5 the buffer too small. */
int iwm_jpeg_region(const unsigned char *data, unsigned long size, int denom, int top, int left, int h,
                    int w, unsigned char *out, long stride, long capacity, int *x0, int *xw, int *sw, int *sh) {
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
    *sw = (int)cinfo.output_width; *sh = (int)cinfo.output_height;
    if (top < 0 || left < 0 || h < 1 || w < 1 || top + h > *sh || left + w > *sw) {
        jpeg_destroy_decompress(&cinfo); return -4;
    }
    JDIMENSION xoff = (JDIMENSION)left, width = (JDIMENSION)w;
    if (left > 0 || w < *sw) jpeg_crop_scanline(&cinfo, &xoff, &width);
    else width = cinfo.output_width;
    *x0 = (int)xoff; *xw = (int)width;
    if ((long)width * 3 > stride || stride * (long)h > capacity) { jpeg_destroy_decompress(&cinfo); return -5; }
    if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    for (int row = 0; row < h;) {
        JSAMPROW ptr = out + stride * row;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, &ptr, 1);
        if (got == 0) { status = -1; break; }
        row += (int)got;
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
    c_int_p = ctypes.POINTER(ctypes.c_int)
    fn.argtypes = [ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_long,
                                                                               ctypes.c_long] + [c_int_p] * 4
    fn.restype = ctypes.c_int
    return fn


def _buffer(nbytes: int) -> np.ndarray:
    buf = getattr(_buffers, "array", None)
    if buf is None or buf.size < nbytes:
        buf = _buffers.array = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
    return buf


def decode_region(data: bytes, full: tuple[int, int], k: int, top: int, left: int, h: int,
                  w: int) -> Optional[np.ndarray]:
    """uint8 [h, w, 3] RGB: rows top..top+h, columns left..left+w of the JPEG `data` (full size `full` =
    (width, height)) decoded at 1/k, in the 1/k image's pixels. A view of this thread's reused buffer:
    copy it before the next call. None when the function is unavailable or the decoder refuses
    or warns (the caller then lets Pillow decide, as for any odd file)."""
    fn = library()
    if fn is None:
        return None
    # iMCU alignment widens the decoded columns by at most one iMCU (<= 32 px) on each side.
    stride = 3 * (w + 80)
    buf = _buffer(stride * h)
    x0, xw, sw, sh = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    status = fn(data, len(data), k, top, left, h, w, buf.ctypes.data, stride, buf.size, ctypes.byref(x0),
                ctypes.byref(xw), ctypes.byref(sw), ctypes.byref(sh))
    if status != 0 or (sw.value, sh.value) != (-(-full[0] // k), -(-full[1] // k)):
        return None
    start = left - x0.value
    return buf[:stride * h].reshape(h, stride // 3, 3)[:, start:start + w]
