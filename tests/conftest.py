from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real MNIST lives beside the checkout (../shared/data/MNIST/raw), read-only.
SHARED_DATA = Path(os.environ.get("OPTLAYERS_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {SHARED_DATA} (set OPTLAYERS_SHARED_DATA)")
    return SHARED_DATA
