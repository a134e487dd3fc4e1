#!/usr/bin/env bash
# Weir's end-to-end load bench, on loopback, in one run:
#   (a) wrk straight to the demo upstream  -> the ceiling: what the load generator and the
#                                            upstream can do without any proxy;
#   (b) wrk through Weir                   -> what Weir costs; also through 1 and 3 Wasm
#       filters (the `policy` test filter: reads the path and two headers, sets a header,
#       bumps a counter), on other listeners of the same process; and through 3 `pass`
#       filters (both header phases, nothing done in them): the Wasm boundary's floor;
#   (c) wrk through nginx, configured as the equivalent reverse proxy (upstream keep-alive,
#       X-Forwarded-For, one worker)      -> a well-known yardstick for that cost;
#   (d) the gateway chain of the policy library (router + auth by API key + ratelimit, the
#       filters of filters/) on /api with an API key, against nginx doing the closest
#       equivalent (a location plus a header check).
# With --h2 it also runs h2load (h2c, prior knowledge) direct and through Weir.
# With --instructions it measures no time at all: Weir runs under valgrind's callgrind and
# each Weir target is driven over one keep-alive connection (every request a full wake-up,
# so no batching that depends on the load); the report gives the user-space instructions
# Weir executes per request, end to end, and of them the atomic (lock-prefixed) ones, which
# cost ~20 cycles each where most cost one, and the system calls made. Repeatable to about 0.1 % where timings here spread
# ±20 %: the measure for comparing two builds on a noisy machine. nginx (as one process) is
# counted the same way; no h2load.
#
# Usage: bench/load.sh [--h2 | --instructions]   (or: cargo xtask bench [--h2])
# Knobs (environment):
#   DURATION=10s     measured length of each run (wrk/h2load syntax: 30s, 1m)
#   CONNECTIONS=64   concurrent connections
#   THREADS=1        load-generator threads (on a 2-core box: one core for the load generator)
#   WORKERS=1        Weir's runtime.worker_threads and nginx's worker_processes (kept equal)
#   WARMUP=2s        unmeasured run before each measured one (warms pools, caches, CPU clocks)
#   ROUNDS=3         times the whole sequence of targets runs; the report gives each figure's
#                    median over the rounds and every round's ratios (a VM's speed drifts
#                    between minutes, so ratios are taken within a round)
#   PIN=1            pin the load generator to the last CPU and the servers to the others
#                    (the default: unpinned, rounds of one build spread 0.87-1.06 in
#                    Weir/nginx; pinned, 0.97-1.00); PIN=0 leaves placement to the kernel
#   SKIP_BUILD=1     use the release binaries already built instead of running cargo
#   KEEP_DUMPS=DIR   with --instructions: keep each target's callgrind dump in DIR
#                    (callgrind_annotate DIR/weir.callgrind shows where the instructions go)
#   PROFILE=DIR      sample each server's stacks, user space and kernel, with `perf record`
#                    during each measured run, into DIR/<target>-<round>.perf (perf report
#                    -i FILE --no-children shows where the time goes; the sampling slows the
#                    measured runs a little, so compare figures of such runs only together)
#
# It prints a Markdown table and writes the same report to bench/results/load-<date>.md.
# It is a manual tool: never part of the test suite (numbers depend on the machine).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# nginx lives in /usr/sbin, which is not on a normal user's PATH.
PATH="$PATH:/usr/sbin:/sbin"

DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-1}"
WORKERS="${WORKERS:-1}"
WARMUP="${WARMUP:-2s}"
ROUNDS="${ROUNDS:-3}"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "load.sh: ROUNDS must be a positive whole number" >&2; exit 2; }
PIN="${PIN:-1}"
SKIP_BUILD="${SKIP_BUILD:-0}"
KEEP_DUMPS="${KEEP_DUMPS:-}"
PROFILE="${PROFILE:-}"
H2=0
INSTR=0
# How long a server may take to answer its first request (wait_ok).
WAIT_S=10

# The header comment above, up to the first line of code.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

for arg in "$@"; do
    case "$arg" in
        --h2) H2=1 ;;
        --instructions) INSTR=1 WAIT_S=300 ;; # under valgrind, start-up takes minutes
        -h | --help) usage; exit 0 ;;
        *) echo "load.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

die() { echo "load.sh: $*" >&2; exit 1; }
log() { echo "==> $*" >&2; }

# A duration as whole seconds (for the watchdog timeouts below). Accepts what both wrk and
# h2load accept: a number with an optional s/m/h unit.
secs() {
    [[ "$1" =~ ^([0-9]+)([smh]?)$ ]] || die "bad duration '$1' (use e.g. 10s, 1m)"
    case "${BASH_REMATCH[2]}" in
        h) echo $((BASH_REMATCH[1] * 3600)) ;;
        m) echo $((BASH_REMATCH[1] * 60)) ;;
        *) echo $((BASH_REMATCH[1])) ;;
    esac
}
DURATION_S="$(secs "$DURATION")"
WARMUP_S="$(secs "$WARMUP")"
for v in CONNECTIONS THREADS WORKERS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
((THREADS <= CONNECTIONS)) || die "THREADS ($THREADS) must not exceed CONNECTIONS ($CONNECTIONS)"
((DURATION_S > 0)) || die "DURATION must be at least 1s"

# --- tools ---------------------------------------------------------------------------------
# Install only what is missing, with one `apt-get update`. nginx is only installed, never
# started as a system service: we run our own instance below, with its own config.
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3-minimal)
if ((H2)) && ! command -v h2load >/dev/null; then need+=(nghttp2-client); fi
if ((INSTR)) && ! command -v valgrind >/dev/null; then need+=(valgrind); fi
if [[ -n "$PROFILE" ]] && ! command -v perf >/dev/null; then need+=(linux-perf); fi
if ((${#need[@]})); then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
    SUDO=()
    [[ "$(id -u)" == 0 ]] || SUDO=(sudo)
    log "installing ${need[*]}"
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# --- pinning (optional) --------------------------------------------------------------------
# Without pinning the scheduler may put wrk and the proxy on the same core now and then,
# which shows up as noise. PIN=1 gives the load generator the last CPU and the servers the rest.
LOADGEN=()
SERVER=()
if [[ "$PIN" == 1 ]]; then
    ncpu="$(nproc)"
    if ((ncpu >= 2)) && command -v taskset >/dev/null; then
        LOADGEN=(taskset -c "$((ncpu - 1))")
        SERVER=(taskset -c "0-$((ncpu - 2))")
    else
        log "PIN=1 ignored: needs taskset and at least 2 CPUs"
    fi
fi

# --- build ---------------------------------------------------------------------------------
BIN="${CARGO_TARGET_DIR:-target}/release"
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building release binaries"
    cargo build --release -p weir -p weir-demo-upstream
fi
[[ -x "$BIN/weir" && -x "$BIN/weir-demo-upstream" ]] ||
    die "no release binaries in $BIN (run without SKIP_BUILD=1)"
# The filter the filtered runs use, built as a user builds a filter.
FIXTURES_TARGET="${CARGO_TARGET_DIR:-target}/wasm-fixtures"
POLICY_WASM="$ROOT/$FIXTURES_TARGET/wasm32-wasip2/release/fixture_policy.wasm"
PASS_WASM="$ROOT/$FIXTURES_TARGET/wasm32-wasip2/release/fixture_pass.wasm"
[[ "$FIXTURES_TARGET" = /* ]] && POLICY_WASM="$FIXTURES_TARGET/wasm32-wasip2/release/fixture_policy.wasm" &&
    PASS_WASM="$FIXTURES_TARGET/wasm32-wasip2/release/fixture_pass.wasm"
if [[ "$SKIP_BUILD" != 1 || ! -f "$POLICY_WASM" || ! -f "$PASS_WASM" ]]; then
    rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
    log "building the policy and pass filters for wasm32-wasip2"
    cargo build --release --target wasm32-wasip2 --manifest-path tests/fixtures/Cargo.toml \
        --target-dir "$FIXTURES_TARGET" -p fixture-policy -p fixture-pass
fi

# The policy library, built as a user builds filters.
LIB_WASM="$ROOT/${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release"
[[ "${CARGO_TARGET_DIR:-}" = /* ]] && LIB_WASM="$CARGO_TARGET_DIR/wasm32-wasip2/release"
if [[ "$SKIP_BUILD" != 1 || ! -f "$LIB_WASM/weir_filter_auth.wasm" ]]; then
    log "building the policy library for wasm32-wasip2"
    cargo build --release --target wasm32-wasip2 -p weir-filter-router -p weir-filter-auth \
        -p weir-filter-ratelimit
fi

# --- processes and cleanup -----------------------------------------------------------------
TMP="$(mktemp -d -t weir-bench.XXXXXX)"
[[ -z "$PROFILE" ]] || mkdir -p "$PROFILE"
# nginx drops its workers to `nobody` when started as root; they must reach the temp dir.
chmod 755 "$TMP"
PIDS=()

# TERM first (Weir drains, nginx shuts down its workers), KILL if it is still there after 3 s.
stop() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop "$pid"; done
    rm -rf "$TMP"
}
trap cleanup EXIT
# So Ctrl-C or a kill still runs the EXIT trap (and exits non-zero).
trap 'exit 130' INT
trap 'exit 143' TERM

# The report's commit line: the short hash, and whether the tree had local changes.
commit_line() {
    local rev
    if rev="$(git rev-parse --short HEAD 2>/dev/null)"; then
        git diff --quiet HEAD 2>/dev/null || rev="$rev (with local changes)"
    else
        rev=unknown
    fi
    echo "- commit: $rev"
}

# Shows the tail of a server's log when something goes wrong with it.
show_log() { echo "--- last lines of $1:" >&2; tail -n 20 "$1" >&2 || true; }

# Polls URL until it answers 200; gives up after WAIT_S seconds or as soon as process PID has
# died.
wait_ok() {
    local url="$1" pid="$2" logf="$3" wait_s="$WAIT_S"
    local deadline=$((SECONDS + wait_s))
    until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then show_log "$logf"; die "process for $url exited"; fi
        if ((SECONDS >= deadline)); then show_log "$logf"; die "$url not ready after $wait_s s"; fi
        sleep 0.1
    done
}

# Distinct free loopback ports, below the kernel's ephemeral range (where a port handed out by
# binding to port 0 comes from, and where any outgoing connection may take it next).
read -r UP_PORT WEIR_PORT ADMIN_PORT NGINX_PORT WEIR1_PORT WEIR3_PORT WEIRG_PORT NGINXG_PORT WEIRP_PORT < <(python3 -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
ports, socks = [], []
while len(ports) < 9:
    p = random.randrange(10000, max(low, 10001))
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        s.close()
        continue
    if p not in ports:
        ports.append(p)
        socks.append(s)
# Closed before the ports are printed: the servers start as soon as the line is read, and a
# socket still bound here (until this process exits) makes their bind fail.
for s in socks:
    s.close()
print(*ports, flush=True)
')

# --- upstream ------------------------------------------------------------------------------
# One tokio worker: the upstream should be cheap and identical for all three targets.
log "starting the demo upstream on 127.0.0.1:$UP_PORT"
"${SERVER[@]}" "$BIN/weir-demo-upstream" --listen "127.0.0.1:$UP_PORT" --threads 1 \
    >"$TMP/upstream.log" 2>&1 &
PIDS+=("$!")
UP_PID="$!"
wait_ok "http://127.0.0.1:$UP_PORT/" "$!" "$TMP/upstream.log"

# --- Weir ----------------------------------------------------------------------------------
# N chain entries of the policy filter, each its own filter (own instances, state, metrics).
filter_entries() {
    local i sep=""
    for ((i = 1; i <= $1; i++)); do
        printf '%s{ name = "policy-%d", file = "%s", config = { value = "yes", deny_path = "/deny" } }' \
            "$sep" "$i" "$POLICY_WASM"
        sep=", "
    done
}
# N chain entries of the pass filter (both header phases, nothing done in them).
pass_entries() {
    local i sep=""
    for ((i = 1; i <= $1; i++)); do
        printf '%s{ name = "pass-%d", file = "%s" }' "$sep" "$i" "$PASS_WASM"
        sep=", "
    done
}
# API key auth: the key is "bench-key", stored as its sha256 like a real config.
AUTH_KEY_SHA256="$(printf %s bench-key | sha256sum | cut -d' ' -f1)"
AUTH_CONFIG="{ api_keys = { header = \"x-api-key\", keys = [{ name = \"bench\", sha256 = \"$AUTH_KEY_SHA256\" }] } }"
# Access log off and level warn: nginx gets `access_log off` too; logging is not what we measure.
cat >"$TMP/weir.toml" <<EOF
[runtime]
worker_threads = $WORKERS

[log]
level = "warn"
access_log = false

[admin]
address = "127.0.0.1:$ADMIN_PORT"

[[listeners]]
name = "bench"
address = "127.0.0.1:$WEIR_PORT"

[[listeners]]
name = "one-filter"
address = "127.0.0.1:$WEIR1_PORT"
filters = [$(filter_entries 1)]

[[listeners]]
name = "three-filters"
address = "127.0.0.1:$WEIR3_PORT"
filters = [$(filter_entries 3)]

# The floor of a 3-filter chain: six calls across the Wasm boundary per request, no work.
[[listeners]]
name = "three-pass"
address = "127.0.0.1:$WEIRP_PORT"
filters = [$(pass_entries 3)]

# The gateway chain: every request is rate-limited per client (a limit far above the load,
# so every request pays for the check but none is refused), routed, and authenticated.
[[listeners]]
name = "gateway"
address = "127.0.0.1:$WEIRG_PORT"
filters = [
  { name = "ratelimit", file = "$LIB_WASM/weir_filter_ratelimit.wasm", config = { requests = 100000000, per = "1s", key = "client_ip" } },
  { name = "router", file = "$LIB_WASM/weir_filter_router.wasm", config = { rules = [{ matches = [{ path = { type = "PathPrefix", value = "/api" } }], backendRefs = [{ name = "up" }] }] } },
  { name = "auth", file = "$LIB_WASM/weir_filter_auth.wasm", config = $AUTH_CONFIG },
]

[[routes]]
name = "all"
path_prefix = "/"
cluster = "up"

[clusters.up]
endpoints = ["127.0.0.1:$UP_PORT"]
EOF
log "starting Weir on 127.0.0.1:$WEIR_PORT (admin $ADMIN_PORT, $WORKERS worker thread(s))"
# Besides instructions (Ir): locked instructions (Ge, "global bus events": the atomic
# read-modify-writes of reference counts and locks) and system calls (sysCount).
CG_EVENTS=(--collect-bus=yes --collect-systime=yes --dump-instr=yes)
if ((INSTR)); then
    # Counting starts off (--instr-atstart=no): start-up and filter compilation run at
    # valgrind's uninstrumented speed; it is switched on before the first target. Filters
    # without the pooling allocator, whose address-space reservation valgrind cannot make.
    WEIR_WASM_ALLOCATOR=on-demand valgrind -q --tool=callgrind --instr-atstart=no "${CG_EVENTS[@]}" \
        --callgrind-out-file="$TMP/callgrind.out" \
        "$BIN/weir" run -c "$TMP/weir.toml" >"$TMP/weir.log" 2>&1 &
else
    "${SERVER[@]}" "$BIN/weir" run -c "$TMP/weir.toml" >"$TMP/weir.log" 2>&1 &
fi
PIDS+=("$!")
WEIR_PID="$!"
wait_ok "http://127.0.0.1:$ADMIN_PORT/ready" "$WEIR_PID" "$TMP/weir.log"
# Ready is not enough: check a request really goes through to the upstream.
wait_ok "http://127.0.0.1:$WEIR_PORT/" "$WEIR_PID" "$TMP/weir.log"

# --- nginx ---------------------------------------------------------------------------------
# The equivalent reverse proxy: same worker count, keep-alive to the upstream (HTTP/1.1 and
# an empty Connection header, or nginx opens a connection per request), X-Forwarded-For like
# Weir's default X-Forwarded-*, proxy_buffering left at its default. keepalive_requests is
# raised on both sides because nginx otherwise closes each connection after 1000 requests,
# which would make wrk reconnect and penalise nginx for a default, not for its proxying.
# Every path (pid, logs, temp dirs) is in $TMP, so it runs as root without touching /var.
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes $WORKERS;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;

events {
    worker_connections $((CONNECTIONS * 4 > 1024 ? CONNECTIONS * 4 : 1024));
}

http {
    access_log off;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    keepalive_requests 1000000;

    upstream up {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }

    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }

    # The gateway equivalent: a route plus an API-key header check.
    server {
        listen 127.0.0.1:$NGINXG_PORT;
        location /api {
            if (\$http_x_api_key != "bench-key") { return 401; }
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
        location / { return 404; }
    }
}
EOF
log "starting nginx on 127.0.0.1:$NGINX_PORT ($WORKERS worker process(es))"
# -e: the error log used before the config is read (else the compiled-in /var/log path).
if ((INSTR)); then
    # One process (no master), so callgrind counts the process that serves.
    valgrind -q --tool=callgrind --instr-atstart=no "${CG_EVENTS[@]}" --callgrind-out-file="$TMP/callgrind-nginx.out" \
        nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" -e "$TMP/nginx/error.log" \
        -g 'daemon off; master_process off;' >"$TMP/nginx/stdout.log" 2>&1 &
else
    "${SERVER[@]}" nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" -e "$TMP/nginx/error.log" \
        -g 'daemon off;' >"$TMP/nginx/stdout.log" 2>&1 &
fi
PIDS+=("$!")
NGINX_PID="$!"
wait_ok "http://127.0.0.1:$NGINX_PORT/" "$!" "$TMP/nginx/error.log"

# --- instructions (--instructions) -----------------------------------------------------------
if ((INSTR)); then
    declare -A INS=() NREQ=() ATOM=() SYSC=()
    # Counting on from here (warm-ups run counted but their counts are zeroed): switching it off
    # and on again between runs loses counts.
    callgrind_control -i on "$WEIR_PID" >/dev/null
    callgrind_control -i on "$NGINX_PID" >/dev/null
    # One target: a warm-up, then the counters zeroed, one measured run over one connection,
    # and a dump of the counts.
    count_target() {
        local name="$1" url="$2" pid="$3" out="$TMP/wrk-$1.txt" dump n total
        log "$name: warm-up $WARMUP (1 connection, under callgrind)"
        timeout --foreground 300 wrk -t1 -c1 -d "$WARMUP" "${WRK_HEADERS[@]}" "$url" >/dev/null ||
            die "$name: warm-up failed"
        callgrind_control -z "$pid" >/dev/null
        log "$name: counting over $DURATION"
        timeout --foreground 300 wrk -t1 -c1 -d "$DURATION" "${WRK_HEADERS[@]}" "$url" >"$out" ||
            { cat "$out" >&2; die "$name: wrk failed"; }
        callgrind_control -d "$pid" >/dev/null
        dump="$(ls -t "$TMP"/callgrind*.out.* | head -1)"
        # The totals line lists the events in the order the `events:` line names them.
        read -r total atomics syscalls <<<"$(awk '
            /^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
            /^totals:/ { print $col["Ir"], $col["Ge"] + 0, $col["sysCount"] + 0; exit }' "$dump")"
        n="$(awk '/ requests in / { print $1 }' "$out")"
        grep -q "Non-2xx" "$out" && { cat "$out" >&2; die "$name: some responses were not 2xx"; }
        [[ -n "$total" && "${n:-0}" -gt 0 ]] || die "$name: no count (dump $dump)"
        NREQ[$name]="$n"
        INS[$name]=$((total / n))
        ATOM[$name]="$(awk -v a="$atomics" -v n="$n" 'BEGIN { printf "%.1f", a / n }')"
        SYSC[$name]="$(awk -v a="$syscalls" -v n="$n" 'BEGIN { printf "%.1f", a / n }')"
        if [[ -n "$KEEP_DUMPS" ]]; then
            mkdir -p "$KEEP_DUMPS"
            cp "$dump" "$KEEP_DUMPS/$name.callgrind"
        fi
        rm -f "$dump"
    }
    count_target weir "http://127.0.0.1:$WEIR_PORT/" "$WEIR_PID"
    count_target weir-1-filter "http://127.0.0.1:$WEIR1_PORT/" "$WEIR_PID"
    count_target weir-3-filters "http://127.0.0.1:$WEIR3_PORT/" "$WEIR_PID"
    count_target weir-3-pass "http://127.0.0.1:$WEIRP_PORT/" "$WEIR_PID"
    count_target nginx "http://127.0.0.1:$NGINX_PORT/" "$NGINX_PID"
    WRK_HEADERS=(-H "x-api-key: bench-key")
    count_target weir-gateway "http://127.0.0.1:$WEIRG_PORT/api/items" "$WEIR_PID"
    count_target nginx-gateway "http://127.0.0.1:$NGINXG_PORT/api/items" "$NGINX_PID"
    WRK_HEADERS=()
    report="$TMP/report.md"
    {
        echo "# Instructions per request, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        commit_line
        echo "- $(valgrind --version), Weir under callgrind (filters without the pooling allocator)"
        echo "- each target: wrk -t1 -c1 -d $DURATION after a $WARMUP warm-up"
        echo
        echo "| target | requests counted | instructions per request | vs Weir without filters | vs nginx's equivalent | atomic instructions per request | system calls per request |"
        echo "|---|---:|---:|---:|---:|---:|---:|"
        for t in weir weir-1-filter weir-3-filters weir-3-pass weir-gateway nginx nginx-gateway; do
            n="${INS[nginx]}"
            [[ "$t" == weir-gateway ]] && n="${INS[nginx-gateway]}"
            awk -v t="$t" -v c="${NREQ[$t]}" -v i="${INS[$t]}" -v w="${INS[weir]}" -v n="$n" \
                -v a="${ATOM[$t]}" -v y="${SYSC[$t]}" 'BEGIN {
                if (t ~ /^nginx/) printf "| %s | %d | %d | – | – | %s | %s |\n", t, c, i, a, y
                else printf "| %s | %d | %d | %+d | %.2f | %s | %s |\n", t, c, i, i - w, i / n, a, y
            }'
        done
        echo
        echo "User-space instructions of the serving process (Weir, all threads; nginx as one"
        echo "process without a master) over the measured run, divided by the requests wrk counted."
        echo "The kernel's share (the sockets) is not counted; the system calls into it are. Atomic"
        echo "instructions: callgrind's global bus events (lock-prefixed read-modify-writes)."
    } >"$report"
    mkdir -p bench/results
    result="bench/results/instructions-$(date -u +%Y-%m-%dT%H%M%SZ).md"
    cp "$report" "$result"
    echo
    cat "$report"
    echo
    echo "written to $result"
    exit 0
fi

# --- wrk -----------------------------------------------------------------------------------
# Same settings for every target. --timeout bounds a stuck request; the `timeout` watchdog
# bounds wrk itself, so the script always ends by itself.
wrk_run() {
    local url="$1" dur="$2" dur_s="$3"
    timeout --foreground --kill-after=5 "$((dur_s + 30))" \
        "${LOADGEN[@]}" wrk -t "$THREADS" -c "$CONNECTIONS" -d "$dur" --timeout 5s --latency \
        "${WRK_HEADERS[@]}" "$url"
}
WRK_HEADERS=()

# Prints "req/s p50_us p99_us errors" from wrk's output (latencies converted to µs; errors =
# socket errors + non-2xx/3xx responses, which wrk otherwise counts as requests).
parse_wrk() {
    awk '
        function us(v,   n, unit) {
            n = v + 0; unit = v; sub(/^[0-9.]+/, "", unit)
            if (unit == "us") return n
            if (unit == "ms") return n * 1e3
            if (unit == "s") return n * 1e6
            if (unit == "m") return n * 6e7
            if (unit == "h") return n * 3.6e9
            return -1
        }
        /^Requests\/sec:/ { rps = $2 }
        /^[ \t]*50%/ { p50 = us($2) }
        /^[ \t]*99%/ { p99 = us($2) }
        /Non-2xx or 3xx responses:/ { errs += $NF }
        /Socket errors:/ { for (i = 3; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) errs += $i + 0 }
        END {
            if (rps == "" || p50 == "" || p99 == "" || p50 < 0 || p99 < 0) exit 1
            printf "%s %.0f %.0f %d\n", rps, p50, p99, errs
        }' "$1"
}

# CPU time of the processes given, all their threads, in clock ticks: "user system".
HZ="$(getconf CLK_TCK)"
cpu_ticks() {
    local p u=0 s=0 pu ps
    for p in "$@"; do
        [[ -r "/proc/$p/stat" ]] || continue
        read -r pu ps < <(awk '{ print $14, $15 }' "/proc/$p/stat")
        u=$((u + pu)) s=$((s + ps))
    done
    echo "$u $s"
}
# The processes serving a target: the upstream for `direct`, Weir, or nginx's master and workers.
server_pids() {
    case "$1" in
        direct) echo "$UP_PID" ;;
        nginx*) echo "$NGINX_PID" $(pgrep -P "$NGINX_PID") ;;
        *) echo "$WEIR_PID" ;;
    esac
}

# Per target, one value per round, space-separated, in round order (ERRS: summed).
declare -A RPS=() P50=() P99=() ERRS=() CPU=() USR=() SYS=()
bench_target() {
    local name="$1" url="$2" out="$TMP/wrk-$1.txt"
    log "$name: warm-up $WARMUP"
    wrk_run "$url" "$WARMUP" "$WARMUP_S" >/dev/null ||
        log "$name: warm-up run failed (continuing to the measured run)"
    log "$name: measuring $DURATION, $CONNECTIONS connections, $THREADS wrk thread(s)"
    local pids u0 s0 u1 s1 n
    read -ra pids <<<"$(server_pids "$name")"
    read -r u0 s0 <<<"$(cpu_ticks "${pids[@]}")"
    local perf_pid=""
    if [[ -n "$PROFILE" ]]; then
        timeout --foreground $((DURATION_S + 60)) perf record -q -e cpu-clock -F 1999 -g \
            -o "$PROFILE/$name-$round.perf" -p "$(IFS=,; echo "${pids[*]}")" \
            -- sleep "$DURATION_S" 2>/dev/null &
        perf_pid=$!
    fi
    wrk_run "$url" "$DURATION" "$DURATION_S" >"$out" || { cat "$out" >&2; die "$name: wrk failed"; }
    [[ -z "$perf_pid" ]] || wait "$perf_pid" || log "$name: perf record failed"
    read -r u1 s1 <<<"$(cpu_ticks "${pids[@]}")"
    local r rps p50 p99 errs cpu usr sys
    r="$(parse_wrk "$out")" || { cat "$out" >&2; die "$name: cannot parse wrk output"; }
    read -r rps p50 p99 errs <<<"$r"
    # CPU per request: steadier than req/s on a shared machine (see BENCHMARKING.md); user
    # space and kernel apart (the kernel's part is the sockets: the same syscalls for Weir and
    # nginx).
    n="$(awk '/ requests in / { print $1 }' "$out")"
    per_req() { awk -v c="$1" -v hz="$HZ" -v n="${n:-0}" 'BEGIN { printf "%.1f", (n > 0) ? c / hz * 1e6 / n : 0 }'; }
    cpu="$(per_req $((u1 + s1 - u0 - s0)))" usr="$(per_req $((u1 - u0)))" sys="$(per_req $((s1 - s0)))"
    RPS[$name]+="$rps " P50[$name]+="$p50 " P99[$name]+="$p99 " CPU[$name]+="$cpu "
    USR[$name]+="$usr " SYS[$name]+="$sys "
    ERRS[$name]=$((${ERRS[$name]:-0} + errs))
}

for ((round = 1; round <= ROUNDS; round++)); do
    ((ROUNDS > 1)) && log "round $round of $ROUNDS"
    bench_target direct "http://127.0.0.1:$UP_PORT/"
    bench_target weir "http://127.0.0.1:$WEIR_PORT/"
    bench_target weir-1-filter "http://127.0.0.1:$WEIR1_PORT/"
    bench_target weir-3-filters "http://127.0.0.1:$WEIR3_PORT/"
    bench_target weir-3-pass "http://127.0.0.1:$WEIRP_PORT/"
    bench_target nginx "http://127.0.0.1:$NGINX_PORT/"
    WRK_HEADERS=(-H "x-api-key: bench-key")
    bench_target weir-gateway "http://127.0.0.1:$WEIRG_PORT/api/items"
    bench_target nginx-gateway "http://127.0.0.1:$NGINXG_PORT/api/items"
    WRK_HEADERS=()
done

# The median of a space-separated list of numbers.
median() {
    tr ' ' '\n' <<<"$1" | awk 'NF { a[n++] = $1 } END {
        if (n == 0) exit 1
        # insertion sort: a handful of values
        for (i = 1; i < n; i++) { v = a[i]; for (j = i - 1; j >= 0 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v }
        print (n % 2) ? a[int(n / 2)] : (a[n / 2 - 1] + a[n / 2]) / 2
    }'
}
# Per round, FORMULA over the lists given as awk variables A and B (one value per round
# each): prints "median (rounds: r1 r2 ...)", each value with FMT. A round where a value
# is 0 (no CPU reading) is left out.
per_round() {
    local fmt="$1" formula="$2"
    shift 2
    awk -v fmt="$fmt" "$@" 'BEGIN {
        k = split(A, a, " "); split(B, b, " "); n = 0
        for (r = 1; r <= k; r++) {
            if (a[r] == 0 || b[r] == 0) continue
            i = r; n++; v[n] = '"$formula"'; s[n] = v[n]
        }
        if (n == 0) { print "n/a"; exit }
        for (i = 2; i <= n; i++) { x = s[i]; for (j = i - 1; j >= 1 && s[j] > x; j--) s[j + 1] = s[j]; s[j + 1] = x }
        m = (n % 2) ? s[(n + 1) / 2] : (s[n / 2] + s[n / 2 + 1]) / 2
        out = sprintf(fmt, m)
        if (n > 1) {
            out = out " (rounds:"
            for (i = 1; i <= n; i++) out = out " " sprintf(fmt, v[i])
            out = out ")"
        }
        print out
    }'
}

# --- h2load (optional) ---------------------------------------------------------------------
# h2c with prior knowledge (h2load's default for http:// URLs). Only direct and Weir: nginx
# would need a separate h2c server block, which would not be the same config any more.
# The warm-up is a separate short run, like wrk's: h2load 1.52's --warm-up-time measures 0 req/s.
h2load_run() {
    local url="$1" dur="$2" dur_s="$3"
    timeout --foreground --kill-after=5 "$((dur_s + 30))" \
        "${LOADGEN[@]}" h2load -t "$THREADS" -c "$CONNECTIONS" -m 10 -D "$dur" -N 5 "$url"
}
declare -A H2RPS=() H2FAIL=()
if ((H2)); then
    if command -v h2load >/dev/null; then
        for t in direct weir; do
            port="$UP_PORT"
            [[ "$t" == weir ]] && port="$WEIR_PORT"
            out="$TMP/h2load-$t.txt"
            log "$t (h2c): warm-up $WARMUP"
            h2load_run "http://127.0.0.1:$port/" "$WARMUP" "$WARMUP_S" >/dev/null 2>&1 ||
                log "$t (h2c): warm-up run failed (continuing to the measured run)"
            log "$t (h2c): measuring $DURATION, $CONNECTIONS clients x 10 streams"
            h2load_run "http://127.0.0.1:$port/" "$DURATION" "$DURATION_S" >"$out" 2>&1 ||
                { cat "$out" >&2; die "$t: h2load failed"; }
            # "finished in 10.00s, 12345.67 req/s, 1.23MB/s"
            H2RPS[$t]="$(awk '/^finished in/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^req\/s/) print $i }' "$out")"
            # "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            H2FAIL[$t]="$(awk '/^requests:/ { for (i = 2; i < NF; i++) if ($(i + 1) ~ /^failed/) print $i }' "$out")"
            [[ -n "${H2RPS[$t]}" && -n "${H2FAIL[$t]}" ]] || { cat "$out" >&2; die "$t: cannot parse h2load output"; }
        done
    else
        log "--h2: h2load not found, skipping the h2c runs"
    fi
fi

# --- report --------------------------------------------------------------------------------
report="$TMP/report.md"
{
    echo "# Load bench, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    commit_line
    echo "- machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || echo unknown CPU), Linux $(uname -r)"
    echo "- tools: $(wrk --version 2>&1 | awk 'NR == 1 { print $1, $2 }'), $(nginx -v 2>&1 | sed 's/^nginx version: //')"
    echo "- settings: DURATION=$DURATION CONNECTIONS=$CONNECTIONS THREADS=$THREADS WORKERS=$WORKERS WARMUP=$WARMUP PIN=$PIN ROUNDS=$ROUNDS"
    [[ -z "$PROFILE" ]] || echo "- sampled with \`perf record\` during each measured run (PROFILE=$PROFILE): every figure is slowed by the sampling"
    echo
    ((ROUNDS > 1)) && echo "Each figure is the median of $ROUNDS rounds (every target once per round, in order);" &&
        echo "the ratios below are taken within each round, then their median." && echo
    echo "| target | req/s | p50 (µs) | p99 (µs) | throughput vs direct | added p99 vs direct (µs) | server CPU per request (µs) | of which user / kernel (µs) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    declare -A M_RPS=() M_P50=() M_P99=() M_CPU=() M_USR=() M_SYS=()
    for t in direct weir weir-1-filter weir-3-filters weir-3-pass nginx weir-gateway nginx-gateway; do
        M_RPS[$t]="$(median "${RPS[$t]}")" M_P50[$t]="$(median "${P50[$t]}")"
        M_P99[$t]="$(median "${P99[$t]}")" M_CPU[$t]="$(median "${CPU[$t]}")"
        M_USR[$t]="$(median "${USR[$t]}")" M_SYS[$t]="$(median "${SYS[$t]}")"
    done
    for t in direct weir weir-1-filter weir-3-filters weir-3-pass nginx weir-gateway nginx-gateway; do
        awk -v t="$t" -v r="${M_RPS[$t]}" -v p50="${M_P50[$t]}" -v p99="${M_P99[$t]}" \
            -v dr="${M_RPS[direct]}" -v dp99="${M_P99[direct]}" -v cpu="${M_CPU[$t]}" \
            -v usr="${M_USR[$t]}" -v sys="${M_SYS[$t]}" 'BEGIN {
                printf "| %s | %.0f | %d | %d | %.1f %% | %+d | %s | %s / %s |\n", t, r, p50, p99, 100 * r / dr, p99 - dp99, cpu, usr, sys
            }'
    done
    echo
    echo "Server CPU per request: the CPU time (user + system) of the process serving the target"
    echo "(the upstream for direct, else Weir or nginx's master and workers) over the measured run,"
    echo "divided by the requests wrk counted; each part is its own median over the rounds."
    echo
    echo "weir/nginx throughput ratio: $(per_round %.2f 'a[i] / b[i]' -v A="${RPS[weir]}" -v B="${RPS[nginx]}")"
    echo "CPU per request, weir/nginx: $(per_round %.2f 'a[i] / b[i]' -v A="${CPU[weir]}" -v B="${CPU[nginx]}") (user space $(per_round %.2f 'a[i] / b[i]' -v A="${USR[weir]}" -v B="${USR[nginx]}"), kernel $(per_round %.2f 'a[i] / b[i]' -v A="${SYS[weir]}" -v B="${SYS[nginx]}")); gateway, weir/nginx: $(per_round %.2f 'a[i] / b[i]' -v A="${CPU[weir-gateway]}" -v B="${CPU[nginx-gateway]}")"
    echo
    echo "filter chain cost (throughput vs no filter, %): 1 filter $(per_round %.1f '100 * (1 - b[i] / a[i])' -v A="${RPS[weir]}" -v B="${RPS[weir-1-filter]}"), 3 filters $(per_round %.1f '100 * (1 - b[i] / a[i])' -v A="${RPS[weir]}" -v B="${RPS[weir-3-filters]}") (target 15); 3 pass filters, the boundary alone: $(per_round %.1f '100 * (1 - b[i] / a[i])' -v A="${RPS[weir]}" -v B="${RPS[weir-3-pass]}")"
    echo
    echo "gateway chain (router + auth + ratelimit): $(per_round %.2f 'b[i] / a[i]' -v A="${RPS[weir]}" -v B="${RPS[weir-gateway]}") of Weir without filters (target 0.85), $(per_round %.2f 'b[i] / a[i]' -v A="${RPS[nginx-gateway]}" -v B="${RPS[weir-gateway]}") of nginx doing routing plus a header check"
    echo
    echo "added p99 vs direct within each round (µs; the table subtracts the medians), weir: $(per_round %d 'b[i] - a[i]' -v A="${P99[direct]}" -v B="${P99[weir]}"); nginx: $(per_round %d 'b[i] - a[i]' -v A="${P99[direct]}" -v B="${P99[nginx]}")"
    for t in direct weir weir-1-filter weir-3-filters weir-3-pass nginx weir-gateway nginx-gateway; do
        if ((ERRS[$t] > 0)); then
            echo
            echo "**warning:** $t had ${ERRS[$t]} socket errors or non-2xx/3xx responses (see wrk output)"
        fi
    done
    if ((${#H2RPS[@]})); then
        echo
        echo "h2c (h2load -c $CONNECTIONS -m 10 -D $DURATION, prior knowledge):"
        echo
        echo "| target | req/s |"
        echo "|---|---:|"
        for t in direct weir; do
            printf '| %s | %.0f |\n' "$t" "${H2RPS[$t]}"
        done
        for t in direct weir; do
            if ((H2FAIL[$t] > 0)); then
                echo
                echo "**warning:** $t (h2c) had ${H2FAIL[$t]} failed requests (see h2load output)"
            fi
        done
    fi
} >"$report"

mkdir -p bench/results
result="bench/results/load-$(date -u +%Y-%m-%dT%H%M%SZ).md"
cp "$report" "$result"
echo
cat "$report"
echo
echo "written to $result"
