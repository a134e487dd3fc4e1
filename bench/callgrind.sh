#!/usr/bin/env bash
# Instructions per filter phase call, counted by callgrind: the one measure that repeats
# exactly on a noisy VM (criterion spreads ±20 % between runs here, the load bench more).
# Runs the criterion filter bench's rows under valgrind (filters without the pooling
# allocator, whose address-space reservation valgrind cannot make) and prints, per row,
# the instructions of one phase call: in the guest's code, in wasmtime, in Weir, and in the
# host calls the guest made (inclusive).
#
# Usage: bench/callgrind.sh [ROW ...]     default: gateway_ratelimit gateway_router gateway_auth
# It installs valgrind from Debian if missing. A manual tool, never part of the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
ROWS=("$@")
((${#ROWS[@]})) || ROWS=(gateway_ratelimit gateway_router gateway_auth)

BIN="$(cargo bench -p weir-tests --bench filter --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="filter": print(m["executable"])' | tail -1)"
[[ -x "$BIN" ]] || { echo "callgrind.sh: the filter bench did not build" >&2; exit 1; }
OUT="$(mktemp -d -t weir-callgrind.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT

printf '| row | instructions per call | guest | wasmtime | weir | host calls (incl.) |\n|---|---:|---:|---:|---:|---:|\n'
for row in "${ROWS[@]}"; do
    WEIR_WASM_ALLOCATOR=on-demand timeout 1200 valgrind --tool=callgrind \
        --callgrind-out-file="$OUT/$row.cg" --toggle-collect='*WasmFilter*phase*' \
        "$BIN" --bench --profile-time 3 "$row" >"$OUT/$row.log" 2>&1 ||
        { echo "callgrind.sh: $row failed; see its log:" >&2; tail -20 "$OUT/$row.log" >&2; exit 1; }
    python3 - "$OUT/$row.cg" "$row" <<'PY'
import re, subprocess, sys
f, row = sys.argv[1], sys.argv[2]
lines = open(f).read().split("\n")
names = {}
for l in lines:
    m = re.match(r"c?fn=\((\d+)\) (.*)", l)
    if m:
        names[m.group(1)] = m.group(2)
# Phase calls: calls into the head-phase entry (`phase`), counted at every call site.
phase = {i for i, n in names.items() if n == "weir::filter::wasm::WasmFilter::phase::{{closure}}"}
calls = 0
for i, l in enumerate(lines):
    m = re.match(r"cfn=\((\d+)\)", l)
    if m and m.group(1) in phase:
        calls += int(re.match(r"calls=(\d+)", lines[i + 1]).group(1))
out = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", f], capture_output=True, text=True).stdout
cat = {"guest": 0, "wasmtime": 0, "weir": 0, "other": 0}
for l in out.split("file:function", 1)[1].splitlines()[2:]:
    m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)", l)
    if not m:
        continue
    n, s = int(m.group(1).replace(",", "")), m.group(2)
    k = "guest" if s.startswith("???:0x") else "wasmtime" if "wasmtime" in s else "weir" if "weir::" in s or "/proxy/src/" in s else "other"
    cat[k] += n
inc = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--auto=no", "--threshold=100", f], capture_output=True, text=True).stdout
host = max([int(l.split()[0].replace(",", "")) for l in inc.splitlines() if "HostFn::cabi_entrypoint [" in l and "func/host.rs" in l] or [0])
per = lambda n: f"{n / calls:,.0f}" if calls else "?"
print(f"| {row} | {per(sum(cat.values()))} | {per(cat['guest'])} | {per(cat['wasmtime'])} | {per(cat['weir'])} | {per(host)} |")
PY
done
