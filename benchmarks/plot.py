"""``python -m benchmarks.plot bench_out/results.json [--out DIR]``: PNGs from saved results.

Writes, next to the JSON unless --out says otherwise:
- ``blocks_speedup.png``: speedup vs eager per residual block (one panel per mode);
- ``models_speedup.png``: speedup vs eager per model / mode / batch;
- ``models_memory.png``: peak memory per model and contender (GPU runs only);
- ``ops_bandwidth.png``: % of the measured copy ceiling per op shape.
matplotlib is optional: without it this prints a message and exits without error.
"""

import argparse
import sys
import textwrap
from pathlib import Path

from .compare import read_results


def _grouped_bars(ax, groups: list[str], series: dict[str, list], ylabel: str, ref_line=None):
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
    if ref_line is not None:
        ax.axhline(ref_line, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _table(rows: list[dict], label, field: str, skip=()) -> tuple[list[str], dict[str, list]]:
    """(group labels, {contender: [value per group]}) over rows without errors."""
    groups, series = [], {}
    for row in rows:
        if row.get("error") or row["contender"] in skip:
            continue
        group = label(row)
        if group not in groups:
            groups.append(group)
        series.setdefault(row["contender"], {})[group] = row.get(field)
    return groups, {name: [values.get(g) for g in groups] for name, values in series.items()}


def _figure(plt, panels: list[tuple[str, list[dict]]], label, field, ylabel, title, path,
            skip=(), ref_line=None) -> bool:
    panels = [(name, rows) for name, rows in panels if rows]
    panels = [(name, rows, *_table(rows, label, field, skip)) for name, rows in panels]
    panels = [p for p in panels if any(v is not None for vs in p[3].values() for v in vs)]
    if not panels:
        return False
    width = max(7, 0.9 * max(len(p[2]) for p in panels) + 3)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 4.2 * len(panels)), squeeze=False,
                             constrained_layout=True)
    for ax, (name, _, groups, series) in zip(axes[:, 0], panels):
        _grouped_bars(ax, groups, series, ylabel, ref_line)
        ax.set_title(name, fontsize=9)
    fig.suptitle(textwrap.fill(title, int(width * 11)), fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(results_path: Path, out_dir: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print("benchmarks.plot: matplotlib is not installed; no plots written "
              "(pip install matplotlib, then run this again on the same results.json)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_results(results_path)
    rows, settings = data["rows"], data["settings"]
    where = f"{data['timings']}, {settings['dtype']}, {settings['layout']} — {data['date']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    by = lambda level, mode=None: [r for r in rows if r["level"] == level and mode in (None, r["mode"])]
    batch_label = lambda r: f"{r['case']} b{r['batch']}"
    written = []
    figures = [
        ("blocks_speedup.png", [(f"{m} (speedup vs eager, higher is better)", by("blocks", m))
                                for m in ("train", "infer")],
         batch_label, "vs_eager", "speedup vs eager", ("eager",), 1.0),
        ("models_speedup.png", [(f"{m} (speedup vs eager, higher is better)", by("models", m))
                                for m in ("train", "infer")],
         batch_label, "vs_eager", "speedup vs eager", ("eager",), 1.0),
        ("models_memory.png", [(f"{m}: peak memory above inputs (MiB, lower is better)", by("models", m))
                               for m in ("train", "infer")],
         batch_label, "peak_mib", "peak MiB", (), None),
        ("ops_bandwidth.png", [(f"{m}: required bytes / time / measured copy bandwidth", by("ops", m))
                               for m in ("fwd", "fwd+bwd")],
         lambda r: r["shape"], "frac_copy", "fraction of the copy ceiling", (), 1.0),
    ]
    for name, panels, label, field, ylabel, skip, ref_line in figures:
        path = out_dir / name
        if _figure(plt, panels, label, field, ylabel, where, path, skip, ref_line):
            written.append(path)
            print(f"wrote {path}")
        else:
            print(f"skipped {name}: no {field} values in these results"
                  + (" (peak memory is measured on CUDA only)" if field == "peak_mib" else ""))
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="results.json written by python -m benchmarks")
    p.add_argument("--out", type=Path, help="folder for the PNGs (default: the JSON's folder)")
    args = p.parse_args(argv)
    if not args.results.is_file():
        sys.exit(f"benchmarks.plot: {args.results} does not exist; run python -m benchmarks first")
    try:
        plot(args.results, args.out or args.results.parent)
    except (ValueError, OSError) as error:  # not a results.json; an --out that cannot be made
        p.error(str(error))


if __name__ == "__main__":
    main()
