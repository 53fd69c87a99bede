package main

import (
	"context"
	"fmt"
	"syscall"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// rtCost is what one database round trip costs the process that makes it:
// the CPU of the MongoDB Go driver (encoding, the socket write, the wake-up
// and read of the answer, decoding) at a given pace, measured in this
// harness process with the same driver version Caddy uses. It is the floor
// under the gateway's per-request Caddy CPU: every round trip the counting
// proxy sees costs Caddy about this much, whatever the module around it.
type rtCost struct {
	Rate         int     `json:"rate"`                   // round trips per second
	Ops          int     `json:"ops"`                    // round trips made
	CPUPerOp     float64 `json:"cpu_us_op"`              // µs of this process's CPU per round trip, idle subtracted
	IdleShare    float64 `json:"idle_us_op"`             // µs per round trip the same idle period cost
	P50Ms        float64 `json:"rtt_p50_ms"`             // round-trip time seen by the driver, straight to the database
	ProxiedP50Ms float64 `json:"rtt_proxied_p50_ms"`     // the same through the counting proxy
	BackToBack   float64 `json:"cpu_us_op_back_to_back"` // µs per round trip made one after the other, no pacing
	Shape        string  `json:"shape"`                  // what the round trip was
	ClientCPU    float64 `json:"client_cpu_s"`           // CPU seconds, idle included
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// roundTripCost makes paced conditional updates of one user document (the
// shape of a hold: a $gte filter, an $inc and a $set) with a client of its
// own, at rate per second for d, straight to the database (not through the
// counting proxy), after measuring the harness idle for d.
func (h *harness) roundTripCost(rate int, d time.Duration) (*rtCost, error) {
	direct, err := h.rtClient(h.ferretURI)
	if err != nil {
		return nil, err
	}
	defer direct.Disconnect(context.Background())
	idleStart := selfCPU()
	time.Sleep(d)
	idle := selfCPU() - idleStart

	start := selfCPU()
	rtts, err := h.pacedUpdates(direct, rate, d)
	if err != nil {
		return nil, err
	}
	used := selfCPU() - start
	n := len(rtts)
	r := &rtCost{Rate: rate, Ops: n, Shape: "conditional $inc + $set of one user document", ClientCPU: used.Seconds()}
	if n > 0 {
		r.CPUPerOp = float64((used - idle).Microseconds()) / float64(n)
		r.IdleShare = float64(idle.Microseconds()) / float64(n)
		r.P50Ms = ms(pct(rtts, 50))
	}
	// Back to back, one goroutine: no timer wake-up between round trips,
	// the cheapest a round trip gets in this process.
	start = selfCPU()
	t0 := time.Now()
	if rtts, err = h.pacedUpdates(direct, 0, d/2); err != nil {
		return nil, err
	}
	used = selfCPU() - start
	if len(rtts) > 0 {
		idleShare := time.Duration(float64(idle) * float64(time.Since(t0)) / float64(d))
		r.BackToBack = float64((used - idleShare).Microseconds()) / float64(len(rtts))
	}
	// The same through the counting proxy the gateway talks to: what the
	// proxy's extra hop adds to each of the gateway's round trips.
	proxied, err := h.rtClient("mongodb://" + h.proxy.addr() + "/")
	if err != nil {
		return nil, err
	}
	defer proxied.Disconnect(context.Background())
	if rtts, err = h.pacedUpdates(proxied, rate, d/2); err != nil {
		return nil, err
	}
	r.ProxiedP50Ms = ms(pct(rtts, 50))
	return r, nil
}

// rtClient connects a client of its own and warms its connection.
func (h *harness) rtClient(uri string) (*mongo.Client, error) {
	client, err := mongo.Connect(options.Client().ApplyURI(uri).SetTimeout(10 * time.Second))
	if err != nil {
		return nil, err
	}
	users := client.Database(dbName).Collection("usersNew")
	for i := 0; i < 20; i++ {
		if _, err := users.UpdateOne(context.Background(), bson.D{{Key: "_id", Value: "bench-000"}}, bson.D{{Key: "$set", Value: bson.D{{Key: "rtWarm", Value: i}}}}); err != nil {
			_ = client.Disconnect(context.Background())
			return nil, err
		}
	}
	return client, nil
}

// pacedUpdates makes hold-shaped updates at rate per second (0: one after
// the other) for d and returns their round-trip times.
func (h *harness) pacedUpdates(client *mongo.Client, rate int, d time.Duration) ([]time.Duration, error) {
	users := client.Database(dbName).Collection("usersNew")
	ctx := context.Background()
	var tick <-chan time.Time
	if rate > 0 {
		t := time.NewTicker(time.Second / time.Duration(rate))
		defer t.Stop()
		tick = t.C
	}
	var rtts []time.Duration
	end := time.Now().Add(d)
	for i := 0; time.Now().Before(end); i++ {
		if tick != nil {
			<-tick
		}
		t0 := time.Now()
		_, err := users.UpdateOne(ctx,
			bson.D{{Key: "_id", Value: fmt.Sprintf("bench-%03d", i%h.cfg.Users)}, {Key: "creditsNew", Value: bson.D{{Key: "$gte", Value: 0.0}}}},
			bson.D{
				{Key: "$inc", Value: bson.D{{Key: "rtCount", Value: int64(1)}}},
				{Key: "$set", Value: bson.D{{Key: "rtLast", Value: fmt.Sprintf("h1|rt|%d", i)}}},
			})
		if err != nil {
			return nil, err
		}
		rtts = append(rtts, time.Since(t0))
	}
	return rtts, nil
}
