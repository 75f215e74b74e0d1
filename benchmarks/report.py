"""Results as JSON, a Markdown table and a PNG plot (throughput vs batch per backend)."""
from __future__ import annotations

import json
from pathlib import Path

from .auto_check import AutoCheck
from .auto_check import markdown as auto_markdown
from .prompt_mix import mix_label

__all__ = ["write_report", "markdown"]


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _mixes(results: dict) -> list:
    """The run's prompt mixes (a list since ``--images-per-prompt``; one int in older results files)."""
    value = results.get("images_per_prompt", 10)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _rows_of(rows: list[dict], mix, default) -> list[dict]:
    return [r for r in rows if r.get("images_per_prompt", default) == mix]


def _backend(r: dict) -> str:
    """The auto row is named with what it picked."""
    return f"{r['backend']} → {r['picked']}" if r.get("picked") and r["backend"] == "auto" else r["backend"]


def _engine_tables(rows: list[dict], mixes: list) -> list[str]:
    lines: list[str] = []
    for mix in mixes:
        group = _rows_of(rows, mix, mixes[0])
        if not group:
            continue
        lines += ["", f"## Engine only, {mix_label(mix)}", "",
                  "| backend | batch | p50 ms | p99 ms | img/s | × reference | GFLOP/img | % of measured peak | peak mem MiB | note |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in group:
            lines.append(f"| {_backend(r)} | {r['batch']} | {_fmt(r.get('p50_ms'), '.1f')} | {_fmt(r.get('p99_ms'), '.1f')} | "
                         f"{_fmt(r.get('images_per_s'), '.2f')} | {_fmt(r.get('speedup'), '.2f')} | "
                         f"{_fmt(r.get('gflop_per_image'), '.1f')} | {_fmt(r.get('peak_fraction_pct'), '.1f')} | "
                         f"{_fmt(r.get('peak_memory_mib'), '.0f')} | {r.get('note', '')} |")
    return lines


def _end_to_end_tables(rows: list[dict], mixes: list) -> list[str]:
    lines: list[str] = []
    for mix in mixes:
        group = _rows_of(rows, mix, mixes[0])
        if not group:
            continue
        lines += ["", f"## End to end (JPEG files on disk -> scores), {mix_label(mix)}", "",
                  "| run | batch | images | img/s | vs engine-only | prompt cache hits/misses |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for e in group:
            name = e["name"].replace("auto,", f"auto → {e['picked']},", 1) if e.get("backend") == "auto" else e["name"]
            lines.append(f"| {name} | {e['batch']} | {e['images']} | {e['images_per_s']:.2f} | "
                         f"{_fmt(e.get('fraction_of_engine'), '.0%')} | {e['cache_hits']}/{e['cache_misses']} |")
    return lines


def markdown(results: dict) -> str:
    info, rows, mixes = results["machine"], results.get("runs", []), _mixes(results)
    gpu = info["gpu"].get("name", "none") if info["gpu"] else "none"
    cpu = ", ".join(filter(None, [info.get("cpu_signature"), f"{info['cores']} cores"]))
    lines = [f"# ipiqa benchmark: {results['slug']}", "",
             f"CPU: {info['cpu']} ({cpu}) · GPU: {gpu} · resolution {results['resolution']} px · "
             f"prompts: {', '.join(map(str, mixes))} images per prompt · {results['timestamp']}"]
    if results.get("prompt_source"):
        lines += ["", f"Prompt text: {results['prompt_source']}."]
    lines += _engine_tables(rows, mixes)
    if results.get("auto_check"):
        checks = [AutoCheck(**c) for c in results["auto_check"]]
        lines += ["", "## `auto` against the fastest gated row (engine only, best batch against best batch)", "",
                  auto_markdown(checks, results.get("auto_reason", ""))]
    lines += _end_to_end_tables(results.get("end_to_end") or [], mixes)
    if results.get("flops"):
        lines += ["", "## FLOPs per image (counted from the ONNX graphs: Conv, MatMul, Gemm)", "",
                  "| graph | single-query pools | straightforward pools |", "| --- | ---: | ---: |"]
        for name, v in results["flops"].items():
            lines.append(f"| {name} | {v['single_query'] / 1e9:.2f} G | {_fmt(v.get('straightforward') and v['straightforward'] / 1e9, '.2f')} G |")
    if results.get("peak_gflops"):
        lines += ["", f"Measured matmul peak (the % column's reference): {results['peak_gflops']:.0f} GFLOP/s "
                  f"({results['peak_note']}). GFLOP/img counts what each backend computes per image, the text encoder "
                  f"amortized over each table's images per prompt where a prompt cache is used.",
                  "Peak memory: on GPU, torch's peak allocation per backend (torch backends only); on CPU, the process's "
                  "maximum resident set so far (cumulative over the run, so it only grows down the table)."]
    fast = results.get("fast_path_scores")
    if fast:
        lines += ["", "## Fast decode path (`--fast-decode`) against the exact path, same model", "",
                  f"{fast['images']} JPEGs of {fast['source']}x{fast['source']}: max |d score| "
                  f"{fast['max_abs_score_diff']:.2e}, Spearman (worst column) {fast['spearman_min']:.4f} over a score "
                  f"spread of {fast['score_spread']:.2e}. {fast['note']}."]
    if results.get("host"):
        host = results["host"]
        lines += ["", host["markdown"].replace("## ", "## ", 1).rstrip(), "",
                  "Host cores needed to feed the engine (uint8 exact path, per-core rate above):", "",
                  "| engine rate | img/s | source | img/s per core | cores needed |", "| --- | ---: | --- | ---: | ---: |"]
        for c in host["cores_needed"]:
            lines.append(f"| {c['engine']} | {_fmt(c['engine_images_per_s'], '.0f')} | {c['source']}x{c['source']} | "
                         f"{_fmt(c['per_core'], '.0f')} | {_fmt(c['cores_needed'], '.1f')} |")
    if results.get("jobs"):
        lines += ["", "## Jobs of any size (rows with missing files: the runtime's own cost per row, no model work)", "",
                  results["jobs"]["markdown"], "",
                  "Peak RSS is per job, in a fresh process; flat memory and a resume time ratio close to the rows "
                  "ratio mean constant memory and linear time."]
        if results["jobs"].get("api_markdown"):
            lines += ["", f"### Python API: `Scorer.score(list)` on real images ({results['jobs']['api_resolution']} px, "
                      "reduced-width model, batch 8, one fresh process per length)", "",
                      results["jobs"]["api_markdown"], "",
                      "A peak RSS ratio near 1.0 while the list grows: the list runs in batches, memory does not grow "
                      "with its length; time grows linearly."]
    if results.get("export"):
        lines += ["", f"## INT8 export: peak RSS against calibration images ({results['export']['resolution']} px, "
                  "one fresh process per run)", "", results["export"]["markdown"]]
    if results.get("shards"):
        lines += ["", "## Datasets as stored: shards and Parquet against loose files", "", results["shards"]["markdown"]]
    if results.get("serve"):
        lines += ["", "## `ipiqa serve` under load against local scoring", "", results["serve"]["markdown"]]
    if results.get("overhead"):
        lines += ["", "## Runtime overhead at batch 1: the image graph alone against `Scorer.score_arrays` (paired "
                      "timings)", "", results["overhead"]["markdown"]]
    if results.get("report"):
        lines += ["", "## `ipiqa report` and `ipiqa select` against scores-file rows (one fresh process per command)",
                  "", results["report"]["markdown"]]
    machine = results.get("machine") or {}
    if machine.get("cpu_flags"):
        lines += ["", f"CPU flags the figures depend on: {', '.join(machine['cpu_flags'])}"]
    if machine.get("cpu_flags_injected_by"):
        lines += ["", f"The flags above were set by ${machine['cpu_flags_injected_by']} (the branches ran as that CPU "
                      f"family); the instructions were this CPU's: {', '.join(machine.get('hardware_cpu_flags', []))}"]
    lines += ["", f"Command: `{results.get('command', 'python -m benchmarks')}`"]
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> bool:
    """The throughput plot, where the run has engine rows (a run of other sections only has none)."""
    if not any(r.get("images_per_s") for r in results["runs"]):
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mixes = _mixes(results)
    backends = sorted({r["backend"] for r in results["runs"] if r.get("images_per_s")})
    for b in backends:
        for mix in mixes:
            pts = sorted((r["batch"], r["images_per_s"]) for r in _rows_of(results["runs"], mix, mixes[0])
                         if r["backend"] == b and r.get("images_per_s"))
            if pts:
                label = b if len(mixes) == 1 else f"{b}, {mix}/prompt"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("images / s")
    ax.set_title(f"ipiqa throughput, {results['slug']}, {results['resolution']} px")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    written[1].write_text(markdown(results))
    if _plot(results, out / "throughput.png"):
        written.append(out / "throughput.png")
    return written
