package spool

import (
	"fmt"
	"testing"
)

// BenchmarkAppendDone is the hot path: journal a ~1 KiB settlement, then
// mark it done (two write(2) calls, no fsync).
func BenchmarkAppendDone(b *testing.B) {
	s, _ := openT(b, b.TempDir(), Options{})
	defer s.Close()
	data := dataFor("settlement", 1024)
	ids := make([]string, 4096)
	for i := range ids {
		ids[i] = fmt.Sprintf("req-%016x", i)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		id := ids[i%len(ids)]
		if err := s.Append(id, data); err != nil {
			b.Fatal(err)
		}
		if err := s.Done(id); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAppendDoneParallel is the same from many goroutines at once.
func BenchmarkAppendDoneParallel(b *testing.B) {
	s, _ := openT(b, b.TempDir(), Options{})
	defer s.Close()
	data := dataFor("settlement", 1024)
	var worker int64
	var mu = make(chan struct{}, 1)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		mu <- struct{}{}
		worker++
		w := worker
		<-mu
		ids := make([]string, 1024)
		for i := range ids {
			ids[i] = fmt.Sprintf("req-%d-%d", w, i)
		}
		for i := 0; pb.Next(); i++ {
			id := ids[i%len(ids)]
			if err := s.Append(id, data); err != nil {
				b.Fatal(err)
			}
			if err := s.Done(id); err != nil {
				b.Fatal(err)
			}
		}
	})
}
