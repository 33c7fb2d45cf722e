#!/usr/bin/env bash
# Builds Caddy with chat_proxy from this checkout using xcaddy, the way an
# operator builds a custom Caddy. Usage: scripts/xcaddy-build.sh [output]
#
# The module path github.com/chatproxy/caddy-chatproxy is not published, so
# the Go module proxy cannot serve it and xcaddy must run with GOPROXY=off.
# This script first fills the module cache (through the proxy) with
# everything xcaddy's generated build module needs: this checkout's
# dependencies, and Caddy's and caddy-ratelimit's own pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
output=${1:-./caddy}
caddy_version=v2.11.9
ratelimit=github.com/mholt/caddy-ratelimit@v0.1.0

go mod download
warm=$(mktemp -d)
trap 'rm -rf "$warm"' EXIT
cat > "$warm/main.go" <<'GO'
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-ratelimit"
)

func main() { caddycmd.Main() }
GO
(cd "$warm" && go mod init caddy >/dev/null 2>&1 &&
	go get "github.com/caddyserver/caddy/v2@$caddy_version" "$ratelimit" >/dev/null 2>&1 &&
	go mod tidy >/dev/null 2>&1)

GOPROXY=off xcaddy build "$caddy_version" \
	--output "$output" \
	--with github.com/chatproxy/caddy-chatproxy=./ \
	--with "$ratelimit"
