"""Charts shared by the run report and the Data Docs: the curation funnel."""

from __future__ import annotations

from pathlib import Path


def funnel_png(documents_in: int, steps: list[tuple[str, int]], out: Path) -> Path:
    """A horizontal bar per step: the documents left after it, labelled with what it removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, left = ["documents in"], [documents_in]
    for step, removed in steps:
        labels.append(f"after {step} (-{removed:,})")
        left.append(left[-1] - removed)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2), dpi=100)
    bars = ax.barh(labels[::-1], left[::-1], color="#0969da")
    ax.bar_label(bars, fmt="{:,.0f}")
    ax.set_xlabel("documents")
    ax.set_title("Curation funnel")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
