#!/bin/bash
# How long `llmprune ARGS` takes to answer (wall clock, 5 runs, sorted, median), for the working tree and for a
# commit (default HEAD), side by side in one run. Usage, from the repository root with the venv active:
#   bash eval/cli_speed.sh [COMMIT]
# The commit's tree is exported with `git archive` to a temporary folder that goes first on PYTHONPATH, so the same
# interpreter and `llmprune` entry point run both (numbers depend on the machine's load: compare within one run).
set -euo pipefail
commit=${1:-HEAD}
repo=$(pwd)
before=$(mktemp -d)
trap 'rm -rf "$before"' EXIT
git archive "$commit" | tar -x -C "$before"
entry=$(command -v llmprune)
time5() {
  local root=$1; shift
  local ts=()
  for _ in 1 2 3 4 5; do
    local s e
    s=$(date +%s.%N)
    (cd /tmp && PYTHONPATH=$root "$entry" "$@" >/dev/null 2>&1) || true
    e=$(date +%s.%N)
    ts+=("$(printf '%.2f' "$(echo "$e - $s" | bc)")")
  done
  echo "$(printf '%s\n' "${ts[@]}" | sort -n | tr '\n' ' ')| median $(printf '%s\n' "${ts[@]}" | sort -n | sed -n 3p) s"
}
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
for args in "--help" "--version" "compress --help"; do
  # shellcheck disable=SC2086
  echo "$commit  llmprune $args: $(time5 "$before" $args)"
  # shellcheck disable=SC2086
  echo "tree    llmprune $args: $(time5 "$repo" $args)"
done
