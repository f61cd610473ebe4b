#!/usr/bin/env bash
# False alarms of the anomaly detectors on a steady stream: two hours of
# event time, Zipf over 10,000 clients at 1,000 events/s (7.2M events,
# nothing injected), replayed through the engine with default settings.
# Every anomaly found is a false alarm. Prints them by type and severity,
# by the client's expected volume (from its Zipf rank), and the clients
# with the most.
#
# Usage: benches/false_alarms.sh [WORK_DIR]
# Needs jq and about 3 GB of disk; takes about a minute on 2 cores.
set -euo pipefail

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/tally/target}
cd "$(dirname "$0")/.."
cargo build --release --quiet
tally=$CARGO_TARGET_DIR/release/tally
work=${1:-$(mktemp -d)}
mkdir -p "$work"
rm -rf "$work/data"

"$tally" gen --clients 10000 --rate 1000 --duration 2h --seed 42 \
    --out "$work/steady.ndjson"
# Each anomaly is logged once, at info, as it is found.
RUST_LOG=info "$tally" replay "$work/steady.ndjson" --data-dir "$work/data" \
    --log-format json --json >"$work/replay.json" 2>"$work/replay.log"
jq -c 'select(.fields.anomaly_type) | .fields' "$work/replay.log" >"$work/anomalies.jsonl"

echo "replay: $(jq -r '"\(.accepted) events accepted in \(.elapsed_seconds | floor) s"' "$work/replay.json")"
echo "false alarms: $(wc -l <"$work/anomalies.jsonl")"
echo
echo "by type and severity:"
jq -r '"\(.anomaly_type) \(.severity)"' "$work/anomalies.jsonl" | sort | uniq -c
echo
# Expected requests a minute of client-k: 60,000 x k^-1.1 / H(10000, 1.1),
# H = 6.6034.
echo "by the client's expected requests a minute (type, band, count):"
jq -r '"\(.anomaly_type) \(.client_id | ltrimstr("client-") | tonumber)"' "$work/anomalies.jsonl" |
    awk '{ rate = 60000 * exp(-1.1 * log($2)) / 6.6034;
           band = rate >= 100 ? ">=100" : rate >= 20 ? "20-100" : rate >= 5 ? "5-20" : rate >= 1 ? "1-5" : "<1";
           print $1, band }' |
    sort | uniq -c
echo
echo "clients with the most:"
jq -r '.client_id' "$work/anomalies.jsonl" | sort | uniq -c | sort -rn | head -10
echo
echo "examples:"
jq -r '.anomaly_type' "$work/anomalies.jsonl" | sort -u | while read -r type; do
    jq -r --arg t "$type" 'select(.anomaly_type == $t) | "\(.client_id) \(.anomaly_type) \(.severity): \(.message)"' \
        "$work/anomalies.jsonl" | head -3
done
echo
echo "files in $work"
