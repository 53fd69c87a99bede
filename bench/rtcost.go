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
	Rate      int     `json:"rate"`         // round trips per second
	Ops       int     `json:"ops"`          // round trips made
	CPUPerOp  float64 `json:"cpu_us_op"`    // µs of this process's CPU per round trip, idle subtracted
	IdleShare float64 `json:"idle_us_op"`   // µs per round trip the same idle period cost
	P50Ms     float64 `json:"rtt_p50_ms"`   // round-trip time
	Shape     string  `json:"shape"`        // what the round trip was
	ClientCPU float64 `json:"client_cpu_s"` // CPU seconds, idle included
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
	client, err := mongo.Connect(options.Client().ApplyURI(h.ferretURI).SetTimeout(10 * time.Second))
	if err != nil {
		return nil, err
	}
	defer client.Disconnect(context.Background())
	users := client.Database(dbName).Collection("usersNew")
	ctx := context.Background()
	// Warm the connection.
	for i := 0; i < 20; i++ {
		if _, err := users.UpdateOne(ctx, bson.D{{Key: "_id", Value: "bench-000"}}, bson.D{{Key: "$set", Value: bson.D{{Key: "rtWarm", Value: i}}}}); err != nil {
			return nil, err
		}
	}
	idleStart := selfCPU()
	time.Sleep(d)
	idle := selfCPU() - idleStart

	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	var rtts []time.Duration
	start := selfCPU()
	end := time.Now().Add(d)
	for i := 0; time.Now().Before(end); i++ {
		<-tick.C
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
	used := selfCPU() - start
	n := len(rtts)
	r := &rtCost{Rate: rate, Ops: n, Shape: "conditional $inc + $set of one user document", ClientCPU: used.Seconds()}
	if n > 0 {
		r.CPUPerOp = float64((used - idle).Microseconds()) / float64(n)
		r.IdleShare = float64(idle.Microseconds()) / float64(n)
		r.P50Ms = ms(pct(rtts, 50))
	}
	return r, nil
}
