package certstorage

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     MongoDB
		err      string
	}{
		{name: "both", in: "mongodb {\n uri {env.MONGODB_URI}\n database {env.MONGODB_DB_NAME}\n}",
			want: MongoDB{URI: "{env.MONGODB_URI}", Database: "{env.MONGODB_DB_NAME}"}},
		{name: "empty block parses (Validate refuses)", in: "mongodb", want: MongoDB{}},
		{name: "inline argument", in: "mongodb x", err: "wrong argument count"},
		{name: "unknown", in: "mongodb {\n collection x\n}", err: "unrecognized subdirective 'collection'"},
		{name: "two values", in: "mongodb {\n uri a b\n}", err: "wrong argument count"},
		{name: "duplicate", in: "mongodb {\n database a\n database b\n}", err: "database already specified"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var m MongoDB
			err := m.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
			if tc.err != "" {
				assert.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, m)
		})
	}
}

// TestAdaptGlobalOption pins the JSON the global option adapts to: the
// module name and placeholders left for Provision to resolve.
func TestAdaptGlobalOption(t *testing.T) {
	in := "{\n\tstorage mongodb {\n\t\turi {env.MONGODB_URI}\n\t\tdatabase {env.MONGODB_DB_NAME}\n\t}\n}\n"
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(in), nil)
	require.NoError(t, err)
	assert.Empty(t, warnings)
	var cfg struct {
		Storage json.RawMessage `json:"storage"`
	}
	require.NoError(t, json.Unmarshal(out, &cfg))
	assert.JSONEq(t, `{"module":"mongodb","uri":"{env.MONGODB_URI}","database":"{env.MONGODB_DB_NAME}"}`, string(cfg.Storage))
}

func TestValidate(t *testing.T) {
	assert.ErrorContains(t, (&MongoDB{Database: "d"}).Validate(), "uri is required")
	assert.ErrorContains(t, (&MongoDB{URI: "mongodb://h"}).Validate(), "database is required")
	assert.NoError(t, (&MongoDB{URI: "{env.U}", Database: "{env.D}"}).Validate())
}

// TestProvision: placeholders resolve at Provision; an unset variable, a
// bad database name or a bad URI fail without echoing the URI, and leave
// no pooled client behind; two modules with one URI share one client.
func TestProvision(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	const secret = "mongodb://user:s3cret@127.0.0.1:1/"
	t.Setenv("CERTSTORAGE_TEST_URI", secret)
	t.Setenv("CERTSTORAGE_TEST_DB", "certs")

	for _, tc := range []struct {
		m   MongoDB
		err string
	}{
		{MongoDB{URI: "{env.CERTSTORAGE_TEST_UNSET}", Database: "d"}, "uri:"},
		{MongoDB{URI: "{env.CERTSTORAGE_TEST_URI}", Database: "a.b"}, "database: invalid name"},
		{MongoDB{URI: "postgres://user:s3cret@h/", Database: "d"}, "uri:"},
	} {
		err := tc.m.Provision(ctx)
		assert.ErrorContains(t, err, tc.err)
		if err != nil {
			assert.NotContains(t, err.Error(), "s3cret")
		}
		assert.NoError(t, tc.m.Cleanup())
	}

	a := MongoDB{URI: "{env.CERTSTORAGE_TEST_URI}", Database: "{env.CERTSTORAGE_TEST_DB}"}
	b := a
	require.NoError(t, a.Provision(ctx))
	require.NoError(t, b.Provision(ctx))
	sa, err := a.CertMagicStorage()
	require.NoError(t, err)
	sb, err := b.CertMagicStorage()
	require.NoError(t, err)
	assert.Same(t, sa.(*Store).db.Client(), sb.(*Store).db.Client(), "one client per URI")
	assert.Equal(t, "MongoDBStorage:certs", sa.(*Store).String())
	key := a.poolKey
	refs, ok := clients.References(key)
	assert.True(t, ok)
	assert.Equal(t, 2, refs)
	require.NoError(t, a.Cleanup())
	require.NoError(t, a.Cleanup(), "Cleanup is idempotent")
	require.NoError(t, b.Cleanup())
	_, ok = clients.References(key)
	assert.False(t, ok, "the last Cleanup releases the client")
}
