"""Shared fixtures. Models are built tiny from configs inside the tests (no downloads, no assets needed),
except where a test checks the shipped Shapes assets themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.app_process import CHROMIUM

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parent.parent
ASSET_PIPELINE = REPO / "assets" / "shapes-sd"
ASSET_PROBE = REPO / "assets" / "shapes-probe"


def pytest_configure(config):
    """CI sets FINETUNERS_REQUIRE_BROWSER=1: there a missing browser fails the run instead of skipping tests."""
    if os.environ.get("FINETUNERS_REQUIRE_BROWSER") == "1":
        if not CHROMIUM.exists():
            raise pytest.UsageError(f"FINETUNERS_REQUIRE_BROWSER=1, no {CHROMIUM} (apt-get install chromium)")
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError as e:
            raise pytest.UsageError(f"FINETUNERS_REQUIRE_BROWSER=1 but playwright cannot be imported: {e}") from e


@pytest.fixture(scope="session")
def random_pipeline_dir(tmp_path_factory) -> Path:
    """A randomly initialised pipeline with the Shapes architecture, saved in the diffusers layout."""
    from diffusers import StableDiffusionPipeline

    from finetuners.shapes import architecture as arch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("random-pipeline")
    tokenizer = arch.make_tokenizer(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=arch.make_vae(), text_encoder=arch.make_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=arch.make_unet(), scheduler=arch.make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def random_pipe(random_pipeline_dir):
    from finetuners.models import load_model

    return load_model(str(random_pipeline_dir), "cpu")


@pytest.fixture(scope="session")
def shapes_pipe():
    """The shipped Shapes pipeline (the product's embedded default)."""
    from finetuners.models import load_model

    if not (ASSET_PIPELINE / "model_index.json").exists():
        pytest.fail("assets/shapes-sd is missing: the embedded model must ship with the repo")
    return load_model("shapes", "cpu")


@pytest.fixture(scope="session")
def shapes_probe():
    from finetuners.shapes.probe import ShapesProbe

    return ShapesProbe.load(ASSET_PROBE)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(request) -> Path:
    """A small pipeline folder for app tests: $FINETUNERS_TEST_MODEL, else the shipped assets/shapes-sd, else a
    randomly initialised one (the app's wiring does not depend on the weights)."""
    env = os.environ.get("FINETUNERS_TEST_MODEL")
    if env:
        if not (Path(env) / "model_index.json").is_file():
            pytest.fail(f"FINETUNERS_TEST_MODEL={env!r} is not a diffusers pipeline folder")
        return Path(env)
    if (ASSET_PIPELINE / "model_index.json").is_file():
        return ASSET_PIPELINE
    return request.getfixturevalue("random_pipeline_dir")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random transformers CLIPModel folder (safetensors, the Shapes tokenizer, no preprocessor
    config): the stand-in for a user's local CLIP weights."""
    from transformers import CLIPConfig, CLIPModel

    from finetuners.shapes.architecture import make_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tok = make_tokenizer(folder)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=24, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(
        folder, safe_serialization=True
    )
    return folder
