package reconcile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// Exit statuses of the reconciliation command.
const (
	// ExitOK: the check ran and found no drift.
	ExitOK = 0
	// ExitDrift: the check ran and found drift.
	ExitDrift = 1
	// ExitError: the check could not run (bad options, unreachable
	// database, unreadable baseline, ...).
	ExitError = 2
)

// DefaultDatabase is the database read when none is named, as the
// llm_billing app's default.
const DefaultDatabase = "fproxy"

// DefaultConnectTimeout bounds the connection to the database.
const DefaultConnectTimeout = 20 * time.Second

// CLI is one run of the reconciliation command, with its options resolved:
// the caddy llm-billing-reconcile subcommand fills it from its flags and
// calls Run. Errors it returns never contain the URI or its credentials.
type CLI struct {
	// URI is the MongoDB connection string (required).
	URI string
	// Database is the database name; empty means DefaultDatabase.
	Database string
	// Options are passed to [Run]; Options.Baseline is set from
	// BaselineFile.
	Options Options
	// BaselineFile, when set, is a baseline to compare the balances with.
	BaselineFile string
	// SaveBaselineFile, when set, receives the baseline of this run (even
	// when drift is found). It may name the same file as BaselineFile, for
	// a rolling checkpoint.
	SaveBaselineFile string
	// JSON selects the JSON report instead of the text one.
	JSON bool
	// Stdout receives the report; nil means os.Stdout.
	Stdout io.Writer
	// ConnectTimeout bounds the connection; zero means
	// DefaultConnectTimeout.
	ConnectTimeout time.Duration
}

// Run connects, checks, writes the report and saves the baseline. It
// returns ExitOK, ExitDrift with an error that counts the drift items, or
// ExitError with the reason the check could not run.
func (c *CLI) Run(ctx context.Context) (int, error) {
	code, err := c.run(ctx)
	if err != nil {
		err = errors.New(redact(err.Error(), c.URI))
	}
	return code, err
}

// run is Run before its error is redacted: it reads the baseline, connects,
// checks, writes the report and saves the baseline.
func (c *CLI) run(ctx context.Context) (int, error) {
	if c.URI == "" {
		return ExitError, errors.New("no MongoDB URI: give --mongodb-uri or set MONGODB_URI")
	}
	opts := c.Options
	if c.BaselineFile != "" {
		b, err := ReadBaselineFile(c.BaselineFile)
		if err != nil {
			return ExitError, err
		}
		opts.Baseline = b
	}
	dbName := c.Database
	if dbName == "" {
		dbName = DefaultDatabase
	}

	client, err := c.connect(ctx)
	if err != nil {
		return ExitError, err
	}
	defer disconnect(ctx, client)

	rep, err := Run(ctx, client.Database(dbName), opts)
	if err != nil {
		return ExitError, err
	}
	if err := c.writeReport(rep); err != nil {
		return ExitError, fmt.Errorf("writing the report: %w", err)
	}
	if c.SaveBaselineFile != "" {
		if err := WriteBaselineFile(c.SaveBaselineFile, rep.Baseline()); err != nil {
			return ExitError, err
		}
	}
	if !rep.OK() {
		return ExitDrift, fmt.Errorf("drift found: %d item(s)", len(rep.Drift))
	}
	return ExitOK, nil
}

// connect returns a client connected to c.URI that answered a ping, both
// within the connect timeout. The caller disconnects it.
func (c *CLI) connect(ctx context.Context) (*mongo.Client, error) {
	timeout := c.ConnectTimeout
	if timeout <= 0 {
		timeout = DefaultConnectTimeout
	}
	// The defaults first: what the URI sets (serverSelectionTimeoutMS,
	// appName...) wins.
	client, err := mongo.Connect(options.Client().
		SetServerSelectionTimeout(timeout).SetConnectTimeout(timeout).SetAppName("llm-billing-reconcile").
		ApplyURI(c.URI))
	if err != nil {
		return nil, fmt.Errorf("connecting to MongoDB: %w", err)
	}
	pctx, cancel := context.WithTimeout(ctx, timeout)
	err = client.Ping(pctx, nil)
	cancel()
	if err != nil {
		disconnect(ctx, client)
		return nil, fmt.Errorf("connecting to MongoDB: %w", err)
	}
	return client, nil
}

// disconnect closes client, waiting up to 5 seconds even when ctx is done.
func disconnect(ctx context.Context, client *mongo.Client) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	_ = client.Disconnect(dctx)
}

// writeReport writes rep to c.Stdout (os.Stdout when nil), as JSON or text.
func (c *CLI) writeReport(rep *Report) error {
	out := c.Stdout
	if out == nil {
		out = os.Stdout
	}
	if c.JSON {
		return rep.WriteJSON(out)
	}
	return rep.WriteText(out)
}

// uriPattern matches a MongoDB connection string echoed in a message.
var uriPattern = regexp.MustCompile(`mongodb(?:\+srv)?://[^\s"'<>]*`)

// redact removes from msg the connection string uri, its credentials and
// its secret options, and any other connection string.
func redact(msg, uri string) string {
	for _, s := range uriSecrets(uri) {
		msg = strings.ReplaceAll(msg, s, "[redacted]")
	}
	return uriPattern.ReplaceAllString(msg, "mongodb://[redacted]")
}

// uriSecrets returns the parts of uri that must not be printed, longest
// first: the URI, its user information, the password (raw and unescaped)
// and the values of options that carry secrets. It parses by hand, so that
// a URI the driver refuses is handled too.
func uriSecrets(uri string) []string {
	var out []string
	add := func(s string) {
		// Shorter strings would garble the message more than they hide.
		if len(s) >= 3 && !slices.Contains(out, s) {
			out = append(out, s)
		}
		if u, err := url.PathUnescape(s); err == nil && u != s && len(u) >= 3 {
			out = append(out, u)
		}
	}
	if uri == "" {
		return nil
	}
	add(uri)
	rest := uri
	if i := strings.Index(rest, "://"); i >= 0 {
		rest = rest[i+3:]
	}
	query := ""
	if i := strings.LastIndex(rest, "?"); i >= 0 {
		rest, query = rest[:i], rest[i+1:]
	}
	// The user information ends at the last "@" (or, for a URI that
	// escapes badly, at the first one): both readings are hidden.
	for _, at := range []int{strings.LastIndex(rest, "@"), strings.Index(rest, "@")} {
		if at < 0 {
			continue
		}
		userinfo := rest[:at]
		add(userinfo)
		if j := strings.Index(userinfo, ":"); j >= 0 {
			add(userinfo[j+1:])
		}
	}
	for _, kv := range strings.FieldsFunc(query, func(r rune) bool { return r == '&' || r == ';' }) {
		k, v, _ := strings.Cut(kv, "=")
		lk := strings.ToLower(k)
		if strings.Contains(lk, "password") || strings.Contains(lk, "secret") || strings.Contains(lk, "token") ||
			strings.Contains(lk, "key") || lk == "authmechanismproperties" {
			add(v)
		}
	}
	slices.SortStableFunc(out, func(a, b string) int { return len(b) - len(a) })
	return out
}
