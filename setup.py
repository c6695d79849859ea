"""Installs the packages `engine` and `kernels` and builds the C++ data helpers (`engine.data._helpers`,
`engine.data.curation._suffix_array`)."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "engine.data._helpers",
        ["csrc/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    # suffix array + LCP for exact-substring dedup (engine/data/curation/suffix_array.py has a NumPy fallback)
    Pybind11Extension(
        "engine.data.curation._suffix_array",
        ["csrc/suffix_array.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="engine",
    version="0.1.0",
    description="A performance-first LLM pretraining engine: Triton kernels, Megatron-style parallelism, data spine",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range that the CPU build on the project's machines satisfies; a bare `torch` would pull a CUDA build.
        "torch>=2.4",
        "numpy>=1.24",
        "tokenizers>=0.15",
        "tqdm>=4.60",
        "tomli>=2.0; python_version < '3.11'",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # safetensors: reads back the consolidate CLI's output; scipy: the independent scaling-law fit in the tests;
        # matplotlib: the loss curve of examples/lab_tiny_lm.py
        # fasttext-wheel: the language_id step's tests (a 4 MB binary wheel; `fasttext` itself has no wheel for 3.11)
        "test": ["pytest>=7", "ruff>=0.5", "safetensors", "scipy", "matplotlib",
                 "transformers>=5,<5.25",  # 5.25 needs hub `kernels`
                 "fasttext-wheel==0.9.2"],
        # Optional speed-ups; the engine detects them at run time and never requires them.
        "cuda": ["flash-attn", "nvidia-ml-py"],
        "tensorboard": ["tensorboard"],
        # benchmarks/bench_curation.py's reference: datatrove 0.10 hashes str with xxhash, which 4.x refuses
        "bench": ["datatrove", "nltk", "xxhash<4"],
        # curation's language_id step (a fastText model file you download yourself); engine/data/curation calls the
        # binding's predict, so NumPy 2 works with this 0.9.2 wheel
        "curation": ["fasttext-wheel==0.9.2"],
        # curation on several machines: python -m engine.data.curate --executor ray
        "ray": ["ray>=2.10"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
