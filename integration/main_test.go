package integration

import (
	"os"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// childConfigEnv, when set, makes the test binary a Caddy process running
// the Caddyfile it names (`caddy run --config … --adapter caddyfile`)
// instead of running tests. The binary holds Caddy, the standard modules
// and chat_proxy, so a test can start a real Caddy it may stop — which
// the in-process server of caddytest cannot do, since stopping Caddy ends
// its process.
const childConfigEnv = "CHATPROXY_IT_CADDY_CONFIG"

func TestMain(m *testing.M) {
	if cfg := os.Getenv(childConfigEnv); cfg != "" {
		os.Args = []string{"caddy", "run", "--config", cfg, "--adapter", "caddyfile"}
		caddycmd.Main() // exits the process
		return
	}
	os.Exit(m.Run())
}
