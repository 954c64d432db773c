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


def test_anderson_restarts_from_the_best_iterate_when_the_residual_jumps():
    """A map that is a contraction except for one wild evaluation: Anderson restarts its history from the
    best iterate seen and still converges to the fixed point."""
    f0, z_star = contraction(rho=0.8, batch=1)
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = f0(z)
        return out + 1e3 if calls["n"] == 6 else out  # one evaluation far off

    res = anderson(f, torch.zeros_like(z_star), max_steps=200, tol=1e-8, memory=5)
    assert max(res.residuals) > 10 * min(res.residuals[:5])  # the jump was seen...
    assert res.converged and torch.allclose(res.z, z_star, atol=1e-6)  # ...and recovered from


def test_anderson_damps_its_steps_after_a_restart_so_an_overshooting_map_does_not_cycle():
    """An oscillating map (slope -2.2 at its fixed point, with a cubic term): undamped Anderson steps from the
    best iterate repeat the same overshoot after every restart and spend the budget (the gradient mode's
    setting, restart 2x, memory 8). Halving the mixing on each restart breaks the cycle; what it returns is
    a fixed point of the same map (damping changes how far the solver moves, not where the map rests)."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, 200, generator=g)

    def f(z):
        return c - 2.2 * (z - c) + 0.5 * (z - c) ** 3

    res = anderson(f, torch.zeros_like(c), max_steps=200, tol=1e-3, memory=8, restart=2.0)
    assert res.converged and res.steps < 100
    fz = f(res.z)  # a fixed point of the map (it has three per component: z - c = 0 or +-sqrt(6.4))
    assert float((fz - res.z).norm() / fz.norm()) < 2e-3
    undamped = anderson(f, torch.zeros_like(c), max_steps=200, tol=1e-3, memory=8, restart=2.0, restart_damping=1.0)
    assert not undamped.converged and undamped.steps == 200  # restarts alone: the same jumps, the whole budget


def test_anderson_falls_back_to_the_history_mean_when_the_system_is_singular(monkeypatch):
    """If the least-squares solve fails, the step uses equal weights (the mean of the history)."""
    f, z_star = contraction(rho=0.5, batch=1)

    def singular(H, rhs):  # what linalg.solve_ex reports for a singular system: info > 0
        return torch.full_like(rhs, float("nan")), torch.ones(H.shape[0], dtype=torch.int32)

    monkeypatch.setattr(torch.linalg, "solve_ex", singular)
    res = anderson(f, torch.zeros_like(z_star), max_steps=3, tol=0, memory=3)
    # by hand: z1 = f(z0); z2 = mean(f(z0), f(z1)) (equal weights over a history of two)
    z0 = torch.zeros_like(z_star)
    z1 = f(z0)
    z2 = 0.5 * (f(z0) + f(z1))
    assert torch.allclose(res.z, f(z2) if res.steps == 3 else res.z)
    assert res.steps == 3
