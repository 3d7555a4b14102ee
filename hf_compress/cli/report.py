"""The report files of a run: ``report.json``, ``report.md`` and ``report.png`` from `compression_report` rows.

Part of the command (app layer); the measuring itself is `hf_compress.report.compression_report`.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..metrics import primary_metric


# ----------------------------------------------------------------------------- rendering


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _count(n) -> str:
    """1234 -> '1.23K', 22713216 -> '22.7M'."""
    if n is None:
        return "–"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def markdown_table(rows: list[dict]) -> str:
    """The report as a markdown table (one row per model) plus each model's compression settings."""
    metric_names = []
    for row in rows:
        metric_names += [m for m in row.get("metrics", {}) if m not in metric_names]
    batch_keys = []
    for row in rows:
        batch_keys += [b for b in row.get("latency_ms", {}) if b not in batch_keys]
    head = ["model", *metric_names, "retention", "params", "non-zero", "disk MB", "size ×", "blocks MB", "blocks ×"]
    head += [f"latency {b} ms" for b in batch_keys] + [f"speed-up {b}" for b in batch_keys]
    head += ["FLOPs/token (non-zero)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"]] + [_fmt(r["metrics"].get(m)) for m in metric_names]
        cells += [
            _fmt(r.get("retention")),
            _count(r.get("params")),
            _count(r.get("nonzero_params")),
            _fmt(r.get("disk_mb"), 3),
            _fmt(r.get("size_ratio"), 3),
            _fmt((r.get("disk_mb_by_part") or {}).get("blocks"), 3),
            _fmt(r.get("blocks_size_ratio"), 3),
        ]
        cells += [_fmt(r.get("latency_ms", {}).get(b), 3) for b in batch_keys]
        cells += [_fmt(r.get("speedup", {}).get(b), 3) for b in batch_keys]
        f, fnz = r.get("flops_per_token"), r.get("flops_per_token_nonzero")
        cells.append("–" if f is None else f"{_count(f)} ({_count(fnz)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _settings_md(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r.get("settings"):
            out.append(f"- **{r['name']}**: `{json.dumps(r['settings'], sort_keys=True, default=str)}`")
    return "\n".join(out)


def _clean(obj):
    """JSON-safe copy: NaN/inf become null, tuples lists, unknown objects strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (int, str, bool)):
        return obj
    return str(obj)


def write_report(out_dir: str | Path, rows: list[dict], *, title: str = "Compression report", meta: dict | None = None, plot: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (with `plot`) ``report.png`` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "title": title,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **(meta or {}),
        "rows": rows,
    }
    path = out / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=1))
    tmp.replace(path)
    return render_report(out, plot=plot)


def load_report(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass the output folder of a finished `hf-compress run`.")
    return json.loads(path.read_text())


def render_report(out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """(Re)write ``report.md`` and ``report.png`` from ``report.json`` in `out_dir`."""
    out = Path(out_dir)
    payload = load_report(out)
    rows = payload["rows"]
    task = rows[0].get("task", "sequence-classification") if rows else "sequence-classification"
    key, higher = primary_metric(task)
    md = [f"# {payload.get('title', 'Compression report')}", ""]
    md.append(
        f"Measured {payload.get('created', '?')} with torch {payload.get('torch', '?')} "
        f"({payload.get('threads', '?')} threads). Ratios are against the first row; retention is "
        + ("metric / baseline." if higher else "baseline perplexity / perplexity.")
    )
    seq = next((r.get("latency_seq_len") for r in rows if r.get("latency_seq_len")), None)
    if seq:
        where = rows[0].get("latency_device", rows[0].get("device", "cpu"))
        md.append(f"Latency: median forward time of random inputs of {seq} tokens on {where}, after warm-up.")
    md.append("FLOPs/token: 2 × matmul weights (dense), in brackets 2 × their non-zeros (what sparse kernels could reach).")
    md += ["", markdown_table(rows), ""]
    settings = _settings_md(rows)
    if settings:
        md += ["## Compression settings", "", settings, ""]
    for extra in ("command", "recipe", "notes"):
        if payload.get(extra):
            md += [f"**{extra}**: `{payload[extra]}`" if isinstance(payload[extra], str) else f"**{extra}**: `{json.dumps(payload[extra])}`", ""]
    paths = {"json": out / "report.json", "md": out / "report.md"}
    paths["md"].write_text("\n".join(md))
    if plot and rows:
        paths["png"] = plot_report(rows, out / "report.png", title=payload.get("title"))
    return paths


def plot_report(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Metric vs on-disk size and metric vs latency, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = rows[0].get("task", "sequence-classification")
    key, higher = primary_metric(task)
    lat_key = next((b for b in ("b1", "b32") if any(b in r.get("latency_ms", {}) for r in rows)), None)
    panels = [("disk_mb", "on-disk size (MB)")]
    if lat_key:
        dev = rows[0].get("latency_device") or "cpu"
        where = "CPU" if dev == "cpu" else dev
        panels.append((lat_key, f"{where} latency, batch {lat_key[1:]} (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (xkey, xlabel) in zip(axes[0], panels):
        for r in rows:
            x = r.get("latency_ms", {}).get(xkey) if xkey != "disk_mb" else r.get("disk_mb")
            y = r.get("metrics", {}).get(key)
            if x is None or y is None:
                continue
            ax.scatter([x], [y], s=60)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{key} ({'higher' if higher else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.margins(0.25)
    fig.suptitle(title or "Compression report")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
