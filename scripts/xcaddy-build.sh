#!/usr/bin/env bash
# Builds Caddy with chat_proxy from this checkout using xcaddy, the way an
# operator builds a custom Caddy. Usage: scripts/xcaddy-build.sh [output]
#
# The module path github.com/chatproxy/caddy-chatproxy is not published, so
# the Go module proxy cannot serve it and xcaddy must run with GOPROXY=off.
# This script first fills the module cache (through the proxy) with
# everything xcaddy's generated build module needs, by resolving the same
# build with the proxy on: Caddy, caddy-ratelimit and this checkout
# together. That also verifies (and caches) the checksums of the versions
# this checkout raises Caddy's dependencies to, which the offline build
# cannot look up.
set -euo pipefail
cd "$(dirname "$0")/.."
output=${1:-./caddy}
caddy_version=v2.11.9
ratelimit=github.com/mholt/caddy-ratelimit@v0.1.0

go mod download
warm=$(mktemp -d)
trap 'rm -rf "$warm"' EXIT
# Two passes, as xcaddy does: Caddy and caddy-ratelimit alone, then with
# this checkout, whose requirements raise some of their dependencies.
cat > "$warm/main.go" <<'GO'
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-ratelimit"
)

func main() { caddycmd.Main() }
GO
cat > "$warm/chatproxy.go.txt" <<'GO'
package main

import _ "github.com/chatproxy/caddy-chatproxy"
GO
repo=$(pwd)
(cd "$warm" && go mod init caddy >/dev/null 2>&1 &&
	go get "github.com/caddyserver/caddy/v2@$caddy_version" "$ratelimit" >/dev/null 2>&1 &&
	go mod tidy >/dev/null 2>&1 &&
	mv chatproxy.go.txt chatproxy.go &&
	go mod edit -require=github.com/chatproxy/caddy-chatproxy@v0.0.0 \
		-replace=github.com/chatproxy/caddy-chatproxy="$repo" &&
	go mod tidy >/dev/null 2>&1) || {
	echo "xcaddy-build: filling the module cache failed (is the Go module proxy reachable?)" >&2
	exit 1
}

GOPROXY=off xcaddy build "$caddy_version" \
	--output "$output" \
	--with github.com/chatproxy/caddy-chatproxy=./ \
	--with "$ratelimit"
