"""safetygame: the Safety Game (Nguyen & Tran-Thanh, arXiv:2510.09330), a black-box safety layer."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
