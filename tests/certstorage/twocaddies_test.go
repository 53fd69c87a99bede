package certstorage

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/certstorage"
	"github.com/trollllm/caddy-llm-billing/tests/caddyproc"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

// envHold makes the test binary a process that takes the lock it names in
// the storage of MONGODB_URI and MONGODB_DB_NAME, prints "locked" and
// holds it (refreshing it) until it is killed.
const envHold = "CERTSTORAGE_TEST_HOLD_LOCK"

// maybeHoldLock runs the lock holder if envHold is set, and never returns
// then.
func maybeHoldLock() {
	name := os.Getenv(envHold)
	if name == "" {
		return
	}
	c, err := mongo.Connect(options.Client().ApplyURI(os.Getenv("MONGODB_URI")))
	if err == nil {
		err = certstorage.NewStore(c.Database(os.Getenv("MONGODB_DB_NAME"))).Lock(context.Background(), name)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "lock holder:", err)
		os.Exit(1)
	}
	fmt.Println("locked")
	time.Sleep(time.Hour)
	os.Exit(0)
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startCaddy starts a Caddy process serving host over HTTPS with a
// certificate from Caddy's internal CA, keeping its storage in the
// database dbname; it returns the process and its HTTPS address.
func startCaddy(t *testing.T, db *testdb.DB, dbname, host string) (*caddyproc.Proc, string) {
	t.Helper()
	admin, httpPort, httpsPort := freePort(t), freePort(t), freePort(t)
	cf := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	grace_period 1s
	default_bind 127.0.0.1
	http_port %d
	https_port %d
	skip_install_trust
	auto_https disable_redirects
	storage mongodb {
		uri {env.MONGODB_URI}
		database {env.MONGODB_DB_NAME}
	}
}

%s {
	tls internal
	respond "ok"
}
`, admin, httpPort, httpsPort, host)
	p := caddyproc.Start(t, caddyproc.Options{
		Caddyfile: cf,
		Env:       []string{"MONGODB_URI=" + db.URI(), "MONGODB_DB_NAME=" + dbname},
		AdminAddr: fmt.Sprintf("127.0.0.1:%d", admin),
	})
	return p, fmt.Sprintf("127.0.0.1:%d", httpsPort)
}

// servedCert waits until addr serves a certificate for host and returns
// its serial number and SHA-256 fingerprint.
func servedCert(t *testing.T, addr, host string, within time.Duration) (serial, fingerprint string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		d := &net.Dialer{Timeout: 2 * time.Second}
		conn, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{ServerName: host, InsecureSkipVerify: true})
		if err == nil {
			leaf := conn.ConnectionState().PeerCertificates[0]
			_ = conn.Close()
			sum := sha256.Sum256(leaf.Raw)
			require.Contains(t, leaf.DNSNames, host)
			return leaf.SerialNumber.Text(16), hex.EncodeToString(sum[:])
		}
		if time.Now().After(deadline) {
			require.NoError(t, err, "no certificate for %s on %s within %v", host, addr, within)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func logOf(t *testing.T, p *caddyproc.Proc) string {
	t.Helper()
	b, err := os.ReadFile(p.LogPath())
	require.NoError(t, err)
	return string(b)
}

// TestTwoCaddiesShareCertificate: one Caddy issues the site's certificate
// into the shared database; a second Caddy on the same database serves
// that same certificate and issues none of its own.
func TestTwoCaddiesShareCertificate(t *testing.T) {
	db := testdb.StartForTest(t)
	name := dbName()
	const host = "shared.test"

	a, addrA := startCaddy(t, db, name, host)
	serialA, fpA := servedCert(t, addrA, host, time.Minute)
	b, addrB := startCaddy(t, db, name, host)
	serialB, fpB := servedCert(t, addrB, host, time.Minute)
	t.Logf("A serves serial %s, B serves serial %s", serialA, serialB)
	assert.Equal(t, serialA, serialB, "serial numbers")
	assert.Equal(t, fpA, fpB, "fingerprints")

	const obtained = "certificate obtained successfully"
	assert.Contains(t, logOf(t, a), obtained, "A issued the certificate")
	assert.False(t, strings.Contains(logOf(t, b), obtained), "B issued a certificate of its own")
	for _, p := range []*caddyproc.Proc{a, b} {
		assert.False(t, strings.Contains(logOf(t, p), `"level":"error"`), "an error in the log of pid %d:\n%s", p.Pid(), logOf(t, p))
	}

	c := connect(t, db)
	keys, err := certstorage.NewStore(c.Database(name)).List(context.Background(), "certificates", true)
	require.NoError(t, err)
	assert.Contains(t, keys, "certificates/local/"+host+"/"+host+".crt")
	a.Stop()
	b.Stop()
}

// TestKilledLockHolderDoesNotBlock: a process holding the issuance lock of
// a site is killed with SIGKILL; a Caddy that needs that lock gets it once
// the lock has expired (LockTTL after the holder's last refresh) and
// issues the certificate, no later than that plus start-up and issuance.
func TestKilledLockHolderDoesNotBlock(t *testing.T) {
	db := testdb.StartForTest(t)
	name := dbName()
	const host = "killed.test"

	exe, err := os.Executable()
	require.NoError(t, err)
	holder := exec.Command(exe, "-test.run=^$")
	holder.Env = append(os.Environ(), envHold+"=issue_cert_"+host, "MONGODB_URI="+db.URI(), "MONGODB_DB_NAME="+name)
	holder.Stderr = os.Stderr
	out, err := holder.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, holder.Start())
	t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "locked", strings.TrimSpace(line))

	// The holder refreshes its lock: past LockTTL it is still held.
	time.Sleep(certstorage.LockTTL + time.Second)
	probe := certstorage.NewStore(connect(t, db).Database(name))
	ok, err := probe.TryLock(context.Background(), "issue_cert_"+host)
	require.NoError(t, err)
	require.False(t, ok, "a live holder's lock was taken over")

	require.NoError(t, holder.Process.Kill())
	_ = holder.Wait()
	killed := time.Now()

	c, addr := startCaddy(t, db, name, host)
	servedCert(t, addr, host, certstorage.LockTTL+30*time.Second)
	waited := time.Since(killed)
	t.Logf("certificate served %v after the lock holder was killed", waited.Round(time.Millisecond))
	assert.GreaterOrEqual(t, waited, certstorage.LockTTL-certstorage.LockRefresh-time.Second,
		"Caddy did not wait for the killed holder's lock")
	assert.LessOrEqual(t, waited, certstorage.LockTTL+15*time.Second)
	c.Stop()
}

// TestTwoCaddiesContendForIssuance: both Caddy processes start while the
// site's issuance lock is held (here by the test), so both wait on it;
// once it is released, exactly one issues the certificate and the other,
// taking the lock next, finds it in storage and serves it.
func TestTwoCaddiesContendForIssuance(t *testing.T) {
	db := testdb.StartForTest(t)
	name := dbName()
	const host = "contended.test"
	ctx := context.Background()
	gate := certstorage.NewStore(connect(t, db).Database(name))
	require.NoError(t, gate.Lock(ctx, "issue_cert_"+host))

	a, addrA := startCaddy(t, db, name, host)
	b, addrB := startCaddy(t, db, name, host)
	time.Sleep(2 * time.Second) // both are waiting for the lock
	for _, addr := range []string{addrA, addrB} {
		conn, err := tls.Dial("tcp", addr, &tls.Config{ServerName: host, InsecureSkipVerify: true})
		if err == nil {
			_ = conn.Close()
		}
		require.Error(t, err, "%s served a certificate while the issuance lock was held", addr)
	}
	require.NoError(t, gate.Unlock(ctx, "issue_cert_"+host))

	serialA, _ := servedCert(t, addrA, host, time.Minute)
	serialB, _ := servedCert(t, addrB, host, time.Minute)
	assert.Equal(t, serialA, serialB, "serial numbers")
	const obtained = "certificate obtained successfully"
	issuers := 0
	for _, p := range []*caddyproc.Proc{a, b} {
		if strings.Contains(logOf(t, p), obtained) {
			issuers++
		}
	}
	assert.Equal(t, 1, issuers, "processes that issued the certificate")
	a.Stop()
	b.Stop()
}
