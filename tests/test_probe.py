"""The linear probe: standardisation fitted on the training features alone, and a logistic
regression fitted to its optimum."""
import torch
import torch.nn.functional as F

from amdim.probe import fit_logistic_regression, linear_probe, standardise


def test_standardise_uses_the_training_statistics_and_drops_constant_features():
    gen = torch.Generator().manual_seed(torch.seed() % 2**32)
    train = torch.randn(500, 6, generator=gen) * torch.tensor([1.0, 2, 3, 4, 5, 0]) + 7
    test = torch.randn(50, 6, generator=gen) * 10
    a, b = standardise(train, test)
    assert a.shape == (500, 5) and b.shape == (50, 5)
    torch.testing.assert_close(a.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.std(0), torch.ones(5))
    torch.testing.assert_close(b, (test[:, :5] - train[:, :5].mean(0)) / train[:, :5].std(0))


def test_logistic_regression_reaches_its_optimum():
    """At the fitted weights the penalised loss's gradient vanishes (a convex problem: that
    is its minimum), and the fit separates classes that are linearly separable."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**32)
    centres = torch.randn(4, 16, generator=gen) * 3
    y = torch.randint(0, 4, (800,), generator=gen)
    x = centres[y] + torch.randn(800, 16, generator=gen)
    clf = fit_logistic_regression(x, y, 4, l2=1e-3)
    loss = F.cross_entropy(clf(x), y) + 1e-3 * clf.weight.square().sum()
    grads = torch.autograd.grad(loss, list(clf.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-4
    assert linear_probe(x[:600], y[:600], x[600:], y[600:], 4) > 0.95
