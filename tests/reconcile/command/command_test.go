// Package command tests the caddy llm-billing-reconcile subcommand as Caddy
// runs it: the registered cobra command, its flags and its exit statuses.
package command

import (
	"bytes"
	"context"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/caddymodule"
	fixture "github.com/trollllm/caddy-llm-billing/tests/reconcile"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

// execute runs the registered subcommand with args and returns the exit
// status caddycmd.Main would exit with, what it printed and its error.
func execute(t *testing.T, args ...string) (int, string, error) {
	t.Helper()
	c, ok := caddycmd.Commands()[caddymodule.ReconcileCommand]
	if !ok {
		t.Fatalf("caddy subcommand %s is not registered", caddymodule.ReconcileCommand)
	}
	cmd := &cobra.Command{Use: c.Name + " " + c.Usage, Short: c.Short, Long: c.Long, SilenceUsage: true}
	c.CobraFunc(cmd)
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return exitStatus(err), out.String(), err
}

// exitStatus is what caddycmd.Main does with a command's error: the
// ExitCode of its (unexported) exit error, 1 for any other error.
func exitStatus(err error) int {
	if err == nil {
		return 0
	}
	v := reflect.ValueOf(err)
	if v.Kind() == reflect.Pointer && v.Elem().Kind() == reflect.Struct {
		if f := v.Elem().FieldByName("ExitCode"); f.IsValid() && f.CanInt() {
			return int(f.Int())
		}
	}
	return 1
}

func TestSubcommand(t *testing.T) {
	srv := testdb.StartForTest(t)
	ctx := context.Background()
	client, err := srv.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Disconnect(ctx) })
	db := client.Database("cmd")
	if _, err := fixture.Seed(ctx, db); err != nil {
		t.Fatal(err)
	}
	uri := srv.URI()
	base := filepath.Join(t.TempDir(), "base.json")
	common := []string{"--mongodb-uri", uri, "--database", db.Name(), "--recheck-delay", "0"}

	t.Run("help", func(t *testing.T) {
		code, out, err := execute(t, "--help")
		if code != 0 || err != nil || !strings.Contains(out, "--save-baseline") || !strings.Contains(out, "Exit status") {
			t.Fatalf("exit %d, %v\n%s", code, err, out)
		}
	})

	t.Run("no drift", func(t *testing.T) {
		code, out, err := execute(t, append(common, "--since", "24h", "--save-baseline", base, "--max-hold-age", "30m")...)
		if code != 0 || err != nil || !strings.Contains(out, "OK: ") || !strings.Contains(out, "log rows checked:  4") {
			t.Fatalf("exit %d, %v\n%s", code, err, out)
		}
		if strings.Contains(out, uri) {
			t.Fatal("the URI is printed")
		}
	})

	t.Run("defaults from the environment", func(t *testing.T) {
		t.Setenv("MONGODB_URI", uri)
		t.Setenv("MONGODB_DB_NAME", db.Name())
		code, out, err := execute(t, "--json", "--recheck-delay", "0")
		if code != 0 || err != nil || !strings.Contains(out, `"ok": true`) {
			t.Fatalf("exit %d, %v\n%s", code, err, out)
		}
	})

	t.Run("drift", func(t *testing.T) {
		if _, err := db.Collection("usersNew").UpdateOne(ctx, bson.D{{Key: "_id", Value: "bob"}},
			bson.D{{Key: "$inc", Value: bson.D{{Key: "refCredits", Value: 0.01}}}}); err != nil {
			t.Fatal(err)
		}
		code, out, err := execute(t, append(common, "--baseline", base)...)
		if code != 1 || err == nil || !strings.Contains(out, "external-credit") || !strings.Contains(out, "$0.010000000") {
			t.Fatalf("exit %d, %v\n%s", code, err, out)
		}
		code, out, err = execute(t, append(common, "--baseline", base, "--allow-credit")...)
		if code != 0 || err != nil || !strings.Contains(out, "allowed (credit)") {
			t.Fatalf("--allow-credit: exit %d, %v\n%s", code, err, out)
		}
	})

	t.Run("errors", func(t *testing.T) {
		for _, args := range [][]string{
			{"--no-such-flag"},
			append(common, "--since", "yesterday"),
			append(common, "--max-hold-age", "-5m"),
			append(common, "extra-argument"),
			append(common, "--baseline", filepath.Join(t.TempDir(), "missing.json")),
			{"--mongodb-uri", "mongodb://admin:Sup3rSecretPw@127.0.0.1:1/?serverSelectionTimeoutMS=300"},
			{"--mongodb-uri", "mongodb://admin:Sup3rSecretPw@127.0.0.1:bad/"},
		} {
			code, out, err := execute(t, args...)
			if code != 2 || err == nil {
				t.Errorf("%q: exit %d, %v\n%s", args, code, err, out)
				continue
			}
			if strings.Contains(err.Error(), "Sup3rSecretPw") || strings.Contains(out, "Sup3rSecretPw") {
				t.Errorf("%q: the password leaked: %v\n%s", args, err, out)
			}
		}
		t.Setenv("MONGODB_URI", "")
		if code, _, err := execute(t); code != 2 || err == nil || !strings.Contains(err.Error(), "MONGODB_URI") {
			t.Errorf("no URI: exit %d, %v", code, err)
		}
	})
}
