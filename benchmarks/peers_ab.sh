#!/usr/bin/env bash
# The peer race as an interleaved A/B: two versions of this project, run alternately in the same minutes.
#
#   bash benchmarks/peers_ab.sh BASE [HEAD] [PAIRS]
#   ONLY="dramatiq orchestrator-lifecycle" bash benchmarks/peers_ab.sh 755fad1          # HEAD: the working tree
#   REF=streams-ref ONLY="streams-ref orchestrator" bash benchmarks/peers_ab.sh main~3 main 4
#
# On a shared machine one race drifts more than most changes move it (the lifecycle row spanned
# 0.61-0.92x Dramatiq in eight runs of one commit, 2026-12-04); pairs run back to back do not. BASE
# and HEAD are commits (HEAD defaults to the working tree as it is); each runs from a git worktree
# under .peers/ab/ with a scratch directory of its own (PEERS_WORK, so its own .venv-orch), RUNS=1
# per side and pair, base first. It prints every row's tasks/s, CPU per task and round-trip p50 for each
# pair, then the median over pairs of each of this project's rows against REF (default dramatiq), for
# throughput and for p50 (the p50 target is against streams-ref: REF=streams-ref).
set -eu
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${1:?usage: peers_ab.sh BASE [HEAD] [PAIRS]}
HEAD=${2:-}
PAIRS=${3:-3}
ONLY=${ONLY:-"streams-ref dramatiq orchestrator orchestrator-lifecycle"}
REF=${REF:-dramatiq}
AB=$PROJECT/.peers/ab
mkdir -p "$AB"

tree_of() {  # the directory a version runs from: a worktree at the commit, or the working tree
  if [ -z "$1" ]; then echo "$PROJECT"; return; fi
  local sha; sha=$(git -C "$PROJECT" rev-parse --short "$1^{commit}")
  if [ ! -d "$AB/tree-$sha" ]; then git -C "$PROJECT" worktree add -f --detach "$AB/tree-$sha" "$sha" >/dev/null; fi
  echo "$AB/tree-$sha"
}
BASE_TREE=$(tree_of "$BASE")
HEAD_TREE=$(tree_of "$HEAD")
# A scratch directory per version, not per side: its .venv-orch has the version installed editable, and one
# reused for another commit ran the first commit's code (peers.sh before 2026-12-04 reinstalled only when
# pyproject.toml changed).
work_of() { if [ "$1" = "$PROJECT" ]; then echo "$AB/work-working-tree"; else echo "$AB/work-$(basename "$1")"; fi; }
BASE_WORK=$(work_of "$BASE_TREE")
HEAD_WORK=$(work_of "$HEAD_TREE")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
for pair in $(seq 1 "$PAIRS"); do
  for side in base head; do
    if [ "$side" = base ]; then tree=$BASE_TREE work=$BASE_WORK; else tree=$HEAD_TREE work=$HEAD_WORK; fi
    echo "pair $pair/$PAIRS: $side ($tree)" >&2
    PEERS_WORK="$work" RESULTS_DIR="results/$STAMP/pair$pair" RUNS=1 ONLY="$ONLY" \
      bash "$tree/benchmarks/peers.sh" >"$work.log" 2>&1 \
      || { echo "the $side race failed: see $work.log" >&2; exit 1; }
  done
done
exec python3 - "$BASE_WORK" "$HEAD_WORK" "$STAMP" "$PAIRS" "$REF" "$BASE" "${HEAD:-working tree}" <<'PY'
import json, pathlib, statistics, sys

work = {"base": pathlib.Path(sys.argv[1]), "head": pathlib.Path(sys.argv[2])}
stamp, pairs, ref, base, head = sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]

def rows(side, pair):
    out = {}
    for path in sorted((work[side] / "results" / stamp / f"pair{pair}" / "run1").glob("*.json")):
        data = json.loads(path.read_text())
        t = data.get("throughput") or {}
        if t.get("tasks_per_s"):
            p50 = (data.get("latency") or {}).get("p50_ms")
            out[path.stem] = (t["tasks_per_s"], t["cpu_ms_per_task"], p50)  # the race's row key
    return out

print(f"base {base}, head {head}; {pairs} pairs; tasks/s (CPU ms per task worker / redis / client), p50 ms")
ratios = {"tasks/s": {"base": {}, "head": {}}, "p50": {"base": {}, "head": {}}}
for pair in range(1, pairs + 1):
    for side in ("base", "head"):
        got = rows(side, pair)
        cells = [f"{k} {v[0]:,.0f} ({v[1]['worker']:.3f} / {v[1]['redis']:.3f} / {v[1]['client']:.3f})"
                 + (f" p50 {v[2]:.3f}" if v[2] else "") for k, v in got.items()]
        print(f"pair {pair} {side}: " + "; ".join(cells))
        for key, (tps, _, p50) in got.items():
            if key.startswith("orchestrator") and ref in got:
                ratios["tasks/s"][side].setdefault(key, []).append(tps / got[ref][0])
                if p50 and got[ref][2]:
                    ratios["p50"][side].setdefault(key, []).append(p50 / got[ref][2])
for measure, by_side in ratios.items():
    for key in sorted(set(by_side["base"]) | set(by_side["head"])):
        b, h = by_side["base"].get(key, []), by_side["head"].get(key, [])
        if b and h:
            print(f"{key} / {ref}, {measure}: base {statistics.median(b):.2f}x  head {statistics.median(h):.2f}x  "
                  f"(pairs: {', '.join(f'{x:.2f}/{y:.2f}' for x, y in zip(b, h))})")
PY
