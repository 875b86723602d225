#!/usr/bin/env bash
# How pagewire copes with another tenant: each given `pagewire` binary runs `demo --size 1GiB
# --content random` and `demo --live`, quiet and with a busy loop pinned to one core, N times,
# interleaved (binary A quiet, A busy, B quiet, B busy, ...), and the medians are printed as a
# Markdown table. Extra demo flags go in DEMO_FLAGS (e.g. DEMO_FLAGS=--no-pin).
#
#   bench/scripts/busy-core.sh N BIN_A [BIN_B ...]
#   bench/scripts/busy-core.sh 4 /tmp/pagewire-before target/release/pagewire
#
# The busy loop runs on BUSY_CORE (default: core 1). Needs python3 and taskset (util-linux).
set -euo pipefail
n=${1:?usage: busy-core.sh N BIN_A [BIN_B ...]}
shift
[ $# -ge 1 ] || { echo "usage: busy-core.sh N BIN_A [BIN_B ...]" >&2; exit 2; }
core=${BUSY_CORE:-1}
out=$(mktemp)
trap 'rm -f "$out"; [ -n "${hog:-}" ] && kill "$hog" 2>/dev/null || true' EXIT
for _ in $(seq 1 "$n"); do
  for bin in "$@"; do
    for mode in quiet busy; do
      hog=
      if [ "$mode" = busy ]; then
        taskset -c "$core" bash -c 'while :; do :; done' &
        hog=$!
        sleep 0.2
      fi
      # shellcheck disable=SC2086
      s=$(timeout 120 "$bin" demo --size 1GiB --content random --json ${DEMO_FLAGS:-} 2>/dev/null)
      # shellcheck disable=SC2086
      l=$(timeout 120 "$bin" demo --live --json ${DEMO_FLAGS:-} 2>/dev/null)
      if [ -n "$hog" ]; then kill "$hog"; wait "$hog" 2>/dev/null || true; hog=; fi
      python3 -c '
import json, sys
s, l = json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(json.dumps({"bin": sys.argv[1], "mode": sys.argv[2], "gib_s": s["gib_per_s"],
    "send_cpu": s["cpu_s_per_gib"], "recv_cpu": s["receiver_cpu_s_per_gib"],
    "downtime": l["downtime_ms"], "expected": l["expected_downtime_ms"]}))' \
        "$bin" "$mode" "$s" "$l" >> "$out"
    done
  done
done
python3 - "$out" "$@" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| binary | other work | GiB/s, median [range] | send/recv CPU-s/GiB | downtime ms, median [range] | expected ms | estimate within 25% |")
print("|---|---|---|---|---|---|---|")
for b in sys.argv[2:]:
    for m in ["quiet", "busy"]:
        r = [x for x in rows if x["bin"] == b and x["mode"] == m]
        g = [x["gib_s"] for x in r]
        d = [x["downtime"] for x in r]
        w = sum(1 for x in r if abs(x["downtime"] - x["expected"]) <= 0.25 * x["downtime"])
        print(f"| {b} | {m} | {st.median(g):.2f} [{min(g):.2f}..{max(g):.2f}] | "
              f"{st.median([x['send_cpu'] for x in r]):.3f}/{st.median([x['recv_cpu'] for x in r]):.3f} | "
              f"{st.median(d):.1f} [{min(d):.1f}..{max(d):.1f}] | {st.median([x['expected'] for x in r]):.1f} | {w} of {len(r)} |")
PY
