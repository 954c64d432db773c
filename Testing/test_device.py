"""Device logic without a GPU: the per-step work runs on PyTorch's "meta" device.

A meta tensor has a shape and a device but no data; any operation that made a
CPU tensor (a hidden .cpu(), a torch.tensor(...) without device=) and combined
it with one on the input's device would raise here, as it would on CUDA. What
stays unmeasured without a GPU is speed and memory (see README).
"""
from __future__ import annotations

import pytest
import torch

from DEQRegistrationLib import solvers
from DEQRegistrationLib.operators import GradientUpdate
from DEQRegistrationLib.similarity import SIMILARITIES
from DEQRegistrationLib.transforms import jacobian_determinant, upsample_field

META = torch.device("meta")


@pytest.mark.parametrize("similarity", sorted(SIMILARITIES))
@pytest.mark.parametrize("shape", [(12, 10, 8), (16, 14)])
def test_a_gradient_step_stays_on_the_input_device(similarity, shape):
    fixed, moving = torch.empty(1, 1, *shape, device=META), torch.empty(1, 1, *shape, device=META)
    z = torch.empty(1, len(shape), *shape, device=META)
    out = GradientUpdate(similarity=similarity)(z, fixed, moving, weight=torch.empty(1, 1, *shape, device=META))
    assert out.device == META and out.shape == z.shape
    assert jacobian_determinant(out).device == META and upsample_field(out, 2).device == META


def test_anderson_keeps_its_history_on_the_input_device(monkeypatch):
    """Everything but the residual (one float per step, which the callback needs) stays on the device."""
    monkeypatch.setattr(solvers, "_relative", lambda diff, fz: 0.5)
    shape = (12, 10, 8)
    fixed, moving = torch.empty(1, 1, *shape, device=META), torch.empty(1, 1, *shape, device=META)
    op = GradientUpdate()
    res = solvers.anderson(lambda z: op(z, fixed, moving), torch.zeros(1, 3, *shape, device=META), max_steps=4,
                           tol=1e-3, memory=3)
    assert res.z.device == META and res.steps == 4
