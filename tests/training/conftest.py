"""Fixtures of the training tests: a private cache, a small instruction file."""

from __future__ import annotations



