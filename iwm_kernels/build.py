"""Build the native extension ahead of time and print what can run here.

    python -m iwm_kernels.build [--verbose]

Exit status 1 if the native extension cannot be built (so CI notices), 0 otherwise.
"""
from __future__ import annotations

import argparse
import time

from . import _native
from ._backend import available_backends


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iwm_kernels.build", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    start = time.time()
    status = _native.status(verbose=args.verbose)
    print(f"native: {'built' if status.available else 'FAILED'} in {time.time() - start:.0f}s - {status.detail}")
    print(f"cache: {_native.cache_root()}")
    for name, avail in available_backends().items():
        print(f"  {name:9s} {'yes' if avail.available else 'no '}  {avail.detail}")
    return 0 if status.available else 1


if __name__ == "__main__":
    raise SystemExit(main())
