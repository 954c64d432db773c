"""Model checkpoints: one self-describing file per trained update operator.

A checkpoint is a ``torch.save`` dict loaded with ``weights_only=True``:
``{"format": "deqreg", "version": 1, "config": {...}, "state_dict": {...}}``.
``config`` holds everything needed to rebuild and run the operator:
``update`` (learned|hybrid), ``unet`` (UNet kwargs), ``ndim``, ``factor`` (the
working grid is the fixed grid downsampled by this) or ``factors`` (a
coarse-to-fine pyramid of such grids, ``level_weights`` splitting the step
budget), ``max_steps`` and ``tol`` (inference defaults), ``scale``,
``window``, hybrid ``tau``/``sigma``/``op_lam``, plus free-form training facts.
Training may add ``optimizer``/``rng``/``step`` for exact resume; inference
ignores them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Tuple

import torch

from .errors import InputError
from .networks import UNet
from .operators import HybridUpdate, LearnedUpdate, UpdateOperator

MODELS_DIR = Path(__file__).resolve().parent / "models"


def default_model_path(ndim: int) -> Path:
    return MODELS_DIR / f"default_{ndim}d.pt"


def build_operator(config: dict) -> UpdateOperator:
    net = UNet(**config["unet"])
    kind = config.get("update", "learned")
    if kind == "learned":
        return LearnedUpdate(net, scale=config.get("scale", 1.0))
    if kind == "hybrid":
        return HybridUpdate(net, tau=config.get("tau", 1.0), sigma=config.get("sigma", 1.0),
                            window=config.get("window", 5), scale=config.get("scale", 1.0),
                            lam=config.get("op_lam", 0.0))
    raise InputError(f"checkpoint has unknown update kind {kind!r}")


def save_checkpoint(path, operator: UpdateOperator, config: dict, **extra) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "deqreg", "version": 1, "config": config, "state_dict": operator.state_dict(), **extra}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise InputError(f"cannot read model file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != "deqreg":
        raise InputError(f"{path} is not a DEQReg checkpoint")
    return payload


def load_operator(spec, ndim: int) -> Tuple[UpdateOperator, dict]:
    """Resolve 'default' or a path to (operator in eval mode, config)."""
    path = default_model_path(ndim) if spec == "default" else Path(spec)
    if spec == "default" and not path.is_file():
        raise InputError(f"no default {ndim}D model is installed ({path.name} missing); use --model none "
                         "(gradient mode) or a checkpoint path")
    payload = read_checkpoint(path)
    config = payload["config"]
    if config.get("ndim") != ndim:
        raise InputError(f"model {path.name} is for {config.get('ndim')}D images, the input is {ndim}D")
    op = build_operator(config)
    op.load_state_dict(payload["state_dict"])
    op.eval()
    return op, config
