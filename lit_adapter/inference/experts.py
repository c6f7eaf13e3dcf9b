"""Experts (LLaMA-Adapter V2 §4.4): systems that turn an image into text the language model reads as context.

An expert is chosen by a spec string:
  `caption_file:PATH`   captions looked up in a JSON map (image file name, stem, parent folder or id -> text),
                        e.g. ScienceQA's `captions.json` (`{"captions": {pid: text}}`)
  `self_caption`        the loaded multimodal adapter captions the image ("Generate caption of this image")
  `self_caption:FILE`   the same with a caption-trained adapter FILE over the same base checkpoint
  `ocr`                 text read from the image by pytesseract or easyocr (whichever is installed)
  `module.path:Class`   a user expert: Class() is called with the image path and returns text
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.files import read_json
from lit_adapter.prompts import CAPTION_INSTRUCTION

# (image path, instruction) -> generated text: a loaded multimodal model answering about one image
Captioner = Callable[[Path, str], str]


class Expert(ABC):
    """Image path -> text."""

    @abstractmethod
    def describe(self, image: Path) -> str: ...

    def __call__(self, image: Path) -> str:
        return self.describe(Path(image))


class CaptionFileExpert(Expert):
    """Captions from a JSON file: a flat map or one nested under "captions", keyed by image name, stem, parent
    folder (ScienceQA keeps `<split>/<pid>/image.png`) or full path."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.captions = read_caption_map(self.path)

    def describe(self, image: Path) -> str:
        for key in (str(image), image.name, image.stem, image.parent.name):
            if key in self.captions:
                return self.captions[key]
        raise LitAdapterError(
            f"{self.path}: no caption for image {image} (looked up {image.name!r}, {image.stem!r}, "
            f"{image.parent.name!r})"
        )


def read_caption_map(path: Path) -> dict[str, str]:
    data = read_json(path, "caption file")
    if isinstance(data, Mapping) and isinstance(data.get("captions"), Mapping):
        data = data["captions"]
    if not isinstance(data, Mapping) or not all(isinstance(v, str) for v in data.values()):
        raise LitAdapterError(f"{path}: expected a JSON object mapping image names or ids to caption strings")
    return {str(k): v for k, v in data.items()}


class SelfCaptionExpert(Expert):
    """A caption-trained multimodal adapter describing the image (the paper's default expert)."""

    def __init__(self, captioner: Captioner, instruction: str = CAPTION_INSTRUCTION) -> None:
        self.captioner = captioner
        self.instruction = instruction

    def describe(self, image: Path) -> str:
        return self.captioner(image, self.instruction).strip()


class OCRExpert(Expert):
    """Text found in the image by pytesseract (needs the tesseract program) or easyocr."""

    def __init__(self) -> None:
        self.backend = _ocr_backend()

    def describe(self, image: Path) -> str:
        try:
            return " ".join(self.backend(image).split())
        except Exception as err:  # OCR engines raise many types (missing binary, model download failure)
            raise LitAdapterError(f"{image}: OCR failed ({first_line(err)})") from None


def _ocr_backend() -> Callable[[Path], str]:
    try:
        import pytesseract

        from lit_adapter.images import open_image  # PIL: only for an OCR expert

        return lambda image: pytesseract.image_to_string(open_image(image))
    except ImportError:
        pass
    try:
        import easyocr
    except ImportError:
        raise LitAdapterError(
            "expert 'ocr' needs an OCR engine: `pip install pytesseract` (plus the tesseract program) or "
            "`pip install easyocr`"
        ) from None
    reader = easyocr.Reader(["en"], verbose=False)
    return lambda image: " ".join(reader.readtext(str(image), detail=0))


class CallableExpert(Expert):
    """A user object (anything callable on an image path) wrapped as an Expert."""

    def __init__(self, function: Callable[[Path], Any], name: str) -> None:
        self.function = function
        self.name = name

    def describe(self, image: Path) -> str:
        text = self.function(image)
        if not isinstance(text, str):
            raise LitAdapterError(f"expert {self.name}: returned {type(text).__name__} for {image}, expected str")
        return text


def load_expert(
    spec: str,
    captioner: Optional[Captioner] = None,
    captioner_factory: Optional[Callable[[Path], Captioner]] = None,
) -> Expert:
    """The expert named by `spec` (see the module docstring).

    `captioner` serves `self_caption` (the loaded model); `captioner_factory(adapter_file)` serves `self_caption:FILE`.
    """
    name, _, argument = spec.partition(":")
    if name == "caption_file":
        if not argument:
            raise LitAdapterError("expert 'caption_file' needs a file: --expert caption_file:PATH")
        return CaptionFileExpert(Path(argument))
    if name == "self_caption":
        if argument:
            if captioner_factory is None:
                raise LitAdapterError(f"expert {spec!r}: loading another adapter is not available here")
            return SelfCaptionExpert(captioner_factory(Path(argument)))
        if captioner is None:
            raise LitAdapterError(
                "expert 'self_caption' needs a multimodal (caption-trained) adapter: pass --adapter FILE with a "
                "visual encoder, or use self_caption:ADAPTER_FILE"
            )
        return SelfCaptionExpert(captioner)
    if name == "ocr" and not argument:
        return OCRExpert()
    if argument and argument.isidentifier():
        return _import_expert(name, argument, spec)
    raise LitAdapterError(
        f"unknown expert {spec!r}; use caption_file:PATH, self_caption[:ADAPTER_FILE], ocr or module.path:ClassName"
    )


def _import_expert(module_name: str, class_name: str, spec: str) -> Expert:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise LitAdapterError(f"expert {spec!r}: cannot import module {module_name!r} ({err})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise LitAdapterError(f"expert {spec!r}: module {module_name!r} has no attribute {class_name!r}")
    expert = cls()
    if isinstance(expert, Expert):
        return expert
    if not callable(expert):
        raise LitAdapterError(f"expert {spec!r}: {class_name} instances are not callable on an image path")
    return CallableExpert(expert, spec)
