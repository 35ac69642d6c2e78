"""EMRRG edge runtime: export, quantize and run the EMRRG report generator (arXiv 2510.16776).

This package file must stay torch-free: `emrrg.runtime` is imported through it on machines
that have only numpy, onnxruntime and tokenizers. Model code lives in submodules that are
imported on demand (`emrrg.model`, `emrrg.ops`, ...).
"""
__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by transformers / peft when installed) logs, on every import on AVX-512-BF16 CPUs,
# that it could not fetch a CPU kernel from a model hub through the optional `kernels` package. emrrg never
# downloads anything at run time and does not install `kernels`, so that warning is noise: keep its errors.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
