package main

import (
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"
)

// coapPost pre-encodes a CON POST to /api/v1/{token}/telemetry; message id at bytes 2..3, token at 4..7.
func coapPost(token string, payload []byte) []byte {
	pkt := []byte{0x44, 0x02, 0, 0, 0, 0, 0, 0} // ver 1, CON, token length 4, POST
	last := 0
	for _, seg := range strings.Split("api/v1/"+token+"/telemetry", "/") {
		delta := 11 - last // Uri-Path
		last = 11
		pkt = append(pkt, option(delta, []byte(seg))...)
	}
	pkt = append(pkt, option(12-last, []byte{50})...) // Content-Format: application/json
	pkt = append(pkt, 0xFF)
	return append(pkt, payload...)
}

func option(delta int, value []byte) []byte {
	nib := func(n int) (byte, []byte) {
		switch {
		case n < 13:
			return byte(n), nil
		case n < 269:
			return 13, []byte{byte(n - 13)}
		default:
			return 14, []byte{byte((n - 269) >> 8), byte(n - 269)}
		}
	}
	d, dx := nib(delta)
	l, lx := nib(len(value))
	out := append([]byte{d<<4 | l}, dx...)
	out = append(out, lx...)
	return append(out, value...)
}

func coapWorker(addr, token string, inflight int, payload []byte, c *counters, lat *latencies,
	measuring, stop *atomic.Bool, pace *pacer) error {
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return err
	}
	conn, err := net.DialUDP("udp", nil, raddr)
	if err != nil {
		return err
	}
	defer conn.Close()
	pkt := coapPost(token, payload)
	sent := make([]time.Time, 65536)
	outstanding := make([]bool, 65536)
	next := 0
	send := func() error {
		pace.wait()
		next = (next + 1) % 65536
		pkt[2], pkt[3] = byte(next>>8), byte(next)
		pkt[4], pkt[5] = byte(next>>8), byte(next)
		sent[next] = time.Now()
		outstanding[next] = true
		_, err := conn.Write(pkt)
		return err
	}
	for i := 0; i < inflight; i++ {
		if err := send(); err != nil {
			return err
		}
	}
	buf := make([]byte, 2048)
	samples := make([]time.Duration, 0, 4096)
	for !stop.Load() {
		_ = conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, err := conn.Read(buf)
		if err != nil {
			// lost datagrams: refill the window so the load keeps going (counted as neither acked nor refused)
			for id, open := range outstanding {
				if open && time.Since(sent[id]) > time.Second {
					outstanding[id] = false
					if err := send(); err != nil {
						return err
					}
				}
			}
			continue
		}
		if n < 4 || buf[0]>>4&0x3 != 2 { // only ACKs
			continue
		}
		id := int(buf[2])<<8 | int(buf[3])
		if !outstanding[id] {
			continue
		}
		outstanding[id] = false
		code := buf[1]
		if measuring.Load() {
			samples = append(samples, time.Since(sent[id]))
		}
		switch {
		case code>>5 == 2:
			c.acked.Add(1)
		case code == 0: // empty ACK of a separate response: keep waiting is not modelled; count refused
			c.refused.Add(1)
		default:
			c.refused.Add(1)
		}
		if len(samples) >= 4000 {
			lat.add(samples)
			samples = samples[:0]
		}
		if err := send(); err != nil {
			return fmt.Errorf("send: %w", err)
		}
	}
	lat.add(samples)
	return nil
}
