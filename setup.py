from setuptools import setup

# The Triton kernels live in the top-level folder kernels/ but install as
# recycore.kernels: a top-level "kernels" package would clash with Hugging
# Face's `kernels`, which parameter-golf setups install.
setup(
    name="recycore",
    version="0.1.0",
    description="Hand-written Triton kernels and a thin torch model/training loop "
    "for the parameter-golf '12L RecycledCore Int5' record",
    packages=["recycore", "recycore.kernels"],
    package_dir={"recycore": "recycore", "recycore.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "triton>=3.2", "numpy", "sentencepiece", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["recycore = recycore.cli:main"]},
)
