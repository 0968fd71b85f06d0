"""The reproduction report: one Markdown file from the stages' results.json, the papers' numbers beside ours.

Used by experiments/reproduce.py; `python experiments/report.py WORKDIR` rebuilds a report from finished stages.
Each section reads its stage's results.json and is skipped (with a line saying so) when the stage has not run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time

PAPER_CAPACITY = {  # He et al. 2025, MoE-layer speedup under EP at gamma 2.0 / 1.5 / 1.0 (papers.md A)
    "OLMoE, 64 experts on 8 GPUs": {"token drop": (1.21, 1.30, 1.46), "expanded drop": (1.16, 1.25, 1.36)},
    "Mixtral-8x7B, one expert per GPU": {"token drop": (1.44, 1.89, 2.55), "expanded drop": (1.43, 1.86, 2.51)},
}


def _load(workdir: str, stage: str) -> dict | None:
    path = os.path.join(workdir, stage, "results.json")
    return json.load(open(path)) if os.path.exists(path) else None


def _plot(workdir: str, stage: str, lines: list[str], caption: str) -> None:
    """Copy the stage's plot beside the report and link it."""
    source = os.path.join(workdir, stage, "plot.png")
    if os.path.exists(source):
        shutil.copyfile(source, os.path.join(workdir, f"{stage}.png"))
        lines.append(f"\n![{caption}]({stage}.png)\n")


def _machine() -> str:
    import jax
    import flax
    import numpy as np

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    device = jax.devices()[0]
    return (f"{platform.platform()}; {os.cpu_count()} CPUs ({cpu}); JAX backend {jax.default_backend()} "
            f"({device.device_kind}); Python {platform.python_version()}, jax {jax.__version__}, "
            f"flax {flax.__version__}, numpy {np.__version__}")


def straggler_section(r: dict) -> list[str]:
    pre, dec = r["prefill_routing"], r["decode_routing"]
    lines = ["## Straggler effect (He et al., papers.md A)", "",
             f"Model quality first: validation perplexity {r['validation']['perplexity']:.2f} "
             f"(unigram {r['validation']['unigram_perplexity']:.1f}); multiple choice "
             + ", ".join(f"{name} acc {t['acc']:.3f} (chance {t['chance']:.3f})"
                         for name, t in r["multiple_choice"].items()) + ".", "",
             "Busiest expert's load over the mean load (N_e / N_bar) per MoE layer; the paper saw over 7x.", "",
             "| layer | whole split | worst prefill batch | worst decode step | experts idle per decode step |",
             "|---|---|---|---|---|"]
    for i, layer in enumerate(pre["layers"]):
        lines.append(f"| {layer} | {pre['max_over_mean'][i]:.2f} | {pre['batch_max_over_mean'][i]:.2f} | "
                     f"{dec['step_max_over_mean'][i]:.2f} | {dec['idle_fraction'][i]:.1%} |")
    lines.append(f"\nPrefill batches of {pre['batch_size']} sequences; decode: {dec['batch_size']} prompts, "
                 f"{dec['steps']} greedy steps.")
    return lines


def capacity_section(r: dict, workdir: str) -> list[str]:
    cells = r["cells"]
    factors = sorted({c["factor"] for c in cells if c["factor"] != "none"}, key=float)
    strategies = [s for s in dict.fromkeys(c["strategy"] for c in cells) if s != "dropless"]
    dropless = next((c for c in cells if c["factor"] == "none"), None)
    cell = {(c["factor"], c["strategy"]): c for c in cells}
    lines = ["## Capacity-aware token drop and expanded drop (He et al., papers.md A)", ""]
    if dropless:
        acc = f", multiple-choice acc {dropless['mc_accuracy']:.3f}" if "mc_accuracy" in dropless else ""
        lines.append(f"Dropless: perplexity {dropless['perplexity']:.2f}{acc}. Cells: perplexity / multiple-choice "
                     "acc / measured MoE-layer speedup (busiest device's expert work against dropless) / drop rate.")
    lines += ["", "| strategy | " + " | ".join(f"gamma={f}" for f in factors) + " |",
              "|---|" + "---|" * len(factors)]
    for s in strategies:
        row = []
        for f in factors:
            c = cell.get((f, s))
            if c is None:
                row.append("-")
                continue
            acc = f" / {c['mc_accuracy']:.3f}" if "mc_accuracy" in c else ""
            row.append(f"{c['perplexity']:.2f}{acc} / {c['measured_speedup']:.2f}x / {c['drop_rate']:.1%}")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    comparable = [f for f in ("2.0", "1.5", "1.0") if f in factors]
    if comparable:
        lines += ["", "Speedup beside the paper's (modelled: a layer waits for its busiest device; measured as above):",
                  "", "| | " + " | ".join(f"gamma={f}" for f in comparable) + " |", "|---|" + "---|" * len(comparable)]
        index = {"2.0": 0, "1.5": 1, "1.0": 2}
        for label, strategy in (("moejax token drop (score)", "score"), ("moejax expanded drop (local)", "expanded_local")):
            for kind in ("modelled", "measured"):
                values = [cell.get((f, strategy), {}).get(f"{kind}_speedup") for f in comparable]
                lines.append(f"| {label}, {kind} | " + " | ".join("-" if v is None else f"{v:.2f}x" for v in values) + " |")
        for model, rows in PAPER_CAPACITY.items():
            for kind, values in rows.items():
                lines.append(f"| paper: {model}, {kind} | "
                             + " | ".join(f"{values[index[f]]:.2f}x" for f in comparable) + " |")
    _plot(workdir, "capacity", lines, "quality against measured speedup per strategy")
    return lines


def gating_section(r: dict, workdir: str) -> list[str]:
    lines = ["## Static versus dynamic gating (Huang et al., papers.md B)", "",
             "One MoE layer on the expert-parallel mesh: tokens/s and temporary memory per device. Paper (52B LM, "
             "one node): up to 6.21x throughput (LM), 5.75x (MT encoder), 2.58x (MT decoder); activation memory "
             "at batch 8 LM 6.29 -> 1.28 GB.", "",
             "| layer | tokens | static tok/s | dynamic tok/s | dynamic / static | memory dynamic / static | static waste |",
             "|---|---|---|---|---|---|---|"]
    for c in r["cells"]:
        lines.append(f"| {c['layer']} | {c['tokens']} | {c['static']['tokens_per_second']:.0f} | "
                     f"{c['dynamic']['tokens_per_second']:.0f} | {c['dynamic_over_static_throughput']:.2f}x | "
                     f"{c['dynamic_over_static_memory']:.2f} | {c['static']['waste_factor']:.1f}x |")
    _plot(workdir, "gating", lines, "static vs dynamic gating throughput")
    return lines


def buffering_section(r: dict, workdir: str) -> list[str]:
    sweep = [c for c in r["sweep"].values() if not c["prefetch"]]
    sizes = sorted({c["cache_size"] for c in sweep})
    policies = list(dict.fromkeys(c["policy"] for c in sweep))
    cell = {(c["policy"], c["cache_size"]): c for c in sweep}
    active = r.get("active_experts_per_decode_step")
    lines = ["## Expert buffering (Huang et al., papers.md B)", "",
             f"Decode miss rate per cache size (expert slots per layer, of {r['num_experts']}); host memory: "
             f"{r['host_memory']}. Paper: LIFO close to Belady's MIN with anti-correlated placement; ~75% of "
             "experts idle per MT-decoder batch; a 10-expert cache saved 2.25 GB at comparable throughput.", ""]
    if isinstance(active, dict) and "mean" in active:
        lines.append(f"Active experts per decode step and layer: mean {active['mean']:.1f}, max {active['max']}.\n")
    lines += ["| policy | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for p in policies:
        lines.append(f"| {p} | " + " | ".join(f"{cell[(p, s)]['miss_rate']:.3f}" if (p, s) in cell else "-"
                                              for s in sizes) + " |")
    measured = r.get("measured", {})
    if measured:
        lines += ["", "Measured decode latency with real copies (x: over the buffered loop with every expert "
                  "resident; target at half the experts <= 1.5x):", "",
                  "| cell | ms / step | x | device MiB held by experts | same tokens as all-resident |",
                  "|---|---|---|---|---|"]
        for name, m in measured.items():
            ratio = f"{m['over_buffered_resident']:.2f}" if "over_buffered_resident" in m else "-"
            lines.append(f"| {name} | {m['seconds_per_step'] * 1e3:.2f} | {ratio} | "
                         f"{m['expert_device_bytes'] / 2**20:.2f} | {m.get('same_tokens_as_resident', '-')} |")
    _plot(workdir, "buffering", lines, "miss rate against cache size per policy")
    return lines


def placement_section(r: dict, workdir: str) -> list[str]:
    lines = ["## Expert placement (Huang et al., papers.md B)", "",
             "Held-out batches (fit on the first half of the trace, test on the second). Paper (LM): Max Load and "
             "Avg Max Load from > 0.6 to < 0.4 with greedy / anti-correlation; throughput +10.1%.", "",
             "| method | devices | Max Load | Avg Max Load | Avg Max Load (fit half) | tokens/s |",
             "|---|---|---|---|---|---|"]
    for c in r["cells"]:
        throughput = c.get("throughput") or {}
        tps = f"{throughput['tokens_per_second']:.0f}" if "tokens_per_second" in throughput else "-"
        lines.append(f"| {c['method']} | {c['devices']} | {c['max_load']:.3f} | {c['avg_max_load']:.3f} | "
                     f"{c['fit_avg_max_load']:.3f} | {tps} |")
    bench = r.get("search_benchmark")
    if bench and "search" in bench:
        baselines = ", ".join(f"{k} {v:.4f}" for k, v in bench["held_out_avg_max_load"].items())
        lines += ["", f"Search benchmark ({bench['experts']} experts on {bench['devices']} devices, {bench['batches']} "
                  f"synthetic skewed batches; target < {bench['target_seconds']:g} s after compilation): "
                  + "; ".join(f"restarts={run['restarts']}: {run['seconds']:.2f} s, held-out Avg Max Load "
                              f"{run['held_out_avg_max_load']:.4f}" for run in bench["search"])
                  + f" ({baselines})."]
    _plot(workdir, "placement", lines, "Avg Max Load per method and device count")
    return lines


SECTIONS = {"straggler": lambda r, w: straggler_section(r), "capacity": capacity_section, "gating": gating_section,
            "buffering": buffering_section, "placement": placement_section}


def write_report(workdir: str, config=None, quick: bool | None = None, command: str = "") -> str:
    lines = ["# moejax reproduction report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')}"
             + (f" by `{command}`" if command else "")
             + (f"; model preset {config.model!r}, checkpoint `{config.checkpoint}`" if config is not None else "")
             + ("; quick settings" if quick else "") + ".", "", f"Machine: {_machine()}.", "",
             "| stage | minutes | command |", "|---|---|---|"]
    for stage in SECTIONS:
        marker = os.path.join(workdir, stage, "stage.json")
        if os.path.exists(marker):
            record = json.load(open(marker))
            lines.append(f"| {stage} | {record['seconds'] / 60:.1f} | `{record['command']}` |")
    for stage, section in SECTIONS.items():
        results = _load(workdir, stage)
        lines.append("")
        if results is None:
            lines.append(f"## {stage}: not run")
            continue
        try:
            lines += section(results, workdir)
        except KeyError as e:  # results written by an older version of the stage's script
            lines.append(f"## {stage}: results.json lacks {e}; rerun the stage with --force")
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/report.py WORKDIR")
    print(write_report(sys.argv[1]))
