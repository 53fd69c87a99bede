package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/trollllm/caddy-llm-billing/reconcile"
)

// ReconcileCommand is the name of the caddy subcommand that checks the
// billing ledger against the request logs and the balances.
const ReconcileCommand = "llm-billing-reconcile"

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name: ReconcileCommand,
		Usage: "[--mongodb-uri <uri>] [--database <name>] [--since <24h|RFC3339>] [--until <24h|RFC3339>] " +
			"[--baseline <file>] [--save-baseline <file>] [--allow-credit] [--max-hold-age <30m>] [--recheck-delay <3s>] [--json]",
		Short: "Checks that the LLM billing ledger, the request logs and the balances agree",
		Long: `
Reads the usersNew documents and the request_logs rows the llm_billing
gateway writes and proves, with exact integer arithmetic, that they agree:

  - per user and balance field, llmNet equals minus what the logged requests
    took (takenNano) minus the outstanding holds;
  - each log row in the window has chargedNano = sum of takenNano and
    costNano = chargedNano + shortfallNano, and no request is logged twice;
  - no hold is past its lease (or older than --max-hold-age);
  - no balance is negative, and, with --baseline, every balance moved only
    as the gateway moved it since the baseline was saved (--save-baseline).
    A positive movement (a top-up by the backend) is accepted with
    --allow-credit; anything else is drift.

The database is read only, never written. --since and --until take a
duration back from now (24h, 7d) or an RFC 3339 time; they bound the rows
checked one by one, while the ledger always uses every row.

The connection string comes from --mongodb-uri or $MONGODB_URI and is never
printed; the database from --database, $MONGODB_DB_NAME, or fproxy.

Exit status: 0 no drift, 1 drift found, 2 the check could not run.`,
		CobraFunc: func(cmd *cobra.Command) {
			fs := cmd.Flags()
			fs.String("mongodb-uri", "", "MongoDB connection string (default $MONGODB_URI)")
			fs.String("database", "", "database name (default $MONGODB_DB_NAME, else fproxy)")
			fs.String("since", "", "check the log rows created since this time: a duration back from now or RFC 3339 (default: all time)")
			fs.String("until", "", "check the log rows created before this time: a duration back from now or RFC 3339 (default: no end)")
			fs.String("baseline", "", "compare the balances with this baseline file")
			fs.String("save-baseline", "", "write this run's baseline to this file (may be the --baseline file)")
			fs.Bool("allow-credit", false, "accept positive balance movements the gateway did not make (top-ups)")
			fs.String("max-hold-age", "", "a hold taken longer ago than this is a leftover even before its lease ends (e.g. 30m)")
			fs.String("recheck-delay", "3s", "read again, after this delay, the users whose ledger disagrees (0 disables)")
			fs.Bool("json", false, "write the report as JSON")
			cmd.RunE = func(cmd *cobra.Command, args []string) error {
				return caddycmd.WrapCommandFuncForCobra(func(fl caddycmd.Flags) (int, error) {
					return cmdReconcile(fl, args, cmd.OutOrStdout())
				})(cmd, args)
			}
			// A bad flag is an error (2), not drift (1).
			cmd.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
				return caddycmd.WrapCommandFuncForCobra(func(caddycmd.Flags) (int, error) {
					return reconcile.ExitError, err
				})(c, nil)
			})
		},
	})
}

// cmdReconcile turns the flags into a reconcile.CLI and runs it.
func cmdReconcile(fl caddycmd.Flags, args []string, stdout io.Writer) (int, error) {
	if len(args) > 0 {
		return reconcile.ExitError, fmt.Errorf("unexpected argument %q (every option is a flag)", args[0])
	}
	now := time.Now()
	c := reconcile.CLI{
		URI:              fl.String("mongodb-uri"),
		Database:         fl.String("database"),
		BaselineFile:     fl.String("baseline"),
		SaveBaselineFile: fl.String("save-baseline"),
		JSON:             fl.Bool("json"),
		Stdout:           stdout,
	}
	if c.URI == "" {
		c.URI = os.Getenv("MONGODB_URI")
	}
	if c.URI == "" {
		return reconcile.ExitError, errors.New("no MongoDB URI: give --mongodb-uri or set MONGODB_URI")
	}
	if c.Database == "" {
		c.Database = os.Getenv("MONGODB_DB_NAME")
	}
	var err error
	o := &c.Options
	o.Now = now
	o.AllowCredit = fl.Bool("allow-credit")
	if o.Since, err = parseWhen("since", fl.String("since"), now); err != nil {
		return reconcile.ExitError, err
	}
	if o.Until, err = parseWhen("until", fl.String("until"), now); err != nil {
		return reconcile.ExitError, err
	}
	if o.MaxHoldAge, err = parseFlagDuration("max-hold-age", fl.String("max-hold-age")); err != nil {
		return reconcile.ExitError, err
	}
	if o.RecheckDelay, err = parseFlagDuration("recheck-delay", fl.String("recheck-delay")); err != nil {
		return reconcile.ExitError, err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return c.Run(ctx)
}

// parseWhen reads --since or --until: a duration back from now ("24h",
// "7d"), an RFC 3339 time, or a date (midnight UTC).
func parseWhen(flag, s string, now time.Time) (time.Time, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := caddy.ParseDuration(s); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("--%s %s: want a duration back from now, not a negative one", flag, s)
		}
		return now.Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if t, err := time.Parse(time.DateOnly, s); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("--%s %q: want a duration (24h, 7d) or an RFC 3339 time (2026-05-01T00:00:00Z)", flag, s)
}

func parseFlagDuration(flag, s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "0" {
		return 0, nil
	}
	d, err := caddy.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("--%s %q: want a duration such as 30m", flag, s)
	}
	return d, nil
}
