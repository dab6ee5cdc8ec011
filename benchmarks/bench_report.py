"""The text tables of benchmarks/bench.py's report."""
from __future__ import annotations

from typing import Any


def data_table(d: dict[str, Any]) -> str:
    rows = [f"  DataLoader, {k.rsplit('_', 1)[1]} workers: {fmt(v['images_per_sec'])} images/s"
            for k, v in d.items() if k.startswith("loader_workers_")]
    c = d["cache"]
    rows.append(f"  in-memory cache: {fmt(c['images_per_sec'])} images/s, after a one-time decode of "
                f"{c['build_seconds']:.1f} s ({c['bytes'] / 1e6:.0f} MB, {c['decode_workers']} workers)")
    return (f"Batch loading from {d['folder']} ({d['images']} images, {d['format']} at {d['resolution']}x"
            f"{d['resolution']}, batch {d['batch_size']}):\n" + "\n".join(rows))


def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def table(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# dmd2 benchmark, {report['date']}",
        f"# command: {report['command']}",
        f"# machine: {m['platform']}; CPU {m['cpu_model']} ({m['cpu_count']} logical); torch {m['torch']}, "
        f"{m['torch_num_threads']} threads; device {m['device']} = {m['device_name']}",
        f"# settings: batch {s['batch_size']}, archs {', '.join(s['archs'])}, tiny={s['tiny']}, compile={s['compile']}, "
        f"bf16={s['bf16']} (active={s['bf16_active']}), channels_last={s['channels_last']}, "
        f"fused_adamw={s['fused_adamw']}, tf32={s['tf32']}, warm-up {s['warmup']}, "
        f"median of {s['iters']} (Heun-35: {s['heun_iters']})",
        f"# load average at start {report['load_average_start']}, at end {report['load_average_end']}",
        "# images/s (higher is better); 1-step/heun35 = ratio of medians / of back-to-back pairs; "
        "ovh = step time / sum of its bare network passes (r10: averaged at ratio 10)",
        "",
    ]
    head = ["arch", "params", "teacher", "gen-upd", "fake-only", "dmd2 r10", "dmd2 r5", "1-step", "4-step",
            "heun-35", "1-step/heun35", "featnet", "ovh gen", "ovh fake", "ovh r10", "peak MB"]
    rows = []
    for e in report["results"]:
        d, sm, o = e["dmd2"], e["sampling"], e["overhead"]
        peak = max(e["teacher_step"]["peak_mem_mb"], d["generator_update_step"]["peak_mem_mb"],
                   d["fake_score_only_step"]["peak_mem_mb"], sm["peak_mem_mb"])
        rows.append([e["arch"], f"{e['params'] / 1e6:.2f}M", fmt(e["teacher_step"]["images_per_sec"]),
                     fmt(d["generator_update_step"]["images_per_sec"]), fmt(d["fake_score_only_step"]["images_per_sec"]),
                     fmt(d["avg_ratio_10"]["images_per_sec"]), fmt(d["avg_ratio_5"]["images_per_sec"]),
                     fmt(sm["one_step"]["images_per_sec"]), fmt(sm["four_step"]["images_per_sec"]),
                     fmt(sm["heun_35"]["images_per_sec"]),
                     f"{sm['speedup_one_step_vs_heun35']:.1f}x/{sm['speedup_one_step_vs_heun35_paired']:.1f}x",
                     fmt(e["fid_features"]["images_per_sec"]), f"{o['generator_update_step']['ratio']:.2f}",
                     f"{o['fake_score_only_step']['ratio']:.2f}", f"{o['avg_ratio_10']['ratio']:.2f}", f"{peak:,.0f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
    lines.append("")
    lines.append("Bare passes (ms, median) and what they sum to:")
    for e in report["results"]:
        p = {k: v["seconds_median"] * 1e3 for k, v in e["overhead"]["passes"].items()}
        o = e["overhead"]
        lines.append(
            f"  {e['arch']}: G fwd+bwd {p['generator_fwd_bwd']:.1f}, teacher fwd {p['teacher_fwd_nograd']:.1f}, "
            f"fake fwd {p['fake_fwd_nograd']:.1f}, fake fwd+bwd {p['fake_fwd_bwd']:.1f}, G fwd {p['generator_fwd_nograd']:.1f}, "
            f"clip+AdamW G {p['generator_clip_adamw']:.1f} / fake {p['fake_clip_adamw']:.1f}; "
            f"gen-update step {o['generator_update_step']['step_s'] * 1e3:.1f} vs passes "
            f"{o['generator_update_step']['sum_of_passes_s'] * 1e3:.1f} (+optimizers "
            f"{o['generator_update_step']['sum_of_passes_plus_optimizers_s'] * 1e3:.1f}); fake-only step "
            f"{o['fake_score_only_step']['step_s'] * 1e3:.1f} vs {o['fake_score_only_step']['sum_of_passes_s'] * 1e3:.1f} "
            f"(+optimizer {o['fake_score_only_step']['sum_of_passes_plus_optimizers_s'] * 1e3:.1f})")
    for e in report["results"]:
        if "dmd2_full_method" in e:
            f = e["dmd2_full_method"]
            lines.append(
                f"  {e['arch']} full method (GAN head, 2-step generator), images/s: gen-update "
                f"{fmt(f['generator_update_step']['images_per_sec'])}, fake-only {fmt(f['fake_score_only_step']['images_per_sec'])}, "
                f"r10 {fmt(f['avg_ratio_10']['images_per_sec'])}, r5 {fmt(f['avg_ratio_5']['images_per_sec'])}, "
                f"r2 {fmt(f['avg_ratio_2']['images_per_sec'])}")
    lines.append("")
    lines.append("Feature network: " + "; ".join(sorted({e["fid_features"]["network"] for e in report["results"]})))
    inc = report["results"][0]["fid_features"]["inception"] if report["results"] else {}
    lines.append("Inception: " + (inc.get("skipped") or f"{fmt(inc['images_per_sec'])} images/s at 299x299"))
    lines.append(f"Peak memory: {report['results'][0]['memory_kind'] if report['results'] else ''}")
    return "\n".join(lines)
