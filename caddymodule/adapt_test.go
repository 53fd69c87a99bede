package caddymodule

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite the golden adapt files")

// TestAdaptGolden adapts every testdata/adapt/*.caddyfile and compares the
// JSON with the .json file beside it (go test -update rewrites them). It
// pins the directive order (llm_billing before reverse_proxy without an
// order line), the JSON names and the global app.
func TestAdaptGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/adapt/*.caddyfile")
	require.NoError(t, err)
	require.NotEmpty(t, files, "no golden inputs")
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			in, err := os.ReadFile(f)
			require.NoError(t, err)
			out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(in, nil)
			require.NoError(t, err)
			assert.Empty(t, warnings, "warnings")
			var pretty bytes.Buffer
			require.NoError(t, json.Indent(&pretty, out, "", "\t"))
			pretty.WriteByte('\n')
			golden := strings.TrimSuffix(f, ".caddyfile") + ".json"
			if *update {
				require.NoError(t, os.WriteFile(golden, pretty.Bytes(), 0o644))
			}
			want, err := os.ReadFile(golden)
			require.NoError(t, err)
			assert.Equal(t, string(want), pretty.String(), "adapted JSON differs from %s (go test -update rewrites it)", golden)
		})
	}
}
