"""``python -m benchmarks.compare OLD.json NEW.json``: two runs' rows side by side, what a change moved.

For every row both runs have (same level, case, mode, batch and contender): the old and new median ms, new/old
(below 1 is faster), whether each agreed with the reference, and for the Triton rows the config the autotuner
chose in each run where it changed. Rows only one run has are listed after. The runs' commands, commits and GPUs
head the table, so a comparison of runs on different machines or torch versions says so.

    python -m benchmarks.compare benchmarks/baselines/2026-12-04-h200-resnet50-convs-fwd.json $OUT/bench0/results.json
    python -m benchmarks.compare OLD.json NEW.json --contenders triton,triton+stats --changed 0.05

``benchmarks/baselines/`` keeps runs to compare against (the date, GPU and what ran in each name).
"""

import argparse
import json
from pathlib import Path


def read_results(path: Path) -> dict:
    """The results.json at ``path`` that ``python -m benchmarks`` wrote, or ValueError saying why it is not one."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is no results.json of python -m benchmarks (it has no rows)")
    return data


def _key(row: dict) -> tuple:
    return row["level"], row["case"], row["mode"], row["batch"], row["contender"]


def _chosen(row: dict) -> str:
    """The config the autotuner chose for the row's first tuned kernel, shortened; "" where none was tuned."""
    tuned = row.get("tuned") or []
    if not tuned:
        return ""
    best = tuned[0]["best"]
    for default in (" X_IN_L1=False", " CHANNEL_ROWS=False", " PERSISTENT=0", " BOX_H=1 BOX_W=1", " BLOCK_K=64"):
        best = best.replace(default, "")
    return best.replace("BLOCK_M=", "").replace(" BLOCK_N=", "x").replace("USE_TMA=True", "tma").replace(
        "USE_TMA=False", "ptr")


def _agreement(row: dict) -> str:
    return {True: "ok", False: "DIFF", None: "ref"}.get(row.get("agree"), "?")


_SHAPE_SETTINGS = ("device", "dtype", "size", "layout")  # what changes every row's work, case names alike


def _setting_differences(old: dict, new: dict) -> list[str]:
    """A warning line where the runs' settings that decide the rows' shapes and dtype differ: the rows, matched by
    case name, then time different work."""
    before, after = old.get("settings", {}), new.get("settings", {})
    differ = [f"{name} {before.get(name)!r} -> {after.get(name)!r}" for name in _SHAPE_SETTINGS
              if before.get(name) != after.get(name)]
    return [f"- **warning: the runs differ in {', '.join(differ)}; each row below compares different work**"] \
        if differ else []


def compare(old: dict, new: dict, contenders=None, changed=None) -> list[str]:
    """The comparison's lines (markdown): ``contenders`` (names) limits the rows; ``changed`` (a fraction) keeps
    only the rows whose new/old differs from 1 by more than that."""
    lines = [f"- old: `{old.get('command', '?')}` ({old.get('git', '?')}, {old.get('date', '?')}, "
             f"{old.get('environment', {}).get('GPU', '?')}, torch {old.get('environment', {}).get('torch', '?')})",
             f"- new: `{new.get('command', '?')}` ({new.get('git', '?')}, {new.get('date', '?')}, "
             f"{new.get('environment', {}).get('GPU', '?')}, torch {new.get('environment', {}).get('torch', '?')})",
             *_setting_differences(old, new),
             "", "| case | mode | batch | contender | old ms | new ms | new/old | agree old/new | config old -> new |",
             "|---|---|---:|---|---:|---:|---:|---|---|"]
    old_rows = {_key(r): r for r in old["rows"]}
    new_rows = {_key(r): r for r in new["rows"]}
    for key, row in new_rows.items():
        if key not in old_rows or (contenders and key[4] not in contenders):
            continue
        before = old_rows[key]
        old_ms, new_ms = before.get("median_ms"), row.get("median_ms")
        ratio = new_ms / old_ms if old_ms and new_ms else None
        if changed is not None and ratio is not None and abs(ratio - 1) <= changed:
            continue
        configs = (_chosen(before), _chosen(row))
        config = "" if configs[0] == configs[1] else f"{configs[0] or '-'} -> {configs[1] or '-'}"
        lines.append(f"| {key[1]} | {key[2]} | {key[3]} | {key[4]} | {old_ms or float('nan'):.3f}"
                     f" | {new_ms or float('nan'):.3f} | {'' if ratio is None else f'{ratio:.2f}'}"
                     f" | {_agreement(before)}/{_agreement(row)} | {config} |")
    for name, only in (("new run only", new_rows.keys() - old_rows.keys()),
                       ("old run only", old_rows.keys() - new_rows.keys())):
        rows = sorted(k for k in only if not contenders or k[4] in contenders)
        if rows:
            lines += ["", f"{name}: " + ", ".join(f"{k[1]} {k[2]} b{k[3]} {k[4]}" for k in rows)]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--contenders", help="comma-separated contender names (default: all)")
    parser.add_argument("--changed", type=float,
                        help="only rows whose new/old differs from 1 by more than this (e.g. 0.05)")
    args = parser.parse_args(argv)
    try:
        old, new = (read_results(path) for path in (args.old, args.new))
    except ValueError as error:
        parser.error(str(error))
    contenders = set(args.contenders.split(",")) if args.contenders else None
    print("\n".join(compare(old, new, contenders, args.changed)))


if __name__ == "__main__":
    main()
