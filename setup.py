from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="lit-adapter",
    version="0.1.0",
    description="LLaMA-Adapter V1 and V2 on a frozen LLaMA: fine-tune, chat, see images and evaluate, with Lightning.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lit_adapter", "lit_adapter.*"]),
    include_package_data=True,
    package_data={"lit_adapter": ["data/demo_assets/*"]},
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "lightning>=2.4,<3",
        "jsonargparse[signatures]>=4.32",
        "open_clip_torch>=2.24",
        "sentencepiece>=0.2",
        "torchmetrics>=1.4",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
        "tensorboard>=2.14",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.45", "peft>=0.13", "ruff>=0.5"],
        "ocr": ["pytesseract>=0.3"],
    },
    entry_points={"console_scripts": ["lit-adapter=lit_adapter.cli:main"]},
)
