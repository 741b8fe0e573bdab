"""Build lr_sweep.{md,json} (this folder) from the per-lr paper.json files.

Run from anywhere: python benchmarks/results/paper/make_lr_sweep.py
The conclusion paragraph is kept from an existing lr_sweep.md (section "What the sweep shows").
"""
import importlib.util, json, os, sys
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
spec = importlib.util.spec_from_file_location("paper_bench", os.path.join(ROOT, "benchmarks", "paper.py"))
P = importlib.util.module_from_spec(spec); sys.modules[spec.name] = P; spec.loader.exec_module(P)
RES = os.path.join(ROOT, "benchmarks", "results", "paper")
SETTINGS = [("1e-3", RES, "python benchmarks/paper.py --quick")]
for lr in ("3e-4", "1e-4"):
    d = os.path.join(RES, f"lr_{lr}")
    if os.path.isfile(os.path.join(d, "paper.json")):
        SETTINGS.append((lr, d, f"python benchmarks/paper.py --quick --lr {lr} --teacher-lr 1e-3 --out benchmarks/results/paper/lr_{lr}"))

def ms(x, d=1): return f"{x[0]:.{d}f} ± {x[1]:.{d}f}"
def steps_str(a, budget):
    return ", ".join(str(s) if s is not None else f">{budget}" for s in a["steps_to_target"])

runs_all = {}
out = {"settings": [], "note": "teachers trained at lr 1e-3 in every setting (identical teachers); "
       "the lr applies to every arm after growth, with the same batch, RMSProp and warm-up+cosine schedule"}
for lr, d, cmd in SETTINGS:
    r = json.load(open(os.path.join(d, "paper.json")))
    r["summary"] = P.summarize(r)
    runs_all[lr] = r
base_target = {g: runs_all["1e-3"]["summary"][g]["target_val_acc"] for g in ("wider", "deeper")}

L = ["# Net2Net quick experiment: shared learning-rate sweep", ""]
L.append("Commands (from the repository root; each writes paper.json / paper.md / plots into its folder):")
L.append("")
L.append("```")
for lr, d, cmd in SETTINGS:
    L.append(cmd + ("   # committed baseline (benchmarks/results/paper/)" if lr == "1e-3" else ""))
L.append("python benchmarks/results/paper/make_lr_sweep.py   # this report, from the three paper.json files")
L.append("```")
L.append("")
L.append("Every arm of one comparison uses the same batch (32), optimizer (RMSProp, decay 0.9, eps 1e-3, momentum 0) "
         "and schedule (20 % linear warm-up, then cosine to 5 % of the peak), 60 steps after growth, 3 seeds; only "
         "the shared peak lr differs between tables. The teachers are trained at lr 1e-3 for 100 steps in every "
         "setting (`--teacher-lr 1e-3`), so all three settings grow the identical teachers "
         f"(narrow {runs_all['1e-3']['teachers']['wider']['final_val_acc']:.2f} %, standard "
         f"{runs_all['1e-3']['teachers']['deeper']['final_val_acc']:.2f} % validation accuracy). "
         "CPU, 2 cores shared with other jobs (2 workers x 1 thread).")
L.append("")
L.append("Columns: validation accuracy (%, eval mode, 400 digits) mean ± sd over 3 seeds. *Step 10*: first logged "
         "point after growth (inside the 12-step warm-up). *Lowest*: lowest point after step 0. *Steps to target*: "
         "first logged step from which the run stays at or above the target (the random-init arm's final mean at "
         "that lr) until step 60; `>60` = not there at the end (counted as 60). *Steps to 1e-3 target*: the same "
         "against the lr-1e-3 random-init final mean "
         f"(wider {base_target['wider']:.2f} %, deeper {base_target['deeper']:.2f} %), a target that does not move with the lr.")
for lr, d, cmd in SETTINGS:
    r = runs_all[lr]; s = r["summary"]; cfg = r["config"]; budget = cfg["steps"]
    wall = r["total_wall_s"] / 60
    L += ["", f"## lr {lr}" + (" (committed baseline)" if lr == "1e-3" else ""), ""]
    L.append(f"Wall time {wall:.1f} min. Targets: wider {s['wider']['target_val_acc']:.2f} %, deeper "
             f"{s['deeper']['target_val_acc']:.2f} %. Teachers: narrow {r['teachers']['wider']['final_val_acc']:.2f} %, "
             f"standard {r['teachers']['deeper']['final_val_acc']:.2f} %.")
    L.append("")
    L.append("| arm | step-0 | step 10 | lowest | steps to target | steps to 1e-3 target | final val acc |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    rec = {"lr": float(lr), "command": cmd, "wall_min": wall, "targets": {g: s[g]["target_val_acc"] for g in ("wider", "deeper")},
           "teachers": {g: r["teachers"][g]["final_val_acc"] for g in ("wider", "deeper")}, "arms": {}, "speedups": []}
    for g in ("wider", "deeper"):
        for arm, a in s[g]["arms"].items():
            rs = [x for x in r["runs"] if x["arm"] == arm]
            s10 = P.mean_sd([x["curve"]["val_acc"][1] for x in rs])
            fixed = [P.steps_to(x["curve"], base_target[g]) for x in rs]
            fixed_s = ", ".join(str(v) if v is not None else f">{budget}" for v in fixed)
            L.append(f"| {a['label']} | {ms(a['step0_val_acc'], 2)} | {ms(s10)} | {ms(a['min_val_acc_after_0'])} | "
                     f"{steps_str(a, budget)} | {fixed_s} | {ms(a['final_val_acc'], 2)} |")
            rec["arms"][arm] = dict(label=a["label"], step0=a["step0_val_acc"], step10=s10, lowest=a["min_val_acc_after_0"],
                                    steps_to_target=a["steps_to_target"], steps_to_lr1e3_target=fixed,
                                    final=a["final_val_acc"], function_preserved=a.get("function_preserved"),
                                    val_acc_curves=[x["curve"]["val_acc"] for x in rs])
    L.append("")
    L.append("Speed-up (mean steps to target of the baseline / of the student; runs not there count as 60; "
             "`~` = inconclusive, student not there in every seed; `≥` = lower bound: the baseline is not there in every seed, or the student is there from step 0 and is credited with one 10-step interval):")
    L.append("")
    L.append("| student vs baseline | speed-up | mean steps student vs baseline | seeds there (student, baseline) |")
    L.append("|---|---:|---:|---:|")
    for sp in s["speedups"]:
        ga = s[sp["group"]]["arms"]
        mark = "≥ " if sp["factor_is_lower_bound"] else "~" if sp["inconclusive"] else ""
        L.append(f"| {P.LABELS[sp['student']]} vs {P.LABELS[sp['baseline']].lower()} | {mark}{sp['factor']:.2f}× | "
                 f"{sp['student_steps']:.0f} vs {sp['baseline_steps']:.0f} | {ga[sp['student']]['reached']}/3, "
                 f"{ga[sp['baseline']]['reached']}/3 |")
        rec["speedups"].append(dict(sp, mark=mark.strip()))
    out["settings"].append(rec)
MD = os.path.join(RES, "lr_sweep.md")
HEAD = "## What the sweep shows"
old = open(MD).read().split(HEAD, 1)[1].strip() if os.path.isfile(MD) and HEAD in open(MD).read() else "(pending)"
if len(sys.argv) > 1:  # a file with a new conclusion paragraph
    old = open(sys.argv[1]).read().strip()
L += ["", HEAD, "", old]
out["conclusion"] = L[-1]
open(MD, "w").write("\n".join(L) + "\n")
json.dump(out, open(os.path.join(RES, "lr_sweep.json"), "w"), indent=1)
print("\n".join(L))
