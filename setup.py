from setuptools import find_packages, setup

setup(
    name="drift-trainer",
    version="0.1.0",
    description="On-policy data refinement (DRIFT) for HuggingFace / TRL supervised fine-tuning",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["drift_trainer", "drift_trainer.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "trl>=1.16",
        "accelerate>=1.10",
        "peft>=0.17",
        "datasets>=3.0",
        "numpy",
        "pandas",
        "pyarrow",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.17"],
        "test": ["pytest>=8", "deepspeed>=0.17"],
        # peers for benchmarks/peers.py only, never a dependency of the package (bergson declares torchvision and
        # torchaudio: on a CPU-only machine prefer the isolated `pip install --no-deps --target` in its docstring)
        "bench": ["dattri-llm==0.1.0", "dattri==0.3.0", "bergson==2.5.1"],
    },
    entry_points={"console_scripts": ["drift-trainer=drift_trainer.cli:main"]},
)
