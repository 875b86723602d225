#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), one after another, on nightly with
# cargo-fuzz (installed first when missing), starting from the seeds in fuzz/corpus/ (made from
# real transfers by fuzz/seed.py) and growing a working corpus in fuzz/work/. Prints, and writes
# to fuzz/work/summary.md (or $SUMMARY), each target's executions and the coverage libFuzzer
# reached. TARGETS="a b" runs only those.
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the run: turn it into a
# regression test in the normal suite.
set -uo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
targets=${TARGETS:-"frame_header run_validation handshake control receiver_stream sender_machine decompress tls_records tls_direct"}
mkdir -p work
summary=${SUMMARY:-work/summary.md}
echo "| target | seconds | executions | exec/s | coverage (cov) | features (ft) | corpus | result |" > "$summary"
echo "|---|---|---|---|---|---|---|---|" >> "$summary"
status=0
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (cargo +nightly install cargo-fuzz --locked, a few minutes)"
    cargo +nightly install cargo-fuzz --locked >/dev/null 2>&1 || { echo "installing cargo-fuzz failed (a nightly toolchain is needed: rustup toolchain install nightly)"; exit 1; }
fi
cargo +nightly fuzz build -O >/dev/null 2>&1 || { echo "cargo fuzz build failed (see: cargo +nightly fuzz build -O)"; exit 1; }
for t in $targets; do
    mkdir -p "work/$t" "corpus/$t"
    log="work/$t.log"
    cargo +nightly fuzz run -O "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=131072 -print_final_stats=1 -timeout=10 >"$log" 2>&1
    rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(echo "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*')
    ft=$(echo "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*')
    corp=$(echo "$last" | grep -o 'corp: [0-9]*' | grep -o '[0-9]*')
    result=ok
    if [ $rc -ne 0 ]; then result="CRASH (see $log, artifacts/$t)"; status=1; fi
    line="| $t | $seconds | ${execs:-?} | ${rate:-?} | ${cov:-?} | ${ft:-?} | ${corp:-?} | $result |"
    echo "$line" | tee -a "$summary"
done
exit $status
