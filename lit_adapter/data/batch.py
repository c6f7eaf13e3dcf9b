"""What a training or validation batch holds."""

from __future__ import annotations

# the label of a position that carries no loss (torch's cross_entropy default)
IGNORE_INDEX = -100
