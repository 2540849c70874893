#!/usr/bin/env bash
# A/B of two builds of clustercomm on the benchmark suite, ours only, in
# interleaved runs (the machine's noise hits both sides alike).
#
#   benches/ab/ab.sh snap TAG          build this checkout's suite in release and keep a
#                                      copy (with its message server and relay) in
#                                      target/ab/TAG
#   benches/ab/ab.sh run A B N CASE... alternate the two copies N times over the cases
#                                      (`--quick --ours-only --rounds 3`), then print
#                                      each case's median run, range and change
#
# Example: benches/ab/ab.sh snap before; (change the code); benches/ab/ab.sh snap after;
#          benches/ab/ab.sh run before after 6 "=notify 128 B" "=AnyOf over 4, 128 B"
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
store="$root/target/ab"
case "${1:-}" in
  snap)
    tag=${2:?usage: ab.sh snap TAG}
    cd "$root"
    exe=$(cargo bench -p clustercomm-benches --bench suite --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "suite" and m.get("executable"):
        print(m["executable"])')
    mkdir -p "$store/$tag"
    cp "$exe" "$store/$tag/suite"
    cp target/release/bench-message-server target/release/bench-relay "$store/$tag/"
    echo "$store/$tag/suite"
    ;;
  run)
    a=${2:?usage: ab.sh run A B N CASE...}; b=${3:?}; n=${4:?}; shift 4
    out="$store/$a-vs-$b.txt"
    : > "$out"
    for i in $(seq 1 "$n"); do
      for tag in "$a" "$b"; do
        echo "### $tag run $i" >> "$out"
        "$store/$tag/suite" --quick --ours-only --rounds 3 "$@" 2>&1 | grep -E '^\| ' | grep -v '^| case' >> "$out" || true
      done
    done
    python3 "$here/stat.py" "$out" "$a" "$b"
    ;;
  *)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
