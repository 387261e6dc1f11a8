"""Turn the benchmarks' pytest-benchmark JSON into a summary JSON, markdown tables and a plot.

    python benchmarks/report.py [--json benchmarks/results/kernels.json]
                                [--skips benchmarks/results/skipped.json]
                                [--out-dir benchmarks/results]

Writes ``kernels_summary.json`` (one row per op x mode x shape x provider, with
speedups), ``kernels.md`` (a table per op and mode: provider x shape -> time,
GB/s, % of copy bandwidth, peak memory, speedup over each other provider) and
``kernels.png`` (GB/s per shape, a line per provider; skipped with a note when
matplotlib is not installed). Everything comes from each benchmark's
``extra_info``, written by ``benchmarks/common.py``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROVIDER_ORDER = ("reference", "torch", "compile", "triton", "liger")
MODE_TITLES = {"fwd": "forward", "fwd_bwd": "forward + backward"}


def load_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [bench["extra_info"] for bench in data.get("benchmarks", []) if "gbps" in bench.get("extra_info", {})]


def group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(op, mode) -> rows sorted by shape (in run order) and provider."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["mode"])].append(row)
    for key, members in groups.items():
        shape_order = list(dict.fromkeys(row["shape_label"] for row in members))
        members.sort(key=lambda row: (shape_order.index(row["shape_label"]), provider_rank(row["provider"])))
    return dict(sorted(groups.items()))


def provider_rank(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def add_speedups(rows: list[dict]) -> None:
    """row["speedup_vs"][other] = other's time / this row's time, for providers run on the same op, mode, shape."""
    times = {(row["op"], row["mode"], row["shape_label"], row["provider"]): row["time_ms"] for row in rows}
    for row in rows:
        row["speedup_vs"] = {
            provider: time_ms / row["time_ms"]
            for (op, mode, shape, provider), time_ms in times.items()
            if (op, mode, shape) == (row["op"], row["mode"], row["shape_label"]) and provider != row["provider"]
        }


def format_bytes(count: int | None) -> str:
    return "n/a" if count is None else f"{count / 2**20:.1f}"


def format_speedup(row: dict, other: str) -> str:
    if other == row["provider"]:
        return "-"
    return f"{row['speedup_vs'][other]:.2f}x" if other in row["speedup_vs"] else "n/a"


def markdown_table(members: list[dict]) -> list[str]:
    providers = sorted({row["provider"] for row in members}, key=provider_rank)
    header = ["shape", "provider", "time (ms)", "GB/s", "% of copy", "peak MiB", *(f"vs {name}" for name in providers)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in members:
        speedups = [format_speedup(row, other) for other in providers]
        cells = [
            row["shape_label"],
            row["provider"],
            f"{row['time_ms']:.4f}",
            f"{row['gbps']:.1f}",
            f"{100 * row['fraction_of_copy']:.1f}",
            format_bytes(row["peak_memory_bytes"]),
            *speedups,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(groups: dict[tuple[str, str], list[dict]], skips: list[dict]) -> str:
    first = next(iter(groups.values()))[0]
    lines = [
        "# scratchlm kernel benchmarks",
        "",
        f"- device: {first['device_name']}; torch {first['torch_version']}, triton {first['triton_version']}; "
        f"dtype {first['dtype']}",
        f"- measured copy bandwidth (y.copy_(x), bytes read + written): {first['copy_gbps']:.1f} GB/s",
        f"- timer: {first['timer']}",
        "- GB/s: the bytes each op must move (formula in benchmarks/bench_<op>.py) / time; "
        "the same count for every provider",
        "- vs P: P's time / this provider's time, on the same shape (above 1: this provider is faster)",
        "- peak MiB: memory allocated by one call beyond its inputs (torch.cuda.max_memory_allocated); "
        "n/a off CUDA",
    ]
    notes = sorted({(row["op"], row["provider"], row["note"]) for members in groups.values() for row in members})
    for op, provider, note in notes:
        if note:
            lines.append(f"- {op} / {provider}: {note}")
    for (op, mode), members in groups.items():
        lines += ["", f"## {op}, {MODE_TITLES.get(mode, mode)}", "", *markdown_table(members)]
    if skips:
        lines += ["", "## Not run", ""]
        by_reason: dict[str, int] = defaultdict(int)
        for skip in skips:
            by_reason[skip["reason"]] += 1
        lines += [f"- {count} benchmark(s): {reason}" for reason, count in sorted(by_reason.items())]
    return "\n".join(lines) + "\n"


def plot(groups: dict[tuple[str, str], list[dict]], path: Path) -> bool:
    """GB/s per shape, one panel per op and mode; False (with a printed note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed, so no plot (pip install matplotlib, or the 'bench' extra)")
        return False
    ops = sorted({op for op, _ in groups})
    modes = [mode for mode in MODE_TITLES if any(m == mode for _, m in groups)]
    figure, axes = plt.subplots(len(ops), len(modes), figsize=(6 * len(modes), 3.6 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(modes):
            axis = axes[i][j]
            members = groups.get((op, mode), [])
            shapes = list(dict.fromkeys(row["shape_label"] for row in members))
            for provider in sorted({row["provider"] for row in members}, key=provider_rank):
                mine = [row for row in members if row["provider"] == provider]
                points = [(shapes.index(row["shape_label"]), row["gbps"]) for row in mine]
                axis.plot(*zip(*points), marker="o", label=provider)
            if members:
                axis.axhline(members[0]["copy_gbps"], color="grey", linestyle="--", label="copy bandwidth")
            axis.set_xticks(range(len(shapes)), shapes, rotation=20, fontsize=8)
            axis.set_title(f"{op}, {MODE_TITLES.get(mode, mode)}")
            axis.set_ylabel("GB/s")
            axis.set_ylim(bottom=0)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    first = next(iter(groups.values()))[0]
    figure.suptitle(f"scratchlm kernels on {first['device_name']} ({first['dtype']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "kernels.json", help="the pytest-benchmark --benchmark-json file to read"
    )
    parser.add_argument(
        "--skips", type=Path, default=RESULTS / "skipped.json", help="skipped benchmarks and reasons (optional)"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=RESULTS, help="where kernels.md, kernels_summary.json and kernels.png go"
    )
    args = parser.parse_args(argv)

    rows = load_rows(args.json)
    if not rows:
        print(f"report: {args.json} holds no kernel benchmark results; nothing to write")
        return 1
    add_speedups(rows)
    groups = group(rows)
    skips = json.loads(args.skips.read_text(encoding="utf-8")) if args.skips.is_file() else []

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "kernels_summary.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    markdown = markdown_report(groups, skips)
    (args.out_dir / "kernels.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    written = ["kernels.md", "kernels_summary.json"]
    if plot(groups, args.out_dir / "kernels.png"):
        written.append("kernels.png")
    print(f"report: wrote {', '.join(written)} in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
