//go:build !unix

package chatproxy

import "testing"

// drillNofile: descriptor limits are a Unix matter; elsewhere the drill
// does not run.
func drillNofile(t *testing.T, need uint64) {
	t.Skipf("the descriptor limit check needs a Unix system")
}
