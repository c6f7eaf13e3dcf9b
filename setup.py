from pathlib import Path

from setuptools import find_namespace_packages, setup

setup(
    name="lit-adapter",
    version="0.1.0",
    description="LLaMA-Adapter V1 and V2 on a frozen LLaMA: fine-tune, chat, see images and evaluate, with Lightning.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # namespace discovery: serving/static (the chat page) is a package of files too
    packages=find_namespace_packages(include=["lit_adapter", "lit_adapter.*"], exclude=["*.__pycache__"]),
    include_package_data=True,
    package_data={"lit_adapter": ["serving/static/*", "cli_help_texts.json"]},
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "lightning>=2.4,<3",
        "jsonargparse[signatures]>=4.32",
        "open_clip_torch>=2.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",  # tokenizer.json (byte-level BPE of Llama 3, Qwen, Mistral-Nemo, Falcon)
        "jinja2>=3.1.6",  # Hugging Face chat templates (3.1.6: the sandbox fixes transformers also requires)
        "huggingface_hub>=0.23",  # `lit-adapter download ORG/NAME`
        "torchmetrics>=1.4",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
        "tensorboard>=2.14",
    ],
    extras_require={
        # torchaudio 2.11 requires torch>=2.11 only: it leaves CI's torch in place
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.45", "peft>=0.13", "ruff>=0.5", "av>=12",
                 "plyfile>=1.0", "pypcd4>=1.5.1", "faiss-cpu>=1.8", "torchaudio==2.11.*", "diffusers>=0.30",
                 "lm-eval>=0.4.5", "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "openai>=1.40",
                 "langchain-core>=0.3", "langchain-openai>=0.2", "playwright>=1.44", "tiktoken>=0.7"],
        "ocr": ["pytesseract>=0.3"],
        # ImageBind-LLM's decoders and filterbanks (torchaudio 2.11 leaves any torch >= 2.11 in place)
        "imagebind": ["av>=12", "plyfile>=1.0", "pypcd4>=1.5.1", "torchaudio==2.11.*"],
        "retrieval": ["faiss-cpu>=1.8"],
        "diffusion": ["diffusers>=0.30", "transformers>=4.45"],  # image output (Stable unCLIP)
        "lm-eval": ["lm-eval>=0.4.5"],  # `lit-adapter eval lm-eval`
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],  # `lit-adapter serve`
        "langchain": ["langchain-core>=0.3"],  # lit_adapter.integrations.langchain
        "llama3-meta": ["tiktoken>=0.7", "transformers>=4.45"],  # `convert` of Meta's own Llama 3.x folders
    },
    entry_points={"console_scripts": ["lit-adapter=lit_adapter.cli:main"]},
)
