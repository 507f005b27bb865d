// Command loadgen drives MQTT (QoS 1) and CoAP (CON POST) load at a server and reports throughput, latency
// percentiles and its own CPU time. Packets are pre-encoded and written in batches so that the generator,
// not the server under test, is never the bottleneck (DESIGN.md §7). Standard library only.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type result struct {
	Mode         string  `json:"mode"`
	Target       string  `json:"target"`
	Conns        int     `json:"conns"`
	Inflight     int     `json:"inflight"`
	Seconds      float64 `json:"seconds"`
	Acked        int64   `json:"acked"`
	Refused      int64   `json:"refused"`
	RatePerSec   float64 `json:"rate_per_s"`
	P50Ms        float64 `json:"p50_ms"`
	P99Ms        float64 `json:"p99_ms"`
	GenCPUSecs   float64 `json:"generator_cpu_s"`
	ConnectFails int64   `json:"connect_failures"`
}

// latencies keeps a bounded reservoir of samples per worker; merged at the end.
type latencies struct {
	mu      sync.Mutex
	samples []time.Duration
}

func (l *latencies) add(batch []time.Duration) {
	l.mu.Lock()
	if len(l.samples) < 2_000_000 {
		l.samples = append(l.samples, batch...)
	}
	l.mu.Unlock()
}

func (l *latencies) percentile(p float64) float64 {
	if len(l.samples) == 0 {
		return 0
	}
	sort.Slice(l.samples, func(i, j int) bool { return l.samples[i] < l.samples[j] })
	idx := int(float64(len(l.samples)-1) * p)
	return float64(l.samples[idx]) / 1e6
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

type counters struct {
	acked, refused, connectFails atomic.Int64
}

func main() {
	mode := flag.String("mode", "mqtt", "mqtt or coap")
	addr := flag.String("addr", "127.0.0.1:1883", "target host:port")
	conns := flag.Int("conns", 50, "connections (MQTT) or UDP sockets (CoAP)")
	inflight := flag.Int("inflight", 100, "messages in flight per connection")
	duration := flag.Duration("duration", 10*time.Second, "measured duration")
	warmup := flag.Duration("warmup", 2*time.Second, "unmeasured warm-up")
	token := flag.String("token", "BENCH_TOKEN", "access token (MQTT user name, CoAP path)")
	devices := flag.Int("devices", 0, "if > 0, connection i uses token TOKEN-(i mod devices): one device each")
	version := flag.Int("version", 4, "MQTT protocol level: 4 (3.1.1) or 5")
	payloadSize := flag.Int("payload", 60, "payload size in bytes (JSON)")
	idle := flag.Int("idle", 0, "MQTT: open this many idle connections, hold them, then exit (memory test)")
	hold := flag.Duration("hold", 30*time.Second, "MQTT idle mode: how long to hold the connections")
	rate := flag.Float64("rate", 0, "total messages per second to offer (0 = as fast as acks allow)")
	flag.Parse()

	payload := makePayload(*payloadSize)
	if *idle > 0 {
		os.Exit(runIdle(*addr, *token, *version, *idle, *devices, *hold))
	}
	var c counters
	lat := &latencies{}
	measuring := &atomic.Bool{}
	stop := &atomic.Bool{}
	var wg sync.WaitGroup
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var err error
			token := token
			if *devices > 0 {
				t := fmt.Sprintf("%s-%d", *token, i%*devices)
				token = &t
			}
			switch *mode {
			case "mqtt":
				err = mqttWorker(*addr, *token, *version, i, *inflight, payload, &c, lat, measuring, stop,
					newPacer(*rate, *conns))
			case "coap":
				err = coapWorker(*addr, *token, *inflight, payload, &c, lat, measuring, stop, newPacer(*rate, *conns))
			default:
				err = fmt.Errorf("unknown mode %q", *mode)
			}
			if err != nil {
				if c.connectFails.Add(1) <= 5 { // the first few say why; the count says how many
					fmt.Fprintln(os.Stderr, "worker:", err)
				}
			}
		}(i)
	}
	time.Sleep(*warmup)
	startAcked, startRefused, startCPU := c.acked.Load(), c.refused.Load(), cpuSeconds()
	measuring.Store(true)
	start := time.Now()
	time.Sleep(*duration)
	measuring.Store(false)
	elapsed := time.Since(start).Seconds()
	acked, refused, cpu := c.acked.Load()-startAcked, c.refused.Load()-startRefused, cpuSeconds()-startCPU
	stop.Store(true)
	wg.Wait()
	r := result{
		Mode: *mode, Target: *addr, Conns: *conns, Inflight: *inflight, Seconds: elapsed,
		Acked: acked, Refused: refused, RatePerSec: float64(acked) / elapsed,
		P50Ms: lat.percentile(0.50), P99Ms: lat.percentile(0.99), GenCPUSecs: cpu,
		ConnectFails: c.connectFails.Load(),
	}
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
}

func makePayload(size int) []byte {
	base := `{"temperature":25.5,"humidity":60,"pressure":1013.25,"n":`
	p := []byte(base)
	for len(p) < size-1 {
		p = append(p, '1')
	}
	return append(p, '}')
}

// pacer spaces one worker's sends evenly so the offered load is `rate` in total (open-loop latency runs).
type pacer struct {
	interval time.Duration
	next     time.Time
}

func newPacer(rate float64, workers int) *pacer {
	if rate <= 0 {
		return nil
	}
	return &pacer{interval: time.Duration(float64(time.Second) * float64(workers) / rate), next: time.Now()}
}

// wait blocks until the next send is due; a nil pacer never waits.
func (p *pacer) wait() {
	if p == nil {
		return
	}
	if d := time.Until(p.next); d > 0 {
		time.Sleep(d)
	}
	p.next = p.next.Add(p.interval)
}
