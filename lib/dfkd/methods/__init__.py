"""Registry of data-free distillation methods sharing one interface (:class:`DistillMethod`).

``METHODS[name]`` is a :class:`DistillMethod` subclass; one parameter (``method``) switches
between them in the distillation notebook and in batch manifests.
"""
from __future__ import annotations

from .base import COUNTERS, DistillMethod
from .adi import ADI
from .cmi import CMI
from .dafl import DAFL
from .dfad import DFAD
from .dfkd_fgvc import DFKDFGVC
from .dfq import DFQ
from .fast import Fast
from .mad import MAD
from .zskd import ZSKD
from .zskt import ZSKT

METHODS: dict[str, type[DistillMethod]] = {
    "dfkd_fgvc": DFKDFGVC,
    "zskd": ZSKD,
    "zskt": ZSKT,
    "dafl": DAFL,
    "dfad": DFAD,
    "adi": ADI,
    "dfq": DFQ,
    "mad": MAD,
    "cmi": CMI,
    "fast": Fast,
}


def create_method(name: str, teacher, student, cfg, *, num_classes: int, image_size: int, device) -> DistillMethod:
    """Build ``METHODS[name]``; an unknown name lists the registered ones."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}")
    return METHODS[name](teacher, student, cfg, num_classes=num_classes, image_size=image_size, device=device)


__all__ = ["METHODS", "COUNTERS", "DistillMethod", "create_method"]
