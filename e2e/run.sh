#!/usr/bin/env bash
# Browser end-to-end tests: Debian's chromium driven by playwright-core
# (node's test runner) against a Caddy built from this checkout.
#
#   bash e2e/run.sh                         # all tests
#   bash e2e/run.sh e2e/tests/demo.test.mjs  # some
#
# Starts, on 127.0.0.1 and free high ports: a stand-in n8n (e2e/stand-in-n8n.mjs)
# and Caddy with e2e/Caddyfile (the chat site with the demo page, an allowed
# origin with the official @n8n/chat widget, an origin that is not allowed).
# Screenshots, logs and the TAP report go to e2e/artifacts/ (git-ignored).
# Everything started here is stopped on exit; the exit code is the tests'.
set -euo pipefail
tests=()
for t in "$@"; do tests+=("$(realpath "$t")"); done
cd "$(dirname "$0")/.."
repo=$PWD
e2e=$repo/e2e
artifacts=$e2e/artifacts

say() { printf -- '-- e2e: %s\n' "$*"; }

if [ ! -x /usr/bin/chromium ]; then
	say "installing Debian's chromium"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi
/usr/bin/chromium --version 2>/dev/null || true
node --version

say "npm ci"
(cd "$e2e" && npm ci --no-audit --no-fund --loglevel=error)

work=$(mktemp -d)
# cleanup stops this script's own background jobs that are still running
# (the stand-in n8n, Caddy, the test runner), by the ids bash keeps for them.
cleanup() {
	local status=$?
	local running
	running=$(jobs -pr)
	if [ -n "$running" ]; then
		kill $running 2>/dev/null || true
		wait $running 2>/dev/null || true
	fi
	rm -rf "$work"
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$artifacts"
mkdir -p "$artifacts"

# E2E_CADDY may name a Caddy already built from this checkout (for example
# the one .ci/run builds with xcaddy); otherwise build one.
caddy=${E2E_CADDY:-}
if [ -n "$caddy" ]; then
	say "using $caddy"
else
	say "building caddy from this checkout"
	go build -o "$work/caddy" ./cmd/caddy
	caddy=$work/caddy
fi
"$caddy" list-modules | grep -x 'http.handlers.chat_proxy' >/dev/null

# Four distinct free ports above the kernel's ephemeral range (so no
# outgoing connection can take one between picking and binding), held
# together while they are picked.
pick_ports() {
	node -e '
const net = require("node:net");
let low = 61000;
try {
	const high = Number(require("node:fs").readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[1]);
	if (high > 0 && high < 65000) low = high + 1;
} catch {}
const picked = [];
const tryPort = () => {
	const port = low + Math.floor(Math.random() * (65535 - low));
	if (picked.some((s) => s.address().port === port)) return tryPort();
	const s = net.createServer();
	s.once("error", tryPort);
	s.listen(port, "127.0.0.1", () => {
		picked.push(s);
		if (picked.length < 4) return tryPort();
		console.log(picked.map((x) => x.address().port).join(" "));
		for (const x of picked) x.close();
	});
};
tryPort();'
}

wait_for() { # url what pid (up to about 30 s, or until pid exits)
	for _ in $(seq 1 300); do
		if node -e 'fetch(process.argv[1]).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))' "$1"; then
			return 0
		fi
		kill -0 "$3" 2>/dev/null || break
		sleep 0.1
	done
	say "$2 did not come up at $1"
	return 1
}

# Fresh secrets per run, read by Caddy through {env.*} placeholders.
E2E_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
E2E_SESSION_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
E2E_IDENTITY_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export E2E_JWT_SECRET E2E_SESSION_SECRET E2E_IDENTITY_SECRET
export E2E_REPO=$repo E2E_DIR=$e2e E2E_ARTIFACTS=$artifacts

# start_servers starts the stand-in n8n and Caddy on fresh ports; it fails
# (leaving nothing running) if either does not come up.
start_servers() {
	read -r E2E_API_PORT E2E_WIDGET_PORT E2E_OTHER_PORT E2E_N8N_PORT < <(pick_ports)
	export E2E_API_PORT E2E_WIDGET_PORT E2E_OTHER_PORT E2E_N8N_PORT
	export E2E_API_ORIGIN=http://127.0.0.1:$E2E_API_PORT
	export E2E_WIDGET_ORIGIN=http://127.0.0.1:$E2E_WIDGET_PORT
	export E2E_OTHER_ORIGIN=http://127.0.0.1:$E2E_OTHER_PORT
	export E2E_N8N_URL=http://127.0.0.1:$E2E_N8N_PORT
	rm -rf "$work/data" "$work/config" "$work/home" "$artifacts/caddy-access.log"
	mkdir -p "$work/data" "$work/config" "$work/home"

	say "stand-in n8n on $E2E_N8N_URL"
	node "$e2e/stand-in-n8n.mjs" >"$artifacts/stand-in-n8n.log" 2>&1 &
	n8n_pid=$!
	if ! wait_for "$E2E_N8N_URL/__ready" "the stand-in n8n" "$n8n_pid"; then
		cat "$artifacts/stand-in-n8n.log"
		kill "$n8n_pid" 2>/dev/null || true
		wait "$n8n_pid" 2>/dev/null || true
		return 1
	fi

	say "caddy: chat site $E2E_API_ORIGIN, widget page $E2E_WIDGET_ORIGIN, other origin $E2E_OTHER_ORIGIN"
	XDG_DATA_HOME=$work/data XDG_CONFIG_HOME=$work/config HOME=$work/home \
		"$caddy" run --config "$e2e/Caddyfile" --adapter caddyfile >"$artifacts/caddy.log" 2>&1 &
	caddy_pid=$!
	if ! wait_for "$E2E_API_ORIGIN/health" "caddy" "$caddy_pid"; then
		grep -v '"level":"info"' "$artifacts/caddy.log" | tail -n 20 || true
		kill "$n8n_pid" "$caddy_pid" 2>/dev/null || true
		wait "$n8n_pid" "$caddy_pid" 2>/dev/null || true
		return 1
	fi
}

started=
for attempt in 1 2 3; do
	if start_servers; then started=1; break; fi
	say "start attempt $attempt failed; trying other ports"
done
[ -n "$started" ] || { say "could not start the servers"; exit 1; }

say "node --test"
# One test at a time (they share the stand-in n8n's counters), each within
# 90 s, the whole run within 4 minutes whatever happens.
# (In the background and waited for, so a signal to this script stops it
# at once through the trap.)
timeout --kill-after=10 240 node --test --test-concurrency=1 --test-timeout=90000 \
	--test-reporter=spec --test-reporter-destination=stdout \
	--test-reporter=tap --test-reporter-destination="$artifacts/results.tap" \
	"${tests[@]}" &
test_pid=$!
status=0
wait "$test_pid" || status=$?
say "artifacts in e2e/artifacts/: $(cd "$artifacts" && ls | tr '\n' ' ')"
if [ "$status" -ne 0 ]; then
	say "FAILED (exit $status); caddy log tail:"
	grep -v '"logger":"http.log.access' "$artifacts/caddy.log" | tail -n 40 || true
fi
passed=$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$artifacts/results.tap" 2>/dev/null | tail -n1 || true)
failed=$(sed -n 's/^# \(fail\|cancelled\) \([0-9]*\)$/\2/p' "$artifacts/results.tap" 2>/dev/null | awk '{n += $1} END {print n + 0}' || true)
if [ "$status" -ne 0 ] && [ "${failed:-0}" -eq 0 ]; then failed=1; fi
echo "e2e: ${passed:-0} passed, ${failed} failed"
exit "$status"
