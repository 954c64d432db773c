"""Model checkpoints: one self-describing file per trained update operator.

A checkpoint is a ``torch.save`` dict loaded with ``weights_only=True``:
``{"format": "deqreg", "version": 2, "config": ModelConfig.to_dict(),
"state_dict": {...}}``. The config (``config.ModelConfig``) is the only
description of the model: training writes it, every reader rebuilds the
operator and its level plan from it. Version-1 files (flat configs) still
load. Training may add ``optimizer``/``rng``/``step`` for exact resume;
inference ignores them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Tuple

import torch

from .config import CONFIG_VERSION, ModelConfig
from .errors import InputError
from .networks import ConvNet, FeatureNet, UNet
from .operators import (FeatureGradientUpdate, HybridUpdate, LearnedUpdate, LevelStack, RecurrentUpdate,
                        UpdateOperator)

MODELS_DIR = Path(__file__).resolve().parent / "models"


def default_model_path(ndim: int) -> Path:
    return MODELS_DIR / f"default_{ndim}d.pt"


def _one_operator(config: ModelConfig) -> UpdateOperator:
    net = {"unet": UNet, "cnn": ConvNet, "features": FeatureNet}[config.network](**config.unet)
    if config.update == "learned" and config.recurrent_hidden:
        return RecurrentUpdate(net, hidden=config.recurrent_hidden, window=config.window, similarity=config.similarity,
                               scale=config.scale, second_order=config.second_order)
    if config.update == "learned":
        return LearnedUpdate(net, scale=config.scale)
    if config.update == "features":  # beta and the diffusion scale are weights (the state dict's)
        return FeatureGradientUpdate(net, step_size=config.tau, diffusion_weight=config.diffusion_weight,
                                     sigma=config.sigma, window=config.window, similarity=config.similarity)
    return HybridUpdate(net, tau=config.tau, sigma=config.sigma, window=config.window, similarity=config.similarity,
                        scale=config.scale, diffusion_weight=config.diffusion_weight,
                        second_order=config.second_order)


def build_operator(config: ModelConfig) -> UpdateOperator:
    """A fresh (untrained) operator of the configured kind; one per pyramid level with ``per_level_networks``."""
    if config.per_level_networks:
        return LevelStack([_one_operator(config) for _ in config.pyramid])
    return _one_operator(config)


def save_checkpoint(path, operator: UpdateOperator, config: ModelConfig, **extra) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "deqreg", "version": CONFIG_VERSION, "config": config.to_dict(),
               "state_dict": operator.state_dict(), **extra}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path) -> dict:
    """The checkpoint's payload, with ``payload["config"]`` parsed into a ``ModelConfig``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise InputError(f"cannot read model file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != "deqreg":
        raise InputError(f"{path} is not a DEQReg checkpoint")
    try:
        payload["config"] = ModelConfig.from_dict(payload["config"], int(payload.get("version", 1)))
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: damaged model config ({type(exc).__name__}: {exc})") from None
    return payload


def model_path(spec, ndim: int) -> Path:
    """'default' (the shipped model for ``ndim``) or a path, checked to exist."""
    if spec == "default":
        path = default_model_path(ndim)
        if not path.is_file():
            raise InputError(f"no default {ndim}D model is installed ({path.name} missing); use the gradient "
                             "update (no weights; CLI: --model none) or a checkpoint path")
        return path
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"model file not found: {path} (give 'default' or a .pt path)")
    return path


def load_operator(spec, ndim: int) -> Tuple[UpdateOperator, ModelConfig]:
    """Resolve 'default' or a path to (operator in eval mode, its config)."""
    path = model_path(spec, ndim)
    payload = read_checkpoint(path)
    config = payload["config"]
    if config.ndim != ndim:
        raise InputError(f"model {path.name} is for {config.ndim}D images, the input is {ndim}D")
    op = build_operator(config)
    op.load_state_dict(payload["state_dict"])
    op.eval()
    op.config = config
    return op, config
