"""Root solvers on contractions with a known fixed point."""
import pytest
import torch

from DEQRegistrationLib.solvers import anderson, fixed_point_iteration, solve


def contraction(n=40, rho=0.9, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.0, rho, n, dtype=torch.float64)
    A = Q @ torch.diag(eig) @ Q.T
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, b.T).T
    return (lambda z: z @ A.T + b), z_star


@pytest.mark.parametrize("method", ["anderson", "fixed-point"])
def test_solver_finds_known_fixed_point(method):
    f, z_star = contraction()
    res = solve(f, torch.zeros_like(z_star), method, max_steps=500, tol=1e-8)
    assert res.converged
    assert res.final_residual < 1e-8
    assert torch.allclose(res.z, z_star, atol=1e-6)
    assert len(res.residuals) == res.steps


def test_anderson_needs_fewer_steps_than_plain_iteration():
    f, z_star = contraction(rho=0.95)
    z0 = torch.zeros_like(z_star)
    plain = fixed_point_iteration(f, z0, max_steps=2000, tol=1e-6)
    acc = anderson(f, z0, max_steps=2000, tol=1e-6, memory=5)
    assert plain.converged and acc.converged
    assert acc.steps < plain.steps / 3, (acc.steps, plain.steps)


def test_callback_sees_every_step_and_can_stop():
    f, z_star = contraction()
    seen = []

    def cb(step, residual, z):
        seen.append((step, residual, z.clone()))
        return step == 4

    res = anderson(f, torch.zeros_like(z_star), max_steps=100, tol=1e-12, callback=cb)
    assert res.stopped and not res.converged
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    assert res.steps == 4
    # the returned state is the one the callback saw last
    assert torch.equal(res.z, seen[-1][2])
    assert res.residuals == [r for _, r, _ in seen]


def test_residuals_shrink_and_recorded_states_survive_early_stop():
    f, z_star = contraction(rho=0.5)
    res = fixed_point_iteration(f, torch.zeros_like(z_star), max_steps=48, tol=1e-6, record_at=[12, 24, 36, 48])
    assert res.converged and res.steps < 48
    assert len(res.states) == 4  # positions past the stop take the final state
    assert torch.equal(res.states[-1], res.z)
    assert res.residuals[-1] < res.residuals[0] * 1e-4


def test_unknown_solver_is_rejected():
    f, z = contraction()
    with pytest.raises(ValueError, match="unknown solver"):
        solve(f, z, "broyden")
