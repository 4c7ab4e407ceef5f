"""Summaries (median, min-max, pairwise ratios), JSON, Markdown and PNG plots."""
from __future__ import annotations

import json
import os
import statistics

from . import libssh2

REF_SSH = "ssh -L"
REF_DIRECT = "direct"
EXTRA_KEYS = ("cpu_s_per_gb", "p50_us", "p99_us", "p50_ms", "p99_ms", "open_per_s", "errors",
              "failed", "latency_ms", "rss_after_mb")


def _stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarise(wres: dict, reps: int) -> None:
    res = wres["results"]
    for name, ent in res.items():
        if "reps" not in ent:
            continue
        vals = [r.get("value") for r in ent["reps"]]
        ent["values"] = vals
        ent["summary"] = _stats(vals)
        errs = [r["error"] for r in ent["reps"] if r.get("error")]
        if errs:
            ent["errors"] = errs
        for k in EXTRA_KEYS:
            s = _stats([r.get(k) for r in ent["reps"]])
            if s is not None:
                ent.setdefault("extra", {})[k] = s
    for ref, key in ((REF_SSH, "vs_ssh"), (REF_DIRECT, "vs_direct")):
        rv = res.get(ref, {}).get("values")
        if not rv:
            continue
        for name, ent in res.items():
            if "values" not in ent:
                continue
            ratios = [a / b for a, b in zip(ent["values"], rv) if a is not None and b]
            s = _stats(ratios)
            if s is not None:
                ent[key] = s


def _cell(s, unit=""):
    if not s:
        return "–"
    f = (lambda v: f"{v:,.0f}") if s["median"] >= 100 else (lambda v: f"{v:.3g}")
    if s["n"] > 1 and s["min"] != s["max"]:
        return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"
    return f(s["median"])


def _ratio(s):
    if not s:
        return "–"
    if s["n"] > 1 and s["min"] != s["max"]:
        return f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})"
    return f"{s['median']:.2f}×"


def markdown(result: dict) -> str:
    names = list(result["contenders"])
    W = result["workloads"]
    m = result["machine"]
    v = result["versions"]
    L = [f"# sshpump benchmark — {result['suite']} suite, {result['timestamp']}", "",
         f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}. "
         f"Cipher: {result['cipher']} for every tunnel. Repetitions: {result['repetitions']}. "
         f"Elapsed: {result.get('elapsed_s', 0):.0f} s.", "",
         "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val), ""]
    lib_line = libssh2.summary_line(result["contenders"])
    if lib_line:
        L += [lib_line, ""]
    # a row that did not measure what its name says must be seen before its numbers
    for w in result.get("warnings", []):
        L += [f"**WARNING: {w}**", ""]
    L += [result["method"], ""]
    kinds = libssh2.kinds_by_path(result["contenders"])
    L += ["## Contenders", "", "| contender | status | libssh2 | notes |", "|---|---|---|---|"]
    for n, c in result["contenders"].items():
        note = c.get("reason") or c.get("description", "")
        if c.get("cipher"):
            note += f" (cipher: {c['cipher']})"
        if c.get("died"):
            note += f" **died: {c['died'][:200]}**"
        L.append(f"| {n} | {c['status']} | {libssh2.describe(c, kinds)} | {note} |")

    def table(title, fn, note=""):
        L.extend(["", f"## {title}", ""])
        if note:
            L.extend([note, ""])
        L.append("| workload | unit | " + " | ".join(names) + " |")
        L.append("|---|---|" + "---|" * len(names))
        for key, w in W.items():
            cells = []
            for n in names:
                ent = w["results"].get(n, {})
                if "skipped" in ent:
                    cells.append("skip")
                elif ent.get("summary") is None and ent.get("errors"):
                    cells.append("ERROR")
                else:
                    cells.append(fn(ent, w))
            L.append(f"| {w['title']} | {w['unit'] if fn is _val else ('×' if fn is not _extra else '')} | "
                     + " | ".join(cells) + " |")

    def _val(ent, w):
        return _cell(ent.get("summary"))

    def _extra(ent, w):
        return ""

    table("Results: median (min–max)", _val,
          "Higher is better except KiB/conn (RSS growth of the forwarder's processes per idle connection).")
    table(f"Ratio to `{REF_SSH}` (pair by pair within a repetition)", lambda e, w: _ratio(e.get("vs_ssh")))
    table(f"Ratio to `{REF_DIRECT}`", lambda e, w: _ratio(e.get("vs_direct")))

    # details
    L.extend(["", "## Details", "", "| workload | figure | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)])
    detail = [("cpu_s_per_gb", "forwarder CPU s/GB"), ("p50_us", "p50 µs"), ("p99_us", "p99 µs"),
              ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("errors", "failed connects"),
              ("failed", "failed tx"), ("open_per_s", "opens/s"), ("rss_after_mb", "RSS after, MB")]
    for key, w in W.items():
        for dk, label in detail:
            cells, anyv = [], False
            for n in names:
                s = w["results"].get(n, {}).get("extra", {}).get(dk)
                cells.append(_cell(s) if s else "–")
                anyv |= s is not None
            if anyv:
                L.append(f"| {w['title']} | {label} | " + " | ".join(cells) + " |")
    errs = []
    for key, w in W.items():
        for n, ent in w["results"].items():
            for e in ent.get("errors", []):
                errs.append(f"- {key} / {n}: {e[:400]}")
    if errs:
        L += ["", "## Errors", ""] + errs
    return "\n".join(L) + "\n"


def plots(result: dict, outdir: str, stamp: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    W = result["workloads"]
    names = [n for n, c in result["contenders"].items() if c["status"] == "ok"]
    out = []

    def med(key, n, field="summary"):
        ent = W.get(key, {}).get("results", {}).get(n, {})
        s = ent.get(field)
        return s["median"] if s else None

    # throughput vs streams
    xs = [(1, "up")] + [(W[k].get("streams"), k) for k in W if W[k].get("group") == "par"]
    if len(xs) > 1 and "up" in W:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n in names:
            pts = [(x, med(k, n)) for x, k in xs if med(k, n) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("parallel upload streams")
        ax.set_ylabel("aggregate MB/s (median)")
        ax.set_title("Throughput vs streams")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        p = os.path.join(outdir, f"{stamp}-throughput.png")
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)
    # latency percentiles
    rr = [k for k in W if W[k].get("group") == "rr"]
    if rr:
        fig, axes = plt.subplots(1, len(rr), figsize=(5 * len(rr), 4.5), squeeze=False)
        for ax, k in zip(axes[0], rr):
            p50 = [W[k]["results"].get(n, {}).get("extra", {}).get("p50_us", {}).get("median") for n in names]
            p99 = [W[k]["results"].get(n, {}).get("extra", {}).get("p99_us", {}).get("median") for n in names]
            idx = range(len(names))
            ax.bar([i - 0.2 for i in idx], [v or 0 for v in p50], 0.4, label="p50")
            ax.bar([i + 0.2 for i in idx], [v or 0 for v in p99], 0.4, label="p99")
            ax.set_xticks(list(idx))
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel("round trip µs")
            ax.set_yscale("log")
            ax.set_title(W[k]["title"], fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(outdir, f"{stamp}-latency.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)
    # memory vs connections
    idle = [k for k in W if W[k].get("group") == "idle"]
    if idle:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n in names:
            pts = []
            for k in idle:
                v = med(k, n)
                if v is not None:
                    pts.append((W[k]["connections"], v * W[k]["connections"] / 1024))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
        ax.set_xscale("log")
        ax.set_xlabel("idle connections held")
        ax.set_ylabel("RSS growth of forwarder processes, MiB")
        ax.set_title("Memory vs connections")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(outdir, f"{stamp}-memory.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)
    return out


def write_all(result: dict, outdir: str, stamp: str, mode: str) -> str:
    base = os.path.join(outdir, f"{stamp}-{mode}")
    try:
        result["plots"] = plots(result, outdir, f"{stamp}-{mode}")
    except Exception as e:  # a plot must never lose the numbers
        result["plots_error"] = str(e)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    md = markdown(result)
    if result.get("plots"):
        md += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in result["plots"]) + "\n"
    with open(base + ".md", "w") as f:
        f.write(md)
    with open(os.path.join(outdir, f"latest-{mode}.md" if mode != "quick" else "latest.md"), "w") as f:
        f.write(md)
    return base + ".json"
