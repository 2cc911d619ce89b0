#!/usr/bin/env bash
# The peer race (../shared/peers, see its README) with this project's rows beside the peers, in one
# run: "orchestrator" (bus + worker runtime), "orchestrator-unsigned" (the same with signing off,
# to show what the signature costs) and "orchestrator-lifecycle" (manager, ledger, spec check,
# acceptance), all from benchmarks/peer_adapter.py.
#
#   bash benchmarks/peers.sh                                     # every peer, RUNS=2
#   ONLY="streams-ref dramatiq orchestrator orchestrator-lifecycle" RUNS=2 bash benchmarks/peers.sh
#   ONLY="streams-ref orchestrator orchestrator-unsigned" RUNS=4 bash benchmarks/peers.sh   # signing's cost
#
# The shared harness is used as it is, from a scratch directory (PEERS_WORK, default .peers/ here,
# git-ignored) holding a copy of its files; run_all.sh gets the unsigned and lifecycle rows added. The
# peers' venvs are the shared ones (run ../shared/peers/setup.sh once); .venv-orch is made here
# with this checkout installed editable, so it always runs the code as it is now.
# Results: $PEERS_WORK/results/summary.md (RESULTS_DIR as in run_all.sh, relative to PEERS_WORK).
set -eu
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${PEERS_DIR:-$PROJECT/../shared/peers}
[ -d "$SHARED" ] || SHARED=/work/shared/peers
SHARED=$(cd "$SHARED" && pwd)
WORK=${PEERS_WORK:-$PROJECT/.peers}
mkdir -p "$WORK"
if [ ! -x "$SHARED/.venv/bin/python" ]; then
  echo "the peers' venvs are missing: run 'bash $SHARED/setup.sh' from $PROJECT first" >&2
  exit 2
fi
# Copies, not links: Python resolves a linked script to its real directory, and the harness writes
# its worker logs next to harness.py.
for f in "$SHARED"/*.py "$SHARED"/*.sh "$SHARED"/*.txt; do
  rm -f "$WORK/$(basename "$f")"
  cp "$f" "$WORK/"
done
for v in .venv .venv-taskiq13; do [ -e "$SHARED/$v" ] && ln -sfn "$SHARED/$v" "$WORK/$v"; done
rm -f "$WORK/run_all.sh"
sed 's#^  "orchestrator|.venv-orch|peer_orchestrator.py|default"#&\n  "orchestrator-unsigned|.venv-orch|peer_orchestrator.py|unsigned"\n  "orchestrator-lifecycle|.venv-orch|peer_orchestrator.py|lifecycle"#' \
  "$SHARED/run_all.sh" > "$WORK/run_all.sh"
grep -q '"orchestrator-lifecycle|' "$WORK/run_all.sh" || { echo "could not add this project's rows to run_all.sh" >&2; exit 1; }
# (Re)installed whenever pyproject.toml changed, so a new dependency reaches the benchmark too, or the
# checkout did: the editable install points at one checkout, and a scratch directory reused for another
# (peers_ab.sh's, from one head commit to the next) would otherwise run the first one's code.
STAMP=$( (echo "$PROJECT"; cat "$PROJECT/pyproject.toml") | sha256sum | cut -c1-16)
if [ ! -x "$WORK/.venv-orch/bin/orchestrator" ] || [ "$(cat "$WORK/.venv-orch/.pyproject" 2>/dev/null)" != "$STAMP" ]; then
  [ -x "$WORK/.venv-orch/bin/python" ] || "${PYTHON:-python3}" -m venv "$WORK/.venv-orch"
  "$WORK/.venv-orch/bin/pip" install -q -e "$PROJECT" hiredis
  echo "$STAMP" > "$WORK/.venv-orch/.pyproject"
fi
echo "$PROJECT" > "$WORK/.venv-orch/project-path"
cd "$WORK"
exec bash run_all.sh
