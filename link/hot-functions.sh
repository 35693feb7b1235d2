#!/usr/bin/env bash
# Writes target/hot-functions.txt: the functions of the `brook` binary that the
# dashboard runs over the book's orders, busiest first, for build.rs to place
# together when built with BROOK_HOT_FUNCTIONS=target/hot-functions.txt. The
# names carry hashes of their crate's version and build settings, and the code
# generated in brook's own codegen units gets names from its content
# (`.llvm.*`): run this again after changing brook's code, its version, the
# toolchain or a dependency.
#
# Needs valgrind, and the book's orders split by the e2e bench
# (`cargo bench --bench e2e -- book` writes them to target/bench-data/book),
# or a directory of order files as the argument.
set -euo pipefail
orders=$(realpath "${1:-$(dirname "$0")/../target/bench-data/book}")
cd "$(dirname "$0")/.."
# valgrind names the binary by its real path.
root=$(pwd -P)
target=$(realpath "${CARGO_TARGET_DIR:-$root/target}")
[ -d "$orders" ] || { echo "no orders in $orders: run 'cargo bench --bench e2e -- book' first" >&2; exit 1; }
command -v valgrind > /dev/null || { echo "valgrind is not installed" >&2; exit 1; }

# The binary the benches run.
cargo bench --locked --bench e2e --no-run
brook=$target/release/brook

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sql=$(< queries/dashboard_parquet.sql)
from="LOCATION 'data/orders'"
[[ $sql == *"$from"* ]] || { echo "queries/dashboard_parquet.sql reads no $from" >&2; exit 1; }
printf '%s\n' "${sql//"$from"/"LOCATION '$orders'"}" > "$work/dashboard.sql"
# As the e2e bench runs it.
(cd "$work" && RUST_LOG=warn valgrind --tool=callgrind --demangle=no \
    --callgrind-out-file="$work/profile" "$brook" run dashboard.sql \
    --checkpoint ckpt --trigger available-now --progress json > /dev/null 2> "$work/log") \
    || { cat "$work/log" >&2; exit 1; }

# Each line of the report reads `Ir (share)  file:function [object]`; recursive
# calls come back as `function'2`, code without a symbol as an address, and
# valgrind's own frames in parentheses.
# The report's perl warns about its totals.
callgrind_annotate --inclusive=no --threshold=100 "$work/profile" 2> /dev/null \
    | awk -v object="[$brook]" '
        substr($0, length($0) - length(object) + 1) == object {
            line = substr($0, 1, length($0) - length(object) - 1)
            name = substr(line, match(line, /[^: ]*$/))
            sub(/\047[0-9]+$/, "", name)
            if (name ~ /^[A-Za-z_][A-Za-z0-9_.$]*$/ && !seen[name]++) print name
        }' > "$work/list"
[ -s "$work/list" ] || { echo "no function of $brook in the profile" >&2; exit 1; }
mv "$work/list" "$target/hot-functions.txt"
echo "$target/hot-functions.txt: $(wc -l < "$target/hot-functions.txt") functions"
echo "build with it: BROOK_HOT_FUNCTIONS=$target/hot-functions.txt cargo bench --bench e2e --no-run"
