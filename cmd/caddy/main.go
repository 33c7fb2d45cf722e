// Command caddy is Caddy with its standard modules, the chat_proxy module
// and mholt/caddy-ratelimit, so `go run ./cmd/caddy run --config
// examples/Caddyfile` works without xcaddy.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-ratelimit"

	_ "github.com/chatproxy/caddy-chatproxy"
)

func main() {
	caddycmd.Main()
}
