"""EMRRG edge runtime: export, quantize and run the EMRRG report generator (arXiv 2510.16776).

This package file must stay torch-free: `emrrg.runtime` is imported through it on machines
that have only numpy, onnxruntime and tokenizers. Model code lives in submodules that are
imported on demand (`emrrg.model`, `emrrg.ops`, ...).
"""
__version__ = "0.1.0"
