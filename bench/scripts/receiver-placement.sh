#!/usr/bin/env bash
# Raw TCP's loopback ceiling and pagewire beside it, by where each stream's receiver runs:
# `pagewire-bench transfer` (1 GiB random, 2 channels, 4 reps) for each TCP congestion control
# given × each receiver placement (free, with-sender, crossed), the whole grid repeated N times
# interleaved, then a Markdown table of the medians (README: "Raw TCP's ceiling on loopback is
# where each stream's receiver runs").
#
#   bench/scripts/receiver-placement.sh N [CONGESTION ...]
#   bench/scripts/receiver-placement.sh 3 cubic bbr
#
# BENCH names the pagewire-bench binary (default: target/release/pagewire-bench). Needs python3.
set -euo pipefail
n=${1:?usage: receiver-placement.sh N [CONGESTION ...]}
shift
[ $# -ge 1 ] || set -- "$(sysctl -n net.ipv4.tcp_congestion_control)"
bench=${BENCH:-target/release/pagewire-bench}
out=$(mktemp)
err=$(mktemp)
trap 'rm -f "$out" "$err"' EXIT
for _ in $(seq 1 "$n"); do
  for cc in "$@"; do
    for pl in free with-sender crossed; do
      j=$("$bench" transfer --size 1GiB --zero-size 16MiB --reps 4 --congestion "$cc" \
            --receiver-placement "$pl" --json 2>"$err") || { cat "$err" >&2; exit 1; }
      python3 -c 'import json, sys
d = json.loads(sys.argv[3])
print(json.dumps({"cc": sys.argv[1], "pl": sys.argv[2], "raw": d["raw_tcp"], "pw": d["pagewire"]}))' \
        "$cc" "$pl" "$j" >> "$out"
    done
  done
done
python3 - "$out" "$@" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| congestion | receiver | raw TCP GiB/s | raw send/recv CPU-s/GiB | pagewire GiB/s | pagewire send/recv CPU-s/GiB | pagewire/raw, per run |")
print("|---|---|---|---|---|---|---|")
for cc in sys.argv[2:]:
    for pl in ["free", "with-sender", "crossed"]:
        r = [x for x in rows if x["cc"] == cc and x["pl"] == pl]
        raw = [x["raw"]["gib_per_s_median"] for x in r]
        pw = [x["pw"]["gib_per_s_median"] for x in r]
        span = lambda e: (min(x[e]["gib_per_s_min"] for x in r), max(x[e]["gib_per_s_max"] for x in r))
        cpu = lambda e: "%.3f/%.3f" % (st.median([x[e]["sender_cpu_s_per_gib"] for x in r]),
                                       st.median([x[e]["receiver_cpu_s_per_gib"] for x in r]))
        ratio = [p / q for p, q in zip(pw, raw)]
        print("| %s | %s | %.2f [%.2f..%.2f] | %s | %.2f [%.2f..%.2f] | %s | %.2f–%.2f |" % (
            cc, pl, st.median(raw), *span("raw"), cpu("raw"), st.median(pw), *span("pw"), cpu("pw"),
            min(ratio), max(ratio)))
PY
