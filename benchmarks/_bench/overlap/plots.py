"""The bar chart (step time and param sync per variant) and the timeline of one
zerocomm step, drawn from the report (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cli import REAL_VARIANTS, SIM_VARIANTS

# A span as the runners store it for plotting: (lane, label, start_s, end_s).
SpanRow = tuple[str, str, float, float]

LABELS = {
    "zero_torch": "(a) torch ZeRO\n(blocking)",
    "seed_bcast": "(b) seed: async bcast\n+ Work.wait hooks",
    "zc_broadcast": "(c) zerocomm\nbroadcast",
    "zc_allgather": "(d) zerocomm\nallgather",
    "ddp": "(e) DDP\n(no param sync)",
    "sim_blocking": "blocking\n(sleep after step)",
    "sim_zc_broadcast": "zerocomm\nbroadcast",
    "sim_zc_allgather": "zerocomm\nallgather",
}


def plot_bars(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        (
            "real transport ("
            + ("gloo" if rep["config"]["device"] == "cpu" else "NCCL")
            + f", {rep['config']['world_size']} ranks)",
            REAL_VARIANTS,
        ),
        (
            "simulated transport (sync ~= forward" if rep["simulated"].get("auto") else "simulated transport (",
            SIM_VARIANTS,
        ),
    ]
    groups = [(t, [v for v in vs if v in rep["variants"]]) for t, vs in groups]
    groups = [(t, vs) for t, vs in groups if vs]
    if rep["simulated"]:
        sc = rep["simulated"]
        bws = ", ".join(f"{m} {c['bandwidth_gbps']:.2f} GB/s" for m, c in sc["modes"].items())
        groups = [
            (
                t
                + (
                    f", {bws}, W={sc['modelled_world']}, lat {sc['latency_us']:g} us)"
                    if t.startswith("simulated")
                    else ""
                ),
                vs,
            )
            for t, vs in groups
        ]
    fig, axes = plt.subplots(1, len(groups), figsize=(7.5 * len(groups), 5.6), squeeze=False)
    for ax, (title, vs) in zip(axes[0], groups):
        xs = range(len(vs))
        w = 0.38
        summ = [rep["variants"][v]["summary"] for v in vs]
        med = [s["step_time_s"]["median"] * 1e3 for s in summ]
        lo = [(s["step_time_s"]["median"] - s["step_time_s"]["q25"]) * 1e3 for s in summ]
        hi = [(s["step_time_s"]["q75"] - s["step_time_s"]["median"]) * 1e3 for s in summ]
        exp_ = [s["sync_exposed_per_step_s"] * 1e3 for s in summ]
        hid = [s["sync_hidden_per_step_s"] * 1e3 for s in summ]
        ax.bar(
            [x - w / 2 for x in xs], med, w, yerr=[lo, hi], capsize=3, color="#4c72b0", label="step time (median, IQR)"
        )
        ax.bar([x + w / 2 for x in xs], exp_, w, color="#dd5555", label="param sync: exposed (compute waited)")
        ax.bar([x + w / 2 for x in xs], hid, w, bottom=exp_, color="#7fbf7f", label="param sync: hidden (overlapped)")
        for x, m, e, h in zip(xs, med, exp_, hid):
            ax.text(x - w / 2, m, f"{m:.0f}", ha="center", va="bottom", fontsize=8)
            tot = e + h
            if tot > 0:
                ax.text(x + w / 2, tot, f"{tot:.0f}\n({e / tot:.0%} exp.)", ha="center", va="bottom", fontsize=7)
            else:
                ax.text(x + w / 2, 0, "none", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([LABELS.get(v, v) for v in vs], fontsize=8)
        ax.set_ylabel("ms per step")
        ax.set_title(title, fontsize=9)
        ymax = max(max(med), max(e + h for e, h in zip(exp_, hid)))
        ax.set_ylim(0, ymax * 1.25)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    m = rep["machine"]
    fig.suptitle(
        f"ZeRO-1 param-sync overlap: TinyGPT {rep['config']['n_params'] / 1e6:.1f}M params, "
        f"{m['device_name']}, torch {m['torch_version']}, {m['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pick_step(spans: list[SpanRow]) -> tuple[float, float]:
    """Window of one steady-state step: from the start of one zopt.step() to the end of the next."""
    steps = [s for s in spans if s[0] == "compute" and s[1] == "zopt.step()"]
    if len(steps) >= 3:
        k = len(steps) // 2
        return steps[k - 1][2], steps[k][3]
    return min(s[2] for s in spans), max(s[3] for s in spans)


def _short(label: str) -> str:
    """Bar label: the block name of a bucket label, 'b3' for 'blocks.3'."""
    if label.startswith("grad:"):
        return label
    if label.startswith(("dense:", "expert:")) and "[" in label:
        return label[label.index("[") + 1 :].rstrip("]")
    return label.replace("blocks.", "b")


def _drawn_spans(
    sel: list[SpanRow], t0: float, t1: float, lanes: list[str]
) -> Iterator[tuple[str, str, int, float, float]]:
    """(lane, label, y, x_ms, width_ms) of each span as drawn in the window [t0, t1]."""
    waits = [s for s in sel if s[0] == "wait"]
    for lane, label, a, b in sel:
        y = 2 - lanes.index(lane)
        if lane == "compute" and label not in ("backward", "zopt.step()"):
            # the block span opens before its pre-hook waits: draw the compute after the wait
            a = max([a] + [w[3] for w in waits if a <= w[2] <= b])
        a, b = max(a, t0), min(b, t1)
        if b <= a:
            continue
        yield lane, label, y, (a - t0) * 1e3, (b - a) * 1e3


def plot_timeline(rep: dict[str, Any], timelines: dict[str, list[SpanRow]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(timelines)[:2]
    fig, axes = plt.subplots(len(keys), 1, figsize=(17, 3.4 * len(keys)), squeeze=False)
    lanes = ["compute", "wait", "comm"]
    colors = {"compute": "#4c72b0", "wait": "#dd5555", "comm": "#55a868", "grad": "#c4ad66", "step": "#8172b2"}
    for ax, key in zip(axes[:, 0], keys):
        spans = timelines[key]
        t0, t1 = _pick_step(spans)
        sel = [s for s in spans if s[3] > t0 and s[2] < t1 and s[0] in lanes]
        drawn = list(_drawn_spans(sel, t0, t1, lanes))
        for lane, label, y, x, wd in drawn:
            c = (
                colors["grad"]
                if label.startswith("grad")
                else colors["step"]
                if label in ("backward", "zopt.step()")
                else colors[lane]
            )
            ax.broken_barh([(x, max(wd, 0.05))], (y - 0.38, 0.76), facecolors=c, edgecolors="black", linewidth=0.4)
        # labels after bars, staggered where bars are narrow
        span_ms = (t1 - t0) * 1e3
        for lane, label, y, x, wd in drawn:
            txt = _short(label)
            if lane == "wait":
                if wd < span_ms * 0.004:
                    continue
                txt = f"{txt} {wd:.1f}ms"
            fs = 7
            if wd > span_ms * 0.012 * len(txt) / 4:
                ax.text(
                    x + wd / 2,
                    y,
                    txt,
                    ha="center",
                    va="center",
                    fontsize=fs,
                    color="white" if lane != "wait" else "black",
                )
            else:
                ax.text(x + wd / 2, y + 0.42, txt, ha="left", va="bottom", fontsize=6, rotation=35)
        if ax is axes[0, 0]:
            from matplotlib.patches import Patch

            ax.legend(
                handles=[
                    Patch(color=colors["compute"], label="block forward"),
                    Patch(color=colors["step"], label="backward / zopt.step()"),
                    Patch(color=colors["wait"], label="forward waits for params (exposed)"),
                    Patch(color=colors["comm"], label="param sync bucket"),
                    Patch(color=colors["grad"], label="grad reduction / step waits for it"),
                ],
                fontsize=7,
                loc="upper right",
                ncol=5,
            )
        ax.set_yticks([2, 1, 0])
        ax.set_yticklabels(
            ["compute\n(block fwd, bwd, step)", "wait\n(fwd waits for params)", "comm\n(param / grad buckets)"],
            fontsize=8,
        )
        ax.set_ylim(-0.6, 3.1)
        ax.set_xlim(0, span_ms)
        ax.set_xlabel("time (ms) from the start of step k's zopt.step()")
        s = rep["variants"].get(key, {}).get("summary", {})
        extra = ""
        if s:
            extra = (
                f": param sync {s['sync_total_per_step_s'] * 1e3:.1f} ms/step, exposed "
                f"{s['sync_exposed_per_step_s'] * 1e3:.1f} ms ({s['exposed_fraction']:.0%}), rank 0"
            )
        ax.set_title(f"{key}{extra}: one step (zopt.step() k -> forward, backward, zopt.step() k+1)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
