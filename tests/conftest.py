import os
from pathlib import Path

import pytest

# Any stray hub call must fail at once, not hang: tests run offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _svd_cache(tmp_path_factory):
    """Keep the SVD cache of the test session out of the user's cache directory."""
    os.environ["SVDADAPT_CACHE"] = str(tmp_path_factory.mktemp("svd-cache"))
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the repo's sibling shared/data)")
    return SHARED_DATA


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """The hub offline and its local caches empty: a hub id can be neither fetched nor found."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf"
