"""Usage (no GPU): python benchmarks/chart_4bit.py OUT.png MODES.json [MODES.json ...] [--peer PEER.json ...]

Issue 25's chart: decode tok/s and peak GPU memory of compare.py's rows (measure/compare.py --json) beside the peer's
(benchmarks/peer_gpt_fast.py --json), a panel for each batch size. Only rows of one machine belong side by side (one
call, or calls back to back on it). The 2026-12-06 chart (runs/h100-2026-12-06-b1-peer-int4/chart.png):
  R=benchmarks/runs; python benchmarks/chart_4bit.py $R/h100-2026-12-06-b1-peer-int4/chart.png \
      $R/h100-2026-12-06-b1-peer-int4/q4/modes-a.json $R/h100-2026-12-06-b1-peer-int4/fp16/modes-a.json \
      $R/h100-2026-12-06-b16-4bit/m16/modes-a.json --peer $R/h100-2026-12-06-b1-peer-int4/peer-int4-b1.json
"""
import argparse
import json


def rows_of(modes: list[str], peers: list[str]) -> list[dict]:
    rows = []
    for path in modes:
        result = json.load(open(path))
        model = result["rest"][result["rest"].index("--model") + 1] if "--model" in result["rest"] else "?"
        rows += [dict(name=r["mode"], batch=r["batch_size"], tok_s=r["decode_tokens_per_s"],
                      gib=r["peak_allocated_gib"], card=result["card"], date=result["date"],
                      what=f"{model}, {result['new_tokens']} new tokens")
                 for r in result["rows"] if r["status"] == "ok" and r["verified"]]
    for path in peers:
        r = json.load(open(path))
        rows.append(dict(name=f"gpt-fast {r.get('quant') or r['dtype']} (peer)", batch=r["batch_size"],
                         tok_s=r["decode_tokens_per_s_median"], gib=None, card=r["card"], date=r["date"][:10],
                         what=None))
    return sorted(rows, key=lambda r: (r["batch"], r["tok_s"]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("modes", nargs="+")
    parser.add_argument("--peer", nargs="*", default=[])
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = rows_of(args.modes, args.peer)
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(batches), 2, figsize=(12, 1.2 + 0.5 * len(rows) + 0.6 * len(batches)), squeeze=False,
                             gridspec_kw=dict(width_ratios=[3, 1], height_ratios=[sum(r["batch"] == b for r in rows)
                                                                                  for b in batches]))
    for (speed, memory), batch in zip(axes, batches):
        part = [r for r in rows if r["batch"] == batch]
        names = [r["name"] for r in part]
        bars = speed.barh(names, [r["tok_s"] for r in part],
                          color=["tab:orange" if r["name"].startswith("gpt-fast") else "tab:blue" for r in part])
        speed.bar_label(bars, [f" {r['tok_s']:.1f}" for r in part], fontsize=8)
        speed.margins(x=0.12)
        speed.set_title(f"batch {batch}: decode tokens/s", fontsize=10)
        memory.barh(names, [r["gib"] or 0 for r in part], color="tab:green")
        memory.set_yticks([])
        memory.set_title("peak GiB allocated", fontsize=10)
    what = next(r["what"] for r in rows if r["what"])
    fig.suptitle(f"{rows[0]['card']}, {rows[0]['date']}: {what}; the project's rows verified (the peer's memory: not "
                 "comparable)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
