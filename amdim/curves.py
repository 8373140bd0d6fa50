"""The training curves of a run, drawn from its CSV logs into OUT/curves.png: the NCE
objective at every logged step (OUT/steps.csv) and the online classifiers' test accuracy at
every epoch end (OUT/metrics.csv)."""
from __future__ import annotations

import csv
import os


def _rows(path: str) -> list[dict[str, float]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]


def draw(out: str) -> str:
    """Write OUT/curves.png from OUT/steps.csv and OUT/metrics.csv; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    steps, epochs = _rows(os.path.join(out, "steps.csv")), _rows(os.path.join(out, "metrics.csv"))
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        x = [r["step"] for r in steps]
        loss_ax.plot(x, [r["total"] for r in steps], label="objective (total)")
        for key in ("loss_1t5", "loss_1t7", "loss_5t5"):
            loss_ax.plot(x, [r[key] for r in steps], label=key, linewidth=0.8)
        loss_ax.legend()
    loss_ax.set(xlabel="step", ylabel="NCE loss", title="training objective")
    if epochs:
        x = [r["step"] for r in epochs]
        acc_ax.plot(x, [r["test_acc_linear"] for r in epochs], "o-", label="online linear")
        acc_ax.plot(x, [r["test_acc_mlp"] for r in epochs], "s-", label="online MLP")
        acc_ax.legend()
    acc_ax.set(xlabel="step", ylabel="test accuracy", title="online classifiers (epoch ends)")
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(f"{path}.tmp.png", dpi=100)
    plt.close(fig)
    os.replace(f"{path}.tmp.png", path)
    return path
