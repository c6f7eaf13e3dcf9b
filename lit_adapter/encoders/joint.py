"""ImageBind-LLM's use of the joint embedding space (official `forward_visual`): weighted mixing of several inputs
and the cross-modal cache.

Mixing: e_m = normalise(encoder output of input m); w_m <- w_m / (sum w + 1e-6); f = sum_m w_m e_m (not
renormalised).
Cache (K = cache_size, tau = cache_t, lambda = cache_weight): (s, P) = the K stored embeddings nearest f (inner
product, or what a faiss index scores) and their vectors; a = softmax(tau * s) over K; r = normalise(sum_k a_k P_k);
f <- normalise((1 - lambda) f + lambda r). Each row of a batch is weighted by its own scores (the official matrix
product is right for one row only).
The image-output path keeps the original norm: f <- |f| * blend(f / |f|) (`blend_keep_norm`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from lit_adapter.errors import LitAdapterError, first_line

WEIGHT_EPS = 1e-6
INDEX_SUFFIXES = (".index", ".faiss")


def mixing_weights(weights: Sequence[float]) -> list[float]:
    """w / (sum w + 1e-6), as the official code normalises the modality weights."""
    total = sum(weights)
    return [w / (total + WEIGHT_EPS) for w in weights]


def mix(embeddings: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """sum_m w_m e_m over inputs [B, D] each; `normalize` L2-normalises every e_m first (the LLM path; the image
    output path mixes the pre-normalisation embeddings as they are)."""
    if not embeddings or len(embeddings) != len(weights):
        raise LitAdapterError(f"mixing needs one weight per input: {len(embeddings)} inputs, {len(weights)} weights")
    total = None
    for e, w in zip(embeddings, mixing_weights(weights), strict=True):
        term = w * (F.normalize(e, dim=-1) if normalize else e)
        total = term if total is None else total + term
    return total


@dataclasses.dataclass
class CacheSettings:
    """The official defaults: 10 neighbours, temperature 20, half of the result from the cache."""

    cache_size: int = 10
    cache_t: float = 20.0
    cache_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.cache_size < 1:
            raise LitAdapterError(f"cache_size must be >= 1, got {self.cache_size}")
        if not 0.0 <= self.cache_weight <= 1.0:
            raise LitAdapterError(f"cache_weight must be in [0, 1], got {self.cache_weight}")


class EmbeddingCache:
    """Stored embeddings to retrieve from: an [N, D] matrix (searched by inner product) or a faiss index."""

    def __init__(self, matrix: Optional[torch.Tensor] = None, index=None, source: str = "cache") -> None:
        self.matrix, self.index, self.source = matrix, index, source

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1]) if self.matrix is not None else int(self.index.d)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [B, k], vectors [B, k, D]) of the k best stored embeddings for each query [B, D]."""
        if queries.shape[-1] != self.dim:
            raise LitAdapterError(f"{self.source}: holds {self.dim}-wide embeddings, the encoder makes "
                                  f"{queries.shape[-1]}-wide ones")
        if self.matrix is not None:
            matrix = self.matrix.to(queries.device, torch.float32)
            scores, ids = (queries.float() @ matrix.T).topk(min(k, matrix.shape[0]), dim=-1)
            return scores, matrix[ids]
        import numpy as np

        scores, ids = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        vectors = np.stack([np.stack([self.index.reconstruct(int(i)) for i in row]) for row in ids])
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(vectors).to(queries.device)


def load_cache(path: Union[str, Path]) -> EmbeddingCache:
    """A cache from a .safetensors file (one [N, D] tensor, or the one named `embeddings`) or a faiss index."""
    path = Path(path)
    if not path.is_file():
        raise LitAdapterError(f"{path}: cache index not found")
    if path.suffix in INDEX_SUFFIXES:
        try:
            import faiss
        except ImportError:
            raise LitAdapterError(f"{path}: reading a faiss index needs faiss-cpu (pip install faiss-cpu), or "
                                  "store the embeddings as a safetensors matrix") from None
        try:
            return EmbeddingCache(index=faiss.read_index(str(path)), source=str(path))
        except RuntimeError as err:
            raise LitAdapterError(f"{path}: cannot read the faiss index ({first_line(err)})") from None
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for unreadable files
        raise LitAdapterError(f"{path}: cannot read the cache ({first_line(err)})") from None
    matrix = tensors.get("embeddings", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if matrix is None or matrix.ndim != 2:
        raise LitAdapterError(f"{path}: expected one [N, D] tensor named 'embeddings', found {sorted(tensors)}")
    return EmbeddingCache(matrix=matrix, source=str(path))


def blend(f: torch.Tensor, cache: EmbeddingCache, settings: CacheSettings) -> torch.Tensor:
    """normalise((1 - lambda) f + lambda r), r = normalise(sum_k softmax(tau s)_k P_k) (see the module docstring)."""
    scores, vectors = cache.search(f, settings.cache_size)
    attention = (settings.cache_t * scores).softmax(dim=-1)  # [B, K]
    retrieved = F.normalize((attention.unsqueeze(-1) * vectors).sum(dim=1), dim=-1).to(f.dtype)
    return F.normalize((1 - settings.cache_weight) * f + settings.cache_weight * retrieved, dim=-1)


def blend_keep_norm(f: torch.Tensor, cache: EmbeddingCache, settings: CacheSettings) -> torch.Tensor:
    """The image-output form: blend the direction, keep the length: |f| * blend(f / |f|)."""
    norm = f.norm(dim=-1, keepdim=True)
    return norm * blend(f / norm, cache, settings)
