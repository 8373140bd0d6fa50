"""The linear probe: a multinomial logistic regression on frozen features, fitted to
convergence."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The probe's L2 penalty on its weights, added to the mean cross-entropy: small, as a
# well-fitted probe on 60k images needs little (chosen on a held-out tenth of
# Fashion-MNIST's training images).
L2 = 1e-5


def standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets centred and scaled per feature by the training set's mean and deviation;
    features constant over the training set (a padded image's border) carry nothing and are
    left out."""
    mean, std = train_x.mean(0), train_x.std(0)
    keep = std > 0
    return (train_x[:, keep] - mean[keep]) / std[keep], (test_x[:, keep] - mean[keep]) / std[keep]


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = L2,
                            max_iter: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression of y on x (float32), the mean cross-entropy plus
    l2 * |W|^2 minimised by full-batch L-BFGS from zero weights: deterministic, and no
    learning rate or epoch count to tune."""
    clf = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(clf.weight)
    torch.nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + l2 * clf.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def linear_probe(train_x, train_y, test_x, test_y, n_classes: int, l2: float = L2, max_iter: int = 300) -> float:
    """Test accuracy of a logistic regression fitted on the training set's standardised
    features (standardisation fitted on the training set alone)."""
    train_x, test_x = standardise(train_x.float(), test_x.float())
    clf = fit_logistic_regression(train_x, train_y, n_classes, l2, max_iter)
    with torch.no_grad():
        return float((clf(test_x).argmax(1) == test_y).float().mean())
