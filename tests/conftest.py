"""Shared fixtures: a tiny checkpoint and its f32 bundle, built once per test session (tests make their own models)."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny encoder with Partial LoRA + tiny-llama with peft LoRA and one hybrid layer; adapters non-zero."""
    from emrrg.checkpoint import save_checkpoint
    from emrrg.config import make_config
    from emrrg.model import EMRRG
    from tests.adapters import randomize_adapters

    torch.manual_seed(0)
    cfg = make_config("tiny", "tiny-llama", "iu", encoder_overrides=dict(lora_rank=4),
                      decoder_overrides=dict(lora_rank=4, hybrid_layers=(1,)))
    model = EMRRG(cfg).eval()
    randomize_adapters(model, scale=0.05, seed=1)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """f32 bundle (encoder both variants, f32 decoder) of the tiny checkpoint, calibrated on 5 real X-rays."""
    from emrrg.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(tiny_checkpoint, out, ExportOptions(llm_bits=32, max_calib=5), progress=False)
    return out


# ---- markers `gpu` and `tensorrt` (pyproject.toml): skipped, never faked, with the reason ------------------
_MARKER_SKIP: dict[str, str | None] = {}


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return (f"needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False); "
                "run scripts/gpu-check.sh on a GPU machine")
    return None


def _tensorrt_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (missing libnvinfer)
        return f"needs TensorRT (`import tensorrt` failed: {e}); pip install tensorrt, or JetPack 6/7 on a Jetson"
    return _gpu_skip_reason()


def pytest_runtest_setup(item):
    for name, reason_fn in (("tensorrt", _tensorrt_skip_reason), ("gpu", _gpu_skip_reason)):
        if item.get_closest_marker(name) is None:
            continue
        if name not in _MARKER_SKIP:
            _MARKER_SKIP[name] = reason_fn()
        if _MARKER_SKIP[name]:
            pytest.skip(_MARKER_SKIP[name])


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """8 train / 2 val / 3 test phantom studies at 64 px (the tiny encoder's size): an annotation.json."""
    from emrrg.data.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_train=8, n_val=2, n_test=3, size=64, workers=1)
