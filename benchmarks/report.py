"""Turn the benchmarks' pytest-benchmark JSON into a summary JSON, markdown tables and a plot.

    python benchmarks/report.py [--json benchmarks/results/kernels.json [MORE.json ...]]
                                [--skips benchmarks/results/skipped.json [MORE.json ...]]
                                [--out-dir benchmarks/results]

Writes ``kernels_summary.json`` (one row per op x mode x shape x provider, with
speedups), ``kernels.md`` (a table per op and mode: provider x shape -> time,
GB/s and % of copy bandwidth, or TFLOP/s for attention, peak memory, speedup
over each other provider), ``kernels.png`` (GB/s per shape of the memory-bound
kernels, a line per provider) and ``attention.png`` (attention's TFLOP/s
against N, a panel per mode and head_dim); the plots are skipped with a note
when matplotlib is not installed. Everything comes from each benchmark's
``extra_info``, written by ``benchmarks/common.py``. Several result files
(e.g. two pytest runs with different settings) are read as one run.

Document-masked attention (op ``attention_documents``) gets tables of its
own: effective TFLOP/s (visible query-key pairs only), the layout of each
shape, and after each table the masked Triton kernel's speedup over full
causal attention and over FlexAttention on the same mask, the two it must beat.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROVIDER_ORDER = (
    "reference",
    "torch",
    "compile",
    "sdpa_math",
    "sdpa_flash",
    "sdpa_efficient",
    "sdpa_cudnn",
    "sdpa_mask",
    "flex",
    "triton_causal",
    "triton",
    "liger",
)
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}
DOCUMENT_OP = "attention_documents"
OP_TITLES = {DOCUMENT_OP: "attention within documents (packed rows, document-causal mask)"}
# The masked kernel, and the providers it must beat on every document-masked shape.
DOCUMENT_KERNEL = "triton"
DOCUMENT_BASELINES = {"triton_causal": "full causal attention", "flex": "FlexAttention, same mask"}


def load_rows(paths: list[Path]) -> list[dict]:
    """The kernel rows of every file, in order (a file without kernel rows adds none)."""
    rows = []
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows += [
            bench["extra_info"]
            for bench in data.get("benchmarks", [])
            if {"gbps", "tflops"} & bench.get("extra_info", {}).keys()
        ]
    return rows


def load_skips(paths: list[Path]) -> list[dict]:
    """The skipped benchmarks of every file that exists (a run may have skipped nothing)."""
    skips = []
    for path in paths:
        if path.is_file():
            skips += json.loads(path.read_text(encoding="utf-8"))
    return skips


def compute_bound(members: list[dict]) -> bool:
    """True for a group measured in TFLOP/s (attention), False for GB/s."""
    return "tflops" in members[0]


def group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(op, mode) -> rows sorted by shape (in run order) and provider."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["mode"])].append(row)
    for key, members in groups.items():
        shape_order = list(dict.fromkeys(row["shape_label"] for row in members))
        members.sort(key=lambda row: (shape_order.index(row["shape_label"]), provider_rank(row["provider"])))
    return dict(sorted(groups.items(), key=lambda item: (item[0][0], mode_rank(item[0][1]))))


def mode_rank(mode: str) -> int:
    modes = list(MODE_TITLES)
    return modes.index(mode) if mode in modes else len(modes)


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


def document_masked(members: list[dict]) -> bool:
    """True for a group of document-masked attention, whose rows carry their layout."""
    return members[0]["op"] == DOCUMENT_OP


def layout_cells(row: dict) -> list[str]:
    """A document-masked row's layout: documents (realised mean length) and the causal pairs left visible."""
    return [f"{row['documents']} ({row['realised_mean_length']:.0f})", f"{100 * row['causal_fraction']:.1f}"]


def markdown_table(members: list[dict]) -> list[str]:
    providers = sorted({row["provider"] for row in members}, key=provider_rank)
    throughput = ["TFLOP/s"] if compute_bound(members) else ["GB/s", "% of copy"]
    layout = ["documents (mean length)", "% of causal pairs"] if document_masked(members) else []
    if layout:
        throughput = ["effective TFLOP/s"]
    header = [
        "shape",
        *layout,
        "provider",
        "time (ms)",
        *throughput,
        "peak MiB",
        *(f"vs {name}" for name in providers),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in members:
        speedups = [format_speedup(row, other) for other in providers]
        if compute_bound(members):
            # 3 significant digits: hundreds of TFLOP/s on a GPU, hundredths on a CPU smoke run.
            rates = [f"{row['tflops']:.3g}"]
        else:
            rates = [f"{row['gbps']:.1f}", f"{100 * row['fraction_of_copy']:.1f}"]
        cells = [
            row["shape_label"],
            *(layout_cells(row) if layout else []),
            row["provider"],
            f"{row['time_ms']:.4f}",
            *rates,
            format_bytes(row["peak_memory_bytes"]),
            *speedups,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def document_targets(members: list[dict]) -> list[str]:
    """Per shape, the masked kernel's speedup over each time it must beat (above 1: beaten)."""
    kernels = {row["shape_label"]: row for row in members if row["provider"] == DOCUMENT_KERNEL}
    if not kernels:
        return [f"- targets: no {DOCUMENT_KERNEL} rows in this run (the masked kernel is timed on CUDA only)"]
    lines = []
    for shape in dict.fromkeys(row["shape_label"] for row in members):
        if shape not in kernels:
            lines.append(f"- {shape}: {DOCUMENT_KERNEL} not run")
            continue
        row = kernels[shape]
        parts = []
        for baseline, title in DOCUMENT_BASELINES.items():
            ratio = row["speedup_vs"].get(baseline)
            if ratio is None:
                parts.append(f"vs {title} ({baseline}): not run")
            else:
                verdict = "faster" if ratio > 1 else "NOT faster"
                parts.append(f"{ratio:.2f}x vs {title} ({baseline}): {verdict}")
        lines.append(
            f"- {shape}: {DOCUMENT_KERNEL} " + "; ".join(parts) + f" (the mask leaves "
            f"{100 * row['causal_fraction']:.1f}% of the causal pairs: full causal does "
            f"{1 / row['causal_fraction']:.1f}x the work)"
        )
    return lines


def timer_line(groups: dict[tuple[str, str], list[dict]]) -> str:
    """The timer, or each timer with the ops it timed when the files merged came from differently set runs."""
    ops_by_timer: dict[str, list[str]] = defaultdict(list)
    for (op, _), members in groups.items():
        for timer in dict.fromkeys(row["timer"] for row in members):
            if op not in ops_by_timer[timer]:
                ops_by_timer[timer].append(op)
    if len(ops_by_timer) == 1:
        return f"- timer: {next(iter(ops_by_timer))}"
    return "- timer: " + "; ".join(f"{timer} ({', '.join(ops)})" for timer, ops in ops_by_timer.items())


def markdown_report(groups: dict[tuple[str, str], list[dict]], skips: list[dict]) -> str:
    first = next(iter(groups.values()))[0]
    lines = [
        "# scratchlm kernel benchmarks",
        "",
        f"- device: {first['device_name']}; torch {first['torch_version']}, triton {first['triton_version']}; "
        f"dtype {first['dtype']}",
        f"- measured copy bandwidth (y.copy_(x), bytes read + written): {first['copy_gbps']:.1f} GB/s",
        timer_line(groups),
        "- GB/s: the bytes each op must move (formula in benchmarks/bench_<op>.py) / time; "
        "the same count for every provider",
        "- vs P: P's time / this provider's time, on the same shape (above 1: this provider is faster)",
        "- peak MiB: memory allocated by one call beyond its inputs (torch.cuda.max_memory_allocated); "
        "n/a off CUDA",
    ]
    if any(compute_bound(members) for members in groups.values()):
        lines.insert(
            -2,
            "- TFLOP/s (attention, causal): FLOPs by formula / time; forward 4 B H N^2 D / 2, backward 2.5x "
            "the forward, forward + backward 3.5x (benchmarks/bench_attention.py); shape B x H x N x D",
        )
    if any(document_masked(members) for members in groups.values()):
        lines.insert(
            -2,
            "- effective TFLOP/s (attention within documents): the same formula over the visible (query, key) "
            "pairs only, sum over documents of L (L + 1) / 2, for every provider, full causal attention "
            "(triton_causal) included: its TFLOP/s is lower by the work it spends on masked pairs; "
            "% of causal pairs: those visible out of B N (N + 1) / 2",
        )
    notes = sorted({(row["op"], row["provider"], row["note"]) for members in groups.values() for row in members})
    for op, provider, note in notes:
        if note:
            lines.append(f"- {op} / {provider}: {note}")
    for (op, mode), members in groups.items():
        lines += ["", f"## {OP_TITLES.get(op, op)}, {MODE_TITLES.get(mode, mode)}", "", *markdown_table(members)]
        if document_masked(members):
            lines += ["", *document_targets(members)]
    if skips:
        lines += ["", "## Not run", ""]
        by_reason: dict[str, int] = defaultdict(int)
        for skip in skips:
            by_reason[skip["reason"]] += 1
        lines += [f"- {count} benchmark(s): {reason}" for reason, count in sorted(by_reason.items())]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a printed note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed, so no plot (pip install matplotlib, or the 'bench' extra)")
        return None
    return plt


def plot(groups: dict[tuple[str, str], list[dict]], path: Path) -> bool:
    """GB/s per shape, one panel per memory-bound op and mode; False without matplotlib or such ops."""
    groups = {key: members for key, members in groups.items() if not compute_bound(members)}
    if not groups:
        return False
    plt = pyplot()
    if plt is None:
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


def plot_attention(groups: dict[tuple[str, str], list[dict]], path: Path) -> bool:
    """TFLOP/s against N, a panel per head_dim (rows) and mode (columns), a line per provider.

    Document-masked rows are left out: they are all at one N, and their own table tells them.
    """
    rows = [
        row
        for members in groups.values()
        if compute_bound(members) and not document_masked(members)
        for row in members
    ]
    if not rows:
        return False
    plt = pyplot()
    if plt is None:
        return False
    head_dims = sorted({row["head_dim"] for row in rows})
    modes = sorted({row["mode"] for row in rows}, key=mode_rank)
    figure, axes = plt.subplots(
        len(head_dims), len(modes), figsize=(5.5 * len(modes), 3.8 * len(head_dims)), squeeze=False
    )
    for i, head_dim in enumerate(head_dims):
        for j, mode in enumerate(modes):
            axis = axes[i][j]
            mine = [row for row in rows if row["head_dim"] == head_dim and row["mode"] == mode]
            for provider in sorted({row["provider"] for row in mine}, key=provider_rank):
                points = sorted((row["seq_len"], row["tflops"]) for row in mine if row["provider"] == provider)
                axis.plot(*zip(*points), marker="o", label=provider)
            lengths = sorted({row["seq_len"] for row in mine})
            axis.set_xscale("log", base=2)
            axis.set_xticks(lengths, [str(n) for n in lengths], fontsize=8)
            axis.minorticks_off()
            axis.set_title(f"attention, {MODE_TITLES.get(mode, mode)}, head_dim {head_dim}")
            axis.set_xlabel("sequence length N (batch x N fixed)")
            axis.set_ylabel("TFLOP/s")
            axis.set_ylim(bottom=0)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle(f"causal attention on {rows[0]['device_name']} ({rows[0]['dtype']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json",
        type=Path,
        nargs="+",
        default=[RESULTS / "kernels.json"],
        help="the pytest-benchmark --benchmark-json file(s) to read, as one run",
    )
    parser.add_argument(
        "--skips",
        type=Path,
        nargs="+",
        default=[RESULTS / "skipped.json"],
        help="skipped benchmarks and reasons, one file per pytest run (missing files are ignored)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=RESULTS, help="where kernels.md, kernels_summary.json and kernels.png go"
    )
    args = parser.parse_args(argv)

    rows = load_rows(args.json)
    if not rows:
        print(f"report: {', '.join(map(str, args.json))} hold no kernel benchmark results; nothing to write")
        return 1
    add_speedups(rows)
    groups = group(rows)
    skips = load_skips(args.skips)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "kernels_summary.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    markdown = markdown_report(groups, skips)
    (args.out_dir / "kernels.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    written = ["kernels.md", "kernels_summary.json"]
    if plot(groups, args.out_dir / "kernels.png"):
        written.append("kernels.png")
    if plot_attention(groups, args.out_dir / "attention.png"):
        written.append("attention.png")
    print(f"report: wrote {', '.join(written)} in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
