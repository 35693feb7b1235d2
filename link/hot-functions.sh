#!/usr/bin/env bash
# Writes link/hot-functions.txt: the functions of the `brook` binary that the
# dashboard runs over the book's orders, busiest first, for build.rs to place
# together. Run it again after a toolchain or dependency upgrade: the names
# carry hashes of their crate's version and build settings.
#
# Needs valgrind, and the book's orders split by the e2e bench
# (`cargo bench --bench e2e -- book` writes them to target/bench-data/book).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
orders=${1:-$root/target/bench-data/book}
[ -d "$orders" ] || { echo "no orders in $orders: run 'cargo bench --bench e2e -- book' first" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }

# The binary the benches run: the bench profile's names are the ones to match.
cargo bench --locked --bench e2e --no-run
brook=$root/target/release/brook

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|LOCATION 'data/orders'|LOCATION '$orders'|" queries/dashboard_parquet.sql > "$work/dashboard.sql"
(cd "$work" && valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/profile" \
    "$brook" run dashboard.sql --checkpoint ckpt --trigger available-now > /dev/null 2> "$work/log") \
    || { cat "$work/log" >&2; exit 1; }

# Each line of the report reads `Ir (share)  file:function [object]`; recursive
# calls come back as `function'2`. The report's perl warns about its totals.
callgrind_annotate --inclusive=no --threshold=100 "$work/profile" 2> /dev/null \
    | sed -n "s|^.*:\([^: ]*\) \[$brook\]\$|\1|p" \
    | sed "s/'[0-9]*\$//" \
    | awk '!seen[$0]++' \
    | grep -v '^0x' > link/hot-functions.txt
echo "link/hot-functions.txt: $(wc -l < link/hot-functions.txt) functions"
