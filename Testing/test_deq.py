"""Phantom gradients, intermediate-state sampling and BPTT on small problems."""
import torch

from DEQRegistrationLib.deq import DEQ, equal_interval_steps, phantom_steps, state_weights, unroll


def linear_problem(n=12, rho=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-rho, rho, n, dtype=torch.float64)) @ Q.T
    B = torch.randn(n, 4, generator=g, dtype=torch.float64)
    theta = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(n, generator=g, dtype=torch.float64)
    return A, B, theta, target


def exact_implicit_gradient(A, B, theta, target):
    """dL/dtheta for L = ||z* - t||^2 with z* = A z* + B theta (implicit function theorem)."""
    n = A.shape[0]
    I = torch.eye(n, dtype=A.dtype)
    z_star = torch.linalg.solve(I - A, B @ theta.detach())
    dL_dz = 2 * (z_star - target)
    return B.T @ torch.linalg.solve((I - A).T, dL_dz)


def phantom_gradient(A, B, theta, target, k):
    f = lambda z: z @ A.T + B @ theta  # noqa: E731
    with torch.no_grad():
        z = torch.zeros(1, A.shape[0], dtype=A.dtype)
        for _ in range(500):
            z = f(z)
    zk = phantom_steps(f, z, steps=k, damping=0.8)
    loss = ((zk[0] - target) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def test_phantom_gradient_approaches_implicit_gradient_as_steps_grow():
    A, B, theta, target = linear_problem()
    exact = exact_implicit_gradient(A, B, theta, target)
    errors = [float((phantom_gradient(A, B, theta, target, k) - exact).norm() / exact.norm()) for k in (1, 5, 20, 60)]
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6
    assert errors[1] < 0.5  # k = 5 (the paper's setting) is already a usable direction


def test_equal_interval_states():
    assert equal_interval_steps(48, 4) == [12, 24, 36, 48]
    assert equal_interval_steps(6, 4) == [2, 3, 4, 6]
    assert equal_interval_steps(3, 4) == [1, 2, 3]


def _count_saved_tensors(fn):
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count[0]


def test_deq_graph_size_is_flat_in_solver_steps_while_bptt_grows():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 2, 3, padding=1))
    x = torch.randn(1, 1, 16, 16)

    def f(z):
        return z + 0.1 * net(torch.cat([x, z], 1))

    z0 = torch.zeros(1, 2, 16, 16)
    deq = {K: _count_saved_tensors(lambda K=K: DEQ(max_steps=K, tol=0, n_states=4)(f, z0)) for K in (6, 48)}
    bptt = {K: _count_saved_tensors(lambda K=K: unroll(f, z0, K)) for K in (6, 24)}
    assert deq[6] == deq[48] > 0
    assert bptt[24] == 4 * bptt[6]


def test_deq_returns_n_states_with_gradients_even_when_converging_early():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor(0.3))
    f = lambda z: w * z + 1.0  # noqa: E731  (fixed point 1 / (1 - w))
    out = DEQ(max_steps=48, tol=1e-6, n_states=4)(f, torch.zeros(1, 3))
    assert out.info.converged and out.info.steps < 48
    assert len(out.states) == 4
    sum(s.sum() for s in out.states).backward()
    assert w.grad is not None and w.grad.abs() > 0
    torch.testing.assert_close(out.states[-1].detach(), torch.full((1, 3), 1 / 0.7), atol=1e-4, rtol=0)


def test_state_weights():
    assert torch.allclose(state_weights(4), torch.full((4,), 0.25))
    w = state_weights(3, "exponential", gamma=0.5)
    assert torch.allclose(w, torch.tensor([0.25, 0.5, 1.0]) / 1.75)
