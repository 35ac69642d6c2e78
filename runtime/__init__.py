"""emrrg.runtime: the torch-free runtime (numpy, onnxruntime, tokenizers, pillow, pydicom only).

Never import torch from anything under this package; tests/runtime/test_torch_free.py enforces it.
"""
