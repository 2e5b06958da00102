"""Where the tests find the shared reference files (the original SDXL key lists)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """shared/reference beside the checkout (as CI lays it out), inside it, or $SGM_REFERENCE_DIR."""
    candidates = [os.environ.get("SGM_REFERENCE_DIR"), ROOT.parent / "shared" / "reference",
                  ROOT / "shared" / "reference", "/work/shared/reference"]
    for c in candidates:
        if c and (Path(c) / "sd_xl_base_1.0.keys.tsv").is_file():
            return Path(c)
    raise FileNotFoundError(
        "shared/reference/sd_xl_base_1.0.keys.tsv not found beside the checkout; set SGM_REFERENCE_DIR")


REFERENCE = reference_dir()
