"""Figures from run folders: memory and step time vs batch (train-memory); power over time (decode-power)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mmprof.errors import UserError  # noqa: E402
from mmprof.results.store import Run  # noqa: E402
from mmprof.results.summaries import impl_label, job_rows  # noqa: E402
from mmprof.results.validate import read_series  # noqa: E402

PHASE_COLOURS = {"prefill": "tab:orange", "decode": "tab:green", "idle": "tab:gray"}


def plot_train_memory(run: Run, out: Path) -> Path:
    jobs = job_rows(run.df)
    df = jobs[jobs["status"] == "ok"].copy()
    if df.empty:
        raise UserError(f"run {run.path} has no ok rows to plot")
    df["impl"] = [impl_label(r) for _, r in df.iterrows()]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, g in df.groupby("impl"):
        g = g.sort_values("batch")
        ax_mem.plot(g["batch"], g["peak_alloc_gib"], marker="o", label=f"{impl} peak")
        if "act_mem_gib" in g and g["act_mem_gib"].notna().any():
            ax_mem.plot(g["batch"], g["act_mem_gib"], marker="x", linestyle="--", label=f"{impl} activations")
        if "step_time_s" in g and g["step_time_s"].notna().any():
            ax_time.plot(g["batch"], g["step_time_s"], marker="o", label=impl)
    oom = jobs[jobs["status"] == "oom"]
    for _, r in oom.iterrows():
        ax_mem.axvline(r["batch"], color="red", alpha=0.25)
        ax_mem.text(r["batch"], ax_mem.get_ylim()[1] * 0.95, f"OOM {impl_label(r)}", rotation=90, fontsize=7,
                    color="red", va="top")
    size = df["size"].iloc[0] if "size" in df else ""
    seq = df["seq"].iloc[0] if "seq" in df else ""
    gpu = run.meta.get("gpu") or df["device"].iloc[0]
    ax_mem.set(xscale="log", xlabel="batch", ylabel="GiB", title=f"training memory, {size}, seq {seq}, {gpu}")
    ax_time.set(xscale="log", xlabel="batch", ylabel="s / step", title="step time")
    for ax in (ax_mem, ax_time):
        ax.set_xticks(sorted(df["batch"].unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured (estimate)", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out)


def plot_power(run: Run, out: Path) -> Path:
    traces = sorted(run.path.glob("power_trace*.csv"))
    if not traces:
        raise UserError(f"run {run.path} has no power_trace.csv to plot")
    trace = pd.concat([read_series(t) for t in traces], ignore_index=True)
    if trace.empty or trace["power_w"].isna().all():
        raise UserError(f"run {run.path} has no power samples (no NVML during the run)")
    fig, ax = plt.subplots(figsize=(11, 4))
    for gpu, g in trace.groupby("gpu"):
        ax.plot(g["t_s"], g["power_w"], linewidth=0.8, label=f"GPU {gpu}")
    phase_files = sorted(run.path.glob("phases*.csv"))
    if phase_files:
        phases = pd.concat([read_series(f) for f in phase_files], ignore_index=True)
        seen = set()
        for _, p in phases.iterrows():
            kind = str(p["label"]).split()[0]
            if kind not in PHASE_COLOURS:
                continue
            colour = PHASE_COLOURS[kind]
            ax.axvspan(p["t_start_s"], p["t_end_s"], color=colour, alpha=0.15,
                       label=kind if kind not in seen else None)
            seen.add(kind)
    ax.set(xlabel="time since start, s", ylabel="W", title=f"GPU power, {run.run_id} ({run.meta.get('gpu', '')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def plot_decode_vs_size(run: Run, out: Path) -> Path:
    """Per-token latency and peak memory against model size, one line per model (decode-power rows)."""
    jobs = job_rows(run.df)
    df = jobs[jobs["status"] == "ok"]
    if df.empty:
        raise UserError(f"run {run.path} has no ok rows to plot")
    sizes = list(dict.fromkeys(df.sort_values("weights_gib")["size"].astype(str))) if "weights_gib" in df \
        else list(dict.fromkeys(df["size"].astype(str)))
    fig, (ax_lat, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (arch, weights), g in df.groupby(["arch", "weights"]):
        g = g.assign(pos=[sizes.index(str(s)) for s in g["size"]]).sort_values("pos")
        ax_lat.plot(g["pos"], g["latency_p50_ms"], marker="o", label=f"{arch} ({weights})")
        ax_mem.plot(g["pos"], g["peak_alloc_gib"], marker="o", label=f"{arch} ({weights})")
    gpu = run.meta.get("gpu") or df["device"].iloc[0]
    ax_lat.set(ylabel="ms / token (median)", title=f"decode latency, batch {int(df['batch'].iloc[0])}, {gpu}")
    ax_mem.set(ylabel="GiB peak allocated", title="decode memory")
    for ax in (ax_lat, ax_mem):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("model size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def plot_decode_window(run: Run, out: Path, prefer: str = "") -> Path:
    """Power over time of one decode window: the first whose label holds `prefer`, else the first.

    Each power_trace*.csv has its own clock and its phases*.csv beside it: a window is read from its pair."""
    pairs = []
    for t in sorted(run.path.glob("power_trace*.csv")):
        phases = t.with_name(t.name.replace("power_trace", "phases"))
        if phases.exists():
            ph = pd.read_csv(phases)
            ph = ph[ph["label"].astype(str).str.startswith("decode")]
            pairs += [(t, p) for _, p in ph.iterrows()]
    if not pairs:
        raise UserError(f"run {run.path} has no power trace with a decode window to plot")
    chosen = [pp for pp in pairs if prefer in str(pp[1]["label"])] or pairs
    path, p = chosen[0]
    trace = pd.read_csv(path)
    pad = 0.25 * (p["t_end_s"] - p["t_start_s"]) + 0.2
    near = trace[(trace["t_s"] >= p["t_start_s"] - pad) & (trace["t_s"] <= p["t_end_s"] + pad)]
    if near.empty or near["power_w"].isna().all():
        raise UserError(f"run {run.path} has no power samples in the decode window {p['label']!r}")
    fig, ax = plt.subplots(figsize=(11, 3.8))
    for gpu, g in near.groupby("gpu"):
        ax.plot(g["t_s"], g["power_w"], linewidth=0.9, marker=".", markersize=2, label=f"GPU {gpu}")
    ax.axvspan(p["t_start_s"], p["t_end_s"], color=PHASE_COLOURS["decode"], alpha=0.15, label=str(p["label"]))
    ax.set(xlabel=f"time since start of {path.name}, s", ylabel="W",
           title=f"GPU power over one decode window ({run.meta.get('gpu', '')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out = Path(out)
    try:
        fig.tight_layout()
        fig.savefig(out, dpi=130)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out


def tile_figures(paths: list[Path], out: Path, title: str = "") -> Path:
    """Figures already drawn, stacked into one PNG (a report's summary picture for a README)."""
    if not paths:
        raise UserError("no figures to put in the summary")
    images = [plt.imread(p) for p in paths]
    width = max(im.shape[1] for im in images)
    heights = [im.shape[0] * width / im.shape[1] for im in images]
    fig, axes = plt.subplots(len(images), 1, figsize=(width / 130, sum(heights) / 130 + 0.5),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, im in zip(axes[:, 0], images):
        ax.imshow(im)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def plot_run(run: Run, out: Path) -> Path:
    if run.command == "train-memory":
        return plot_train_memory(run, out)
    if run.command == "decode-power":
        return plot_power(run, out)
    raise UserError(f"no plot for runs of {run.command!r}; plot takes train-memory and decode-power runs")
