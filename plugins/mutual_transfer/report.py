"""The lambda sweep of ``xbench train mutual-transfer --compare``: rows, intervals, paired tests, plot.

A sweep trains independent (beta 0), global (lambda -1) and one local run per lambda from one
starting point and evaluates every student on the same test images, so regimes can be compared
image by image (McNemar's exact test) as well as through each accuracy's own interval (Wilson).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xbench import UserError


Z95 = 1.959963984540054  # standard normal 0.975 quantile


def parse_lambdas(spec: str) -> list[float]:
    """'-1,0.5,0.9' -> [-1.0, 0.5, 0.9] (order kept, repeats dropped); each in [-1, 1]."""
    values: list[float] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--lambdas {spec!r}: {part!r} is not a number; expected e.g. -1,0.5,0.9") from None
        if not -1.0 <= value <= 1.0:
            raise UserError(f"--lambdas {spec!r}: {value:g} is outside [-1, 1], the range of a "
                            "Pearson correlation (-1 = global transfer, 1 = nothing transfers)")
        if value not in values:
            values.append(value)
    if not values:
        raise UserError(f"--lambdas {spec!r}: give at least one lambda, e.g. -1,0.5,0.9")
    return values


def regime_name(lam: float, beta: float) -> str:
    """'independent' (beta 0), 'global' (lambda -1) or 'local 0.9'."""
    if beta == 0:
        return "independent"
    if lam <= -1:
        return "global"
    return f"local {lam:g}"


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927; Brown, Cai, DasGupta 2001 eq. 4):

    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = successes/n.
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside [0, {n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, float]:
    """McNemar's exact test of two classifiers on the same images (McNemar 1947).

    b = images only A gets right, c = images only B gets right; under H0 (equal accuracy)
    b ~ Binomial(b + c, 1/2), two-sided p = min(1, 2 * P(X <= min(b, c))).
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired test needs the same images: {len(correct_a)} vs {len(correct_b)} predictions")
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n if n else 1.0
    return {"only_a": b, "only_b": c, "p": min(1.0, 2 * tail)}


def bits(correct: Sequence[bool]) -> str:
    """Per-image correctness as a '0'/'1' string (compact in json)."""
    return "".join("1" if x else "0" for x in correct)


def unbits(text: str) -> list[bool]:
    return [ch == "1" for ch in text]


def _layer_kept(row: dict[str, Any]) -> list[float]:
    keys = sorted((k for k in row if k.startswith("kept_l")), key=lambda k: int(k[6:]))
    return [row[k] for k in keys]


def sweep_row(regime: str, config: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """One regime's row: final top-1 of both students with Wilson intervals, and the kept fraction
    overall and per layer pair in the first and last mutual epoch (None without transfer)."""
    mutual = [r for r in history if r.get("phase") == "mutual"]
    evaluated = [r for r in history if "top1_st1" in r]
    if not mutual or not evaluated:
        raise ValueError(f"{regime}: no trained and evaluated epoch in the history")
    first, last, final = mutual[0], mutual[-1], evaluated[-1]
    transfer = config["beta"] != 0
    row: dict[str, Any] = {"regime": regime, "lambda": config["lam"], "beta": config["beta"]}
    for member in ("st1", "st2"):
        row[f"top1_{member}"] = final[f"top1_{member}"]
        if f"correct_{member}" in final:
            hits = unbits(final[f"correct_{member}"])
            row[f"top1_{member}_ci95"] = [round(v, 6) for v in wilson_interval(sum(hits), len(hits))]
    row["kept"] = last["kept"] if transfer else None  # the table1.json field of earlier versions
    row["kept_first"] = first["kept"] if transfer else None
    row["kept_last"] = last["kept"] if transfer else None
    row["kept_layers_first"] = _layer_kept(first) if transfer else None
    row["kept_layers_last"] = _layer_kept(last) if transfer else None
    row["kept_per_epoch"] = [r["kept"] for r in mutual] if transfer else None
    row["top1_per_epoch"] = {m: [r[f"top1_{m}"] for r in mutual if f"top1_{m}" in r] for m in ("st1", "st2")}
    return row


def paired_tests(histories: dict[str, list[dict[str, Any]]], references: Sequence[str] = ("independent", "global")
                 ) -> list[dict[str, Any]]:
    """McNemar exact tests of every regime against each reference, per student, final epoch."""

    def final_bits(regime: str, member: str) -> list[bool] | None:
        rows = [r for r in histories[regime] if f"correct_{member}" in r]
        return unbits(rows[-1][f"correct_{member}"]) if rows else None

    out = []
    for regime in histories:
        for ref in references:
            if ref == regime or ref not in histories:
                continue
            for member in ("st1", "st2"):
                a, b = final_bits(regime, member), final_bits(ref, member)
                if a is None or b is None:
                    continue
                test = mcnemar_exact(a, b)
                out.append({"regime": regime, "reference": ref, "student": member,
                            "delta": (sum(a) - sum(b)) / len(a), "only_regime": test["only_a"],
                            "only_reference": test["only_b"], "p": test["p"]})
    return out


def plot_sweep(table: dict[str, Any], path: str | Path, epoch_lambda: float | None = None) -> Path:
    """Three panels from a ``table1.json``: kept fraction against lambda (first and last epoch),
    top-1 of both students against lambda with 95% Wilson intervals (independent training as
    dotted lines), and kept fraction per layer pair and top-1 per epoch for one local lambda.

    Lambdas are evenly spaced categories (global transfer first); ``epoch_lambda`` defaults to
    the local lambda whose first-epoch kept fraction is nearest 50%.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    transfer = sorted((r for r in rows if r["beta"] != 0), key=lambda r: r["lambda"])
    independent = next((r for r in rows if r["beta"] == 0), None)
    local = [r for r in transfer if r["lambda"] > -1]
    if not transfer:
        raise ValueError("no transfer rows to plot")
    if epoch_lambda is None and local:
        epoch_lambda = min(local, key=lambda r: abs(r["kept_first"] - 0.5))["lambda"]
    colours = {"st1": "tab:blue", "st2": "tab:orange"}
    x = list(range(len(transfer)))
    labels = ["global" if r["lambda"] <= -1 else f"{r['lambda']:g}" for r in transfer]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(x, [r["kept_first"] for r in transfer], "o--", color="0.5", label="first epoch")
    ax.plot(x, [r["kept_last"] for r in transfer], "o-", color="k", label="last epoch")
    ax.set_ylabel("fraction of regions kept (r > lambda)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("kept regions against lambda")
    ax = axes[1]
    for member, colour in colours.items():
        top = [r[f"top1_{member}"] for r in transfer]
        ci = [r.get(f"top1_{member}_ci95") for r in transfer]
        if all(ci):
            ax.errorbar(x, top, yerr=[[t - c[0] for t, c in zip(top, ci)], [c[1] - t for t, c in zip(top, ci)]],
                        fmt="s-", color=colour, capsize=3, label=f"{member.upper()} (95% Wilson)")
        else:
            ax.plot(x, top, "s-", color=colour, label=member.upper())
        if independent is not None:
            ax.axhline(independent[f"top1_{member}"], color=colour, ls=":", lw=1.2,
                       label=f"{member.upper()} independent")
    ax.set_ylabel("top-1, last epoch")
    ax.set_title(f"top-1 on {table.get('test', '')} ({table.get('test_images', '?')} images)")
    for ax in axes[:2]:
        ax.set_xticks(x, labels)
        ax.set_xlabel("lambda")
        ax.legend(fontsize=7)
    ax = axes[2]
    chosen = next((r for r in local if r["lambda"] == epoch_lambda), None)
    if chosen is not None:
        mutual = [r for r in table["histories"][chosen["regime"]] if r.get("phase") == "mutual"]
        epochs = list(range(1, len(mutual) + 1))
        ax.plot(epochs, [r["kept"] for r in mutual], "o-", color="k", label="kept, all layer pairs")
        for j in range(len(_layer_kept(mutual[0]))):
            ax.plot(epochs, [_layer_kept(r)[j] for r in mutual], ".--", lw=1, label=f"kept, layer pair {j + 1}")
        for member, colour in colours.items():
            ax.plot(epochs, chosen["top1_per_epoch"][member], "s-", color=colour, label=f"top-1 {member.upper()}")
        ax.set_xticks(epochs)
        ax.set_title(f"per epoch, lambda {epoch_lambda:g}")
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xbench_plugins.mutual_transfer.report TABLE1_JSON OUT_PNG [LAMBDA]``."""
    import json
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        print(main.__doc__, file=sys.stderr)
        return 2
    table = json.loads(Path(args[0]).read_text())
    print(plot_sweep(table, args[1], float(args[2]) if len(args) == 3 else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
