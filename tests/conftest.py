import os
import sys
from pathlib import Path

# `python -m pytest` puts the checkout's root on sys.path, where the top-level `kernels/` folder (installed as
# `vidaccel.kernels`) would shadow Hugging Face's `kernels` package, which transformers >= 5.2x imports. The tests
# import vidaccel as installed, so the root is not needed: drop it before anything imports transformers.
_REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _REPO]

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in the interpreter, which reads TRITON_INTERPRET when the kernels are first
# imported. Setting it here, before any test module imports them, gives every test the same kernels whatever
# files run and in what order (the kernel test files also set it, for runs outside pytest's conftest).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run on CPU with tiny models, where thread hand-offs cost more than they save (and a busy 2-core runner
# makes two threads much slower): one thread, so numerics and timings do not depend on the runner.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipelines():
    """One tiny pipeline per kind, built once (building costs more than a 4-step run)."""
    from vidaccel.testing import KINDS, tiny_pipeline

    return {kind: tiny_pipeline(kind) for kind in KINDS}


@pytest.fixture
def perturb_weights():
    """``perturb_weights(module, name, factor=1.05)`` scales one parameter in place, as retraining would change
    it; the parameter is restored exactly when the test ends, so shared pipelines stay as they were."""
    originals = []

    def perturb(module, name, factor=1.05):
        parameter = dict(module.named_parameters())[name]
        originals.append((parameter, parameter.detach().clone()))
        with torch.no_grad():
            parameter.mul_(factor)

    yield perturb
    with torch.no_grad():
        for parameter, original in reversed(originals):
            parameter.copy_(original)
