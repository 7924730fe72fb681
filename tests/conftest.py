import os

# The Triton kernels run on CPU through the interpreter in tests; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

import pytest  # noqa: E402
import torch  # noqa: E402

# The device of the tests marked `device` (the kernels against their float64 references): `LMMR1_TEST_DEVICE=cuda`
# (with `TRITON_INTERPRET=0`) runs them on a GPU, compiled Triton; bench/gpu_check.py does this with `-m device`.
TEST_DEVICE = torch.device(os.environ.get("LMMR1_TEST_DEVICE", "cpu"))


class Draws:
    """A test's random inputs from one seeded generator, put on TEST_DEVICE. On the CPU's generator by default, so
    a test draws the same numbers on every device: CUDA's generator draws others, and with those the "the test
    must exercise the clipped branch" guards failed on the H200 alone (2026-12-04). `device=TEST_DEVICE` draws
    there instead, for inputs of shapes that only a GPU runs (a 151,936 x 2,048 head: 311M values)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.generator = torch.Generator(device).manual_seed(seed)

    def _draw(self, sample, *args, **kwargs) -> torch.Tensor:
        return sample(*args, generator=self.generator, device=self.generator.device, **kwargs).to(TEST_DEVICE)

    def randn(self, *size, **kwargs) -> torch.Tensor:
        return self._draw(torch.randn, *size, **kwargs)

    def rand(self, *size, **kwargs) -> torch.Tensor:
        return self._draw(torch.rand, *size, **kwargs)

    def randint(self, low: int, high: int, size, **kwargs) -> torch.Tensor:
        return self._draw(torch.randint, low, high, size, **kwargs)


@pytest.fixture(autouse=True)
def on_test_device(request):
    """A test marked `device` makes every tensor whose device it does not name on TEST_DEVICE (a generator's
    device must be named: `torch.Generator(TEST_DEVICE)`); other tests are left as they are."""
    if request.node.get_closest_marker("device") is None:
        yield
        return
    with TEST_DEVICE:
        yield


@pytest.fixture
def tiny_cfg():
    """A resolved tiny config (the embedded default) with small, fast settings."""
    from lmmr1_lite.config import resolve_config

    def make(**overrides):
        return resolve_config("fre", None, overrides)
    return make


@pytest.fixture
def build_tiny_policy(tiny_cfg):
    """`build(**overrides) -> (policy, tokenizer, cfg)`: the tiny base with LoRA, seeded."""
    from lmmr1_lite import models

    def build(**overrides):
        torch.manual_seed(0)
        cfg = tiny_cfg(**overrides)
        tokenizer = models.load_tokenizer(cfg.model)
        policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
        # LoRA B starts at zero; give the adapter a non-zero effect so "adapter off" is distinguishable.
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        return policy, tokenizer, cfg
    return build


@pytest.fixture
def tiny_policy(build_tiny_policy):
    return build_tiny_policy(gradient_checkpointing=False)


@pytest.fixture
def liger_kernel_calls(monkeypatch):
    """Liger's RMSNorm and SwiGLU kernels (Triton: a GPU's) replaced by stand-ins that record each eager call in
    the returned list; their outputs are placeholders, not Liger's values."""
    liger_rms = pytest.importorskip("liger_kernel.transformers.rms_norm")
    import liger_kernel.transformers.swiglu as liger_swiglu

    calls = []

    class LigerRMSNormFunction:
        @staticmethod
        def apply(x, *args):
            calls.append("rms_norm")
            return x

    def swiglu(gate, up):
        calls.append("swiglu")
        return gate * up

    monkeypatch.setattr(liger_rms, "LigerRMSNormFunction", LigerRMSNormFunction)
    monkeypatch.setattr(liger_swiglu, "_swiglu_dispatch", swiglu)
    return calls
