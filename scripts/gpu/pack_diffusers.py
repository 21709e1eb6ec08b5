"""Write a zip of a diffusers wheel's package without the pipelines this project never imports, for the `device`
tool's machine (no diffusers there, and a 64 MiB limit on the working tree that travels: the whole 0.42.1 wheel is
6.4 MB, this zip 2.3 MB). Kept: every top-level module, ``diffusers/pipelines/*.py`` and the ``sana``,
``sana_video`` and ``pixart_alpha`` pipelines (``SanaSprintPipeline`` imports the last), ``modular_pipelines/*.py``.
On the machine, ``python -m zipfile -e OUT.zip /tmp/site`` and ``PYTHONPATH=/tmp/site`` (scripts/gpu/repair_round.sh).

    pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
    python scripts/gpu/pack_diffusers.py .whl/diffusers-0.42.1-py3-none-any.whl .gpu/diffusers_trim.zip
"""

from __future__ import annotations

import argparse
import sys
import zipfile

KEEP_PIPELINES = ("sana", "sana_video", "pixart_alpha")


def keep(name: str) -> bool:
    """Whether the wheel member ``name`` goes into the zip (``.dist-info/RECORD`` is dropped: its hashes would no
    longer match)."""
    parts = name.split("/")
    if name.endswith("/RECORD") and ".dist-info/" in name:
        return False
    if parts[0] != "diffusers" or len(parts) < 3:
        return True
    if parts[1] == "pipelines":
        return len(parts) == 3 or parts[2] in KEEP_PIPELINES
    if parts[1] == "modular_pipelines":
        return len(parts) == 3
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel")
    ap.add_argument("out")
    args = ap.parse_args(argv)
    try:
        src = zipfile.ZipFile(args.wheel)
    except (FileNotFoundError, zipfile.BadZipFile) as e:
        print(f"error: {args.wheel}: {e}", file=sys.stderr)
        return 2
    kept = 0
    with src, zipfile.ZipFile(args.out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if keep(info.filename):
                dst.writestr(info, src.read(info), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                kept += 1
    print(f"{kept} of {len(src.infolist())} files -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
