package main

import (
	"bufio"
	"fmt"
	"net"
	"sync/atomic"
	"time"
)

const topic = "v1/devices/me/telemetry"

func varint(n int) []byte {
	var out []byte
	for {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		out = append(out, b)
		if n == 0 {
			return out
		}
	}
}

func str(s string) []byte { return append([]byte{byte(len(s) >> 8), byte(len(s))}, s...) }

func connectPacket(clientID, user string, version int) []byte {
	var body []byte
	body = append(body, str("MQTT")...)
	body = append(body, byte(version), 0x80|0x02, 0, 60) // user name flag, clean session, keep-alive 60 s
	if version == 5 {
		body = append(body, 0) // no properties
	}
	body = append(body, str(clientID)...)
	body = append(body, str(user)...)
	return append(append([]byte{0x10}, varint(len(body))...), body...)
}

// publishPacket returns a QoS 1 PUBLISH whose packet id is at offset idAt.
func publishPacket(version int, payload []byte) (pkt []byte, idAt int) {
	var body []byte
	body = append(body, str(topic)...)
	idAt = len(body)
	body = append(body, 0, 1)
	if version == 5 {
		body = append(body, 0)
	}
	body = append(body, payload...)
	head := append([]byte{0x32}, varint(len(body))...)
	return append(head, body...), len(head) + idAt
}

func dial(addr, token string, version, n int) (net.Conn, *bufio.Reader, error) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	if _, err := conn.Write(connectPacket(fmt.Sprintf("bench-%d", n), token, version)); err != nil {
		conn.Close()
		return nil, nil, err
	}
	r := bufio.NewReaderSize(conn, 64*1024)
	head, err := r.ReadByte()
	if err != nil || head != 0x20 {
		conn.Close()
		return nil, nil, fmt.Errorf("no CONNACK (%x, %v)", head, err)
	}
	length, _ := r.ReadByte()
	body := make([]byte, length)
	if _, err := r.Read(body); err != nil || body[1] != 0 {
		conn.Close()
		return nil, nil, fmt.Errorf("CONNACK refused: %v %v", body, err)
	}
	return conn, r, nil
}

func mqttWorker(addr, token string, version, n, inflight int, payload []byte, c *counters, lat *latencies,
	measuring, stop *atomic.Bool, pace *pacer) error {
	conn, r, err := dial(addr, token, version, n)
	if err != nil {
		return err
	}
	defer conn.Close()
	pkt, idAt := publishPacket(version, payload)
	if pace != nil {
		return mqttPaced(conn, r, pkt, idAt, inflight, c, lat, measuring, stop, pace)
	}
	sent := make([]time.Time, 65536)
	next := 0
	out := make([]byte, 0, len(pkt)*inflight)
	queue := func(k int) {
		now := time.Now()
		for i := 0; i < k; i++ {
			next = next%65535 + 1
			pkt[idAt], pkt[idAt+1] = byte(next>>8), byte(next)
			sent[next] = now
			out = append(out, pkt...)
		}
	}
	queue(inflight)
	if _, err := conn.Write(out); err != nil {
		return err
	}
	samples := make([]time.Duration, 0, 4096)
	for !stop.Load() {
		out = out[:0]
		acks := 0
		// read at least one PUBACK, then whatever else is already buffered
		for acks == 0 || r.Buffered() >= 4 {
			head, err := r.ReadByte()
			if err != nil {
				return err
			}
			length, err := r.ReadByte()
			if err != nil {
				return err
			}
			body := make([]byte, length)
			if _, err := ioReadFull(r, body); err != nil {
				return err
			}
			if head&0xF0 != 0x40 {
				if head&0xF0 == 0xE0 {
					return fmt.Errorf("server sent DISCONNECT %v", body)
				}
				continue
			}
			id := int(body[0])<<8 | int(body[1])
			if measuring.Load() {
				samples = append(samples, time.Since(sent[id]))
			}
			if length > 2 && body[2] >= 0x80 {
				c.refused.Add(1)
			} else {
				c.acked.Add(1)
			}
			acks++
		}
		if len(samples) >= 4000 {
			lat.add(samples)
			samples = samples[:0]
		}
		queue(acks)
		if _, err := conn.Write(out); err != nil {
			return err
		}
	}
	lat.add(samples)
	return nil
}

func ioReadFull(r *bufio.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// runIdle opens n connections, holds them for `hold`, and prints how many succeeded.
func runIdle(addr, token string, version, n, devices int, hold time.Duration) int {
	conns := make([]net.Conn, 0, n)
	fails := 0
	for i := 0; i < n; i++ {
		user := token
		if devices > 0 {
			user = fmt.Sprintf("%s-%d", token, i%devices)
		}
		conn, _, err := dial(addr, user, version, i)
		if err != nil {
			fails++
			continue
		}
		conns = append(conns, conn)
	}
	fmt.Printf("{\"mode\":\"idle\",\"connected\":%d,\"failed\":%d}\n", len(conns), fails)
	time.Sleep(hold)
	for _, c := range conns {
		c.Close()
	}
	return 0
}

// mqttPaced is the open-loop variant for latency runs: a sender writes each PUBLISH when it is due (window
// permitting) while a reader takes PUBACKs as they come, so the generator never delays an ack it measures.
func mqttPaced(conn net.Conn, r *bufio.Reader, pkt []byte, idAt, inflight int, c *counters, lat *latencies,
	measuring, stop *atomic.Bool, pace *pacer) error {
	var sent [65536]atomic.Int64
	window := make(chan struct{}, inflight)
	for i := 0; i < inflight; i++ {
		window <- struct{}{}
	}
	go func() {
		next := 0
		for !stop.Load() {
			<-window
			pace.wait()
			next = next%65535 + 1
			pkt[idAt], pkt[idAt+1] = byte(next>>8), byte(next)
			sent[next].Store(time.Now().UnixNano())
			if _, err := conn.Write(pkt); err != nil {
				return
			}
		}
	}()
	samples := make([]time.Duration, 0, 4096)
	for !stop.Load() {
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		head, err := r.ReadByte()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			return err
		}
		length, err := r.ReadByte()
		if err != nil {
			return err
		}
		body := make([]byte, length)
		if _, err := ioReadFull(r, body); err != nil {
			return err
		}
		if head&0xF0 != 0x40 {
			continue
		}
		id := int(body[0])<<8 | int(body[1])
		if measuring.Load() {
			samples = append(samples, time.Duration(time.Now().UnixNano()-sent[id].Load()))
		}
		if length > 2 && body[2] >= 0x80 {
			c.refused.Add(1)
		} else {
			c.acked.Add(1)
		}
		window <- struct{}{}
		if len(samples) >= 4000 {
			lat.add(samples)
			samples = samples[:0]
		}
	}
	lat.add(samples)
	return nil
}
