"""bench/gpu.py's report: the goals the issue sets, checked against the results, and the markdown tables."""

from __future__ import annotations

GOAL_MFU = 0.52  # the issue's goals: the 1b model at >= 52% MFU with EMA + LAWA on ...
GOAL_AVERAGING_SHARE = 0.01  # ... and averaging <= 1% of a step with every: 1

DESCRIPTIONS = {
    "ds": "DeepSpeed ZeRO-3, eager",
    "anchor_compile": "plain PyTorch + torch.compile (the anchor)",
    "anchor_eager": "plain PyTorch, eager",
    "ds_persist": "DeepSpeed ZeRO-3, param_persistence_threshold 1e12",
    "ds_deepcompile": "DeepSpeed ZeRO-3 + DeepCompile",
    "ds_compile": "DeepSpeed ZeRO-3 + engine.compile() (no DeepCompile)",
}
BLOCKS_DESCRIBED = {
    "plain": "no averaging",
    "ema_lawa_cpu": "EMA + LAWA (window 3), every 1, offload cpu",
    "ema_lawa_none": "EMA + LAWA (window 3), every 1, offload none",
    "ema_cpu": "EMA, every 1, offload cpu",
    "ema_none": "EMA, every 1, offload none",
    "recipe_1b_lawa": "recipes/1b_lawa.yaml's averaging: EMA + LAWA (window 20), every 10, offload cpu",
}


def rows(results: dict) -> list[tuple[str, str, dict, dict]]:
    """(phase, block, block result, phase result) for every measured or skipped block, in run order."""
    out = []
    for phase, res in results["speed"]["variants"].items():
        blocks = res.get("blocks") or {}
        if not blocks:
            out.append((phase, "plain", {"status": res.get("status"), "reason": res.get("reason") or
                                         res.get("error")}, res))
        for name, block in blocks.items():
            out.append((phase, name, block, res))
    return out


def goals(results: dict) -> dict:
    anchor = results["speed"]["variants"].get("anchor_compile", {}).get("blocks", {}).get("plain", {})
    anchor_tps = anchor.get("tokens_per_s") if anchor.get("status") == "ok" else None
    with_avg = [(f"{p}:{b}", r) for p, b, r, _ in rows(results) if b != "plain" and r.get("status") == "ok"
                and r.get("mfu") is not None]
    best = max(with_avg, key=lambda x: x[1]["mfu"], default=None)
    overheads = []
    for phase, res in results["speed"]["variants"].items():
        blocks = res.get("blocks") or {}
        plain = blocks.get("plain", {})
        if plain.get("status") != "ok":
            continue
        for name, block in blocks.items():
            if name in ("ema_lawa_cpu", "ema_lawa_none", "ema_cpu", "ema_none") and block.get("status") == "ok":
                overheads.append((f"{phase}:{name}", block["step_s_median"] / plain["step_s_median"] - 1,
                                  block.get("update_share")))
    g = {"mfu_with_averaging": {"goal": GOAL_MFU, "best": best[1]["mfu"] if best else None,
                                "variant": best[0] if best else None,
                                "met": (best[1]["mfu"] >= GOAL_MFU) if best else None,
                                "anchor_mfu": anchor.get("mfu") if anchor_tps else None},
         "averaging_share_every_1": {"goal": GOAL_AVERAGING_SHARE,
                                     "overheads": {n: {"step_overhead": o, "update_share": u}
                                                   for n, o, u in overheads}}}
    if overheads:
        name, o, _ = min(overheads, key=lambda x: x[1])
        g["averaging_share_every_1"].update(best=o, variant=name, met=o <= GOAL_AVERAGING_SHARE)
    plain = [(p, r) for p, b, r, _ in rows(results) if b == "plain" and p.startswith("ds") and r.get("status") == "ok"]
    if plain:
        fastest = max(plain, key=lambda x: x[1]["tokens_per_s"])
        g["fastest_deepspeed_settings"] = {"phase": fastest[0], "tokens_per_s": fastest[1]["tokens_per_s"],
                                           "sets": results["speed"]["variants"][fastest[0]].get("phase_sets", [])}
    return g


def _f(x, fmt: str, unit: str = "") -> str:
    return "–" if x is None else format(x, fmt) + unit


def render(results: dict) -> str:
    env, data = results["env"], results["data"]
    probe = env.get("probe", {})
    device = probe.get("device") or ("CPU" if results["mode"] == "cpu" else "?")
    lines = [f"# GPU benchmark ({results['mode']} mode): {device}", "",
             (f"Started {results['started']}, {results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget. "
              f"`{results['command']}`"), "",
             (f"Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), deepspeed "
              f"{env.get('deepspeed')}, transformers {env.get('transformers')}; {env.get('cpus')} CPUs.")]
    if probe.get("matmul_bf16_tflops"):
        lines.append(f"Measured here: bf16 8192³ matmul {probe['matmul_bf16_tflops']:.0f} TFLOP/s, pinned "
                     f"device→host copy {probe['d2h_pinned_gb_s']:.1f} GB/s; nvidia-smi: {env.get('nvidia_smi')}.")
    if data:
        lines.append(f"Data: {data.get('source')}, {data.get('train_tokens'):,} train tokens, vocabulary "
                     f"{data.get('vocab_size')}, prepared in {data.get('prepare_s')} s.")

    c = results["correctness"]
    lines += ["", f"## Correctness: {c.get('status')}", ""]
    if c.get("reason") or c.get("error"):
        lines.append(f"{c.get('reason') or c.get('error')}")
    checks = c.get("checks", {})
    if checks:
        lines += ["| check | passed | detail |", "|---|---|---|"]
        o = checks.get("oracle", {})
        detail = "; ".join(f"{n}: relative error {_f(a.get('relative_error'), '.1e')} over samples {a.get('samples')}"
                           if a.get("checked") else f"{n}: not checked ({a.get('why')})"
                           for n, a in o.get("averages", {}).items()) or o.get("error", "")
        lines.append(f"| online averages = offline oracle (zero_to_fp32 of each checkpoint; relative error < "
                     f"{o.get('tolerance')}) | {o.get('passed')} | {detail} |")
        r = checks.get("resume", {})
        if "checkpoints" in r:
            before, after = r.get("max_loss_diff_before_resume"), r.get("max_loss_diff_after_resume")
            parts = [f"{r['kill']}, killed {r['killed_while']}, resumed from step {r['resumed_from']}",
                     "bitwise identical" if r.get("bitwise") else r.get("note", ""),
                     f"loss max abs diff before / after the resume point: {_f(before, '.3g')} / {_f(after, '.3g')}"]
            for tag, compared in r["checkpoints"].items():
                parts.append(f"{tag}: " + ", ".join(f"{k} {_f(v['max_abs_diff'], '.3g')}"
                                                    for k, v in compared.items()))
            detail = "; ".join(parts)
        else:
            detail = r.get("error", "")
        lines.append(f"| SIGKILL + resume = uninterrupted run | {r.get('passed')} | {detail} |")
        lg = checks.get("logits", {})
        detail = "; ".join(f"{n}: fp32 {_f(w['hf_fp32'], '.1e')}, bf16 {_f(w['hf_bf16'], '.1e')} (ours in bf16 "
                           f"{_f(w['ours_bf16'], '.1e')}), top-1 {w['top1_agreement_hf_bf16']:.3f}"
                           + ("" if w["export_equals_checkpoint"] else ", EXPORT DIFFERS FROM THE CHECKPOINT")
                           for n, w in lg.get("weights", {}).items()) or lg.get("error", "")
        bound = lg.get("tolerance", {}).get("bf16")
        lines.append(f"| exports in transformers: logits within tolerance (relative L2 against our fp32 model; "
                     f"fp32 ≤ 1e-4, bf16 ≤ {bound}) | {lg.get('passed')} | {detail} |")
        w = checks.get("offload_wait", {})
        if "update_s_median" in w:
            detail = (f"update {w['update_s_median'] * 1e3:.2f} ms median, {w['update_s_max'] * 1e3:.2f} ms max, "
                      f"{w['update_share']:.2%} of a {w['step_s_median'] * 1e3:.1f} ms step; waited for the worker "
                      f"{w['waits']} times in {w['timed_steps']} steps ({w['wait_s']:.3f} s); worker per job: copy "
                      f"{_f(w['copy_s_per_job'], '.4f')} s, host work {_f(w['host_work_s_per_job'], '.4f')} s")
            if "step_overhead" in w:
                detail += f"; step {w['step_overhead']:+.1%} against no averaging"
        else:
            detail = w.get("error", "")
        every = sorted({a["every"] for a in (w.get("averages") or {}).values()})
        judged = "" if w.get("judged", True) else " (not judged: the CPU's timings mean nothing)"
        lines.append(f"| offload never makes the training thread wait ({', '.join(w.get('averages') or [])} every "
                     f"{'/'.join(map(str, every))} steps, offload {w.get('offload')}) | {w.get('passed')}{judged} | "
                     f"{detail} |")

    model = results["speed"].get("model")
    lines += ["", "## Speed", ""]
    if model:
        lines.append(f"{model['params'] / 1e6:,.1f}M parameters (dim {model['dim']}, {model['n_layers']} layers, "
                     f"vocabulary {model['vocab_size']}), seq {model['seq_len']}, micro-batch {model['micro_batch']}, "
                     f"{model['tokens_per_step']:,} tokens a step, {model['precision']}, on {model['device']}; MFU "
                     f"against {_f(model['peak_flops'] and model['peak_flops'] / 1e12, '.0f')} TFLOP/s "
                     f"(launch/metrics.py), {model['flops_per_token'] / 1e9:.2f} GFLOP per token.")
        lines.append("")
    anchor = results["speed"]["variants"].get("anchor_compile", {}).get("blocks", {}).get("plain", {})
    anchor_tps = anchor.get("tokens_per_s") if anchor.get("status") == "ok" else None
    lines += [("| variant | averaging | tokens/s | MFU | step (median) | peak memory | vs anchor | averaging update: "
               "median / max, share of the step | waits for the worker | status |"),
              "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for phase, name, block, res in rows(results):
        ok = block.get("status") == "ok"
        status = block.get("status") or res.get("status")
        if not ok:
            status = f"{status}: {block.get('reason') or res.get('reason') or res.get('error') or ''}".strip(": ")
        elif block.get("stopped"):
            status = f"ok ({block['steps']} timed steps, stopped by {block['stopped']})"
        upd = (f"{block['update_s_median'] * 1e3:.1f} / {block['update_s_max'] * 1e3:.1f} ms, "
               f"{block['update_share']:.2%}" if ok and "update_s_median" in block else "–")
        waits = block.get("worker", {})
        lines.append(
            f"| {DESCRIPTIONS.get(phase, phase)} | {BLOCKS_DESCRIBED.get(name, name)} | "
            f"{_f(block.get('tokens_per_s') if ok else None, ',.0f')} | "
            f"{_f(block.get('mfu') if ok else None, '.1%')} | "
            f"{_f(block.get('step_s_median') * 1e3 if ok else None, '.0f', ' ms')} | "
            f"{_f(block.get('peak_mem_gib'), '.1f', ' GiB')} | "
            f"{_f(block['tokens_per_s'] / anchor_tps if ok and anchor_tps else None, '.3f')} | {upd} | "
            f"{waits.get('waits', '–')} | {status} |")
    extra = []
    for phase, res in results["speed"]["variants"].items():
        if res.get("deepcompile_op_build_s") is not None:
            extra.append(f"DeepCompile's native op was built in {res['deepcompile_op_build_s']:.0f} s.")
        plain = (res.get("blocks") or {}).get("plain", {})
        if plain.get("first_step_s") and plain.get("step_s_median"):
            extra.append(f"{DESCRIPTIONS.get(phase, phase)}: set-up {_f(res.get('setup_s'), '.0f')} s, first step "
                         f"{plain['first_step_s']:.1f} s (compilation included where compiled)"
                         + (f", {res['graph_breaks']['total']} graph breaks" if res.get("graph_breaks", {}).get("total")
                            else "") + ".")
    if extra:
        lines += ["", *extra]

    g = results.get("goals", {})
    lines += ["", "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    m = g.get("mfu_with_averaging", {})
    lines.append(f"| 1b at ≥ {GOAL_MFU:.0%} MFU with EMA + LAWA on (ahead of the compiled anchor) | best "
                 f"{_f(m.get('best'), '.1%')} ({m.get('variant')}); anchor {_f(m.get('anchor_mfu'), '.1%')} | "
                 f"{m.get('met')} |")
    a = g.get("averaging_share_every_1", {})
    lines.append(f"| averaging ≤ {GOAL_AVERAGING_SHARE:.0%} of a step with every: 1 | best step overhead "
                 f"{_f(a.get('best'), '+.2%')} ({a.get('variant')}) | {a.get('met')} |")
    fastest = g.get("fastest_deepspeed_settings")
    if fastest:
        lines.append(f"| recipes default to the fastest settings found | fastest DeepSpeed: "
                     f"{DESCRIPTIONS[fastest['phase']]} ({fastest['tokens_per_s']:,.0f} tokens/s; "
                     f"`{' '.join(fastest['sets']) or 'the recipe as it is'}`) | – |")
    return "\n".join(lines) + "\n"
