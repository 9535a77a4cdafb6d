#!/bin/sh
# Runs every fuzz target (or the TARGETs named) for SECONDS each
# (default 300), one after the
# other, starting from the seeds (and the shared MM4 corpus for mm4_check,
# when it is there), and prints the last status line of each.
# Needs cargo-fuzz (cargo install cargo-fuzz); on a stable toolchain,
# RUSTC_BOOTSTRAP=1 lets it pass the sanitizer flags.
set -eu
cd "$(dirname "$0")"
SECONDS_EACH=${1:-300}
[ $# -gt 0 ] && shift
TARGETS=${*:-smtp_server smtp_client mm4_check address_route config_parse intake dns_answer}
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
SHARED=../../shared/mm4-corpus
for t in $TARGETS; do
    mkdir -p "corpus/$t"
    extra=""
    if [ "$t" = mm4_check ] && [ -d "$SHARED" ]; then
        extra="$SHARED/valid $SHARED/invalid"
    fi
    # shellcheck disable=SC2086
    cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" $extra -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 2>"$t.log" || { echo "$t: FAILED, see fuzz/$t.log"; continue; }
    echo "$t: $(grep -E '^#[0-9]+' "$t.log" | tail -1)"
    grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "$t.log" | tr '\n' ' '
    echo
done
