package main

import (
	"crypto/rand"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// cbtGrain is ESXi's change-tracking block size: changed areas are reported in whole
// 64 KiB blocks.
const cbtGrain = 64 << 10

// cbtState is one disk's change tracking: an epoch (the changeId prefix, new each time CBT
// is enabled), a sequence number bumped by each guest write, and the log of writes.
type cbtState struct {
	enabled bool
	epoch   string // "52 xx xx xx xx xx xx xx-xx xx xx xx xx xx xx xx"
	seq     int64
	log     []cbtWrite
}

type cbtWrite struct {
	seq int64
	extent
}

func newEpoch() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[0] = 0x52 // vCenter's changeIds start with 52, as its UUIDs do
	var sb strings.Builder
	for i, x := range b {
		switch {
		case i == 8:
			sb.WriteByte('-')
		case i > 0:
			sb.WriteByte(' ')
		}
		fmt.Fprintf(&sb, "%02x", x)
	}
	return sb.String()
}

func (c *cbtState) enable() {
	c.enabled = true
	c.epoch = newEpoch()
	c.seq = 0
	c.log = nil
}

func (c *cbtState) disable() {
	*c = cbtState{}
}

func (c *cbtState) changeID() string {
	if !c.enabled {
		return ""
	}
	return fmt.Sprintf("%s/%d", c.epoch, c.seq)
}

// record notes a guest write; areas are widened to whole grains when queried.
func (c *cbtState) record(start, length int64) {
	if !c.enabled || length <= 0 {
		return
	}
	c.seq++
	c.log = append(c.log, cbtWrite{c.seq, extent{start, length}})
}

// parseChangeID splits "epoch/seq"; ok is false for anything malformed.
func parseChangeID(id string) (epoch string, seq int64, ok bool) {
	i := strings.LastIndex(id, "/")
	if i <= 0 {
		return "", 0, false
	}
	n, err := strconv.ParseInt(id[i+1:], 10, 64)
	if err != nil || n < 0 {
		return "", 0, false
	}
	return id[:i], n, true
}

// changedSince lists the grains written after seq `from` up to and including seq `to`.
func (c *cbtState) changedSince(from, to int64) []extent {
	var grains []extent
	for _, w := range c.log {
		if w.seq <= from || w.seq > to {
			continue
		}
		start := w.start / cbtGrain * cbtGrain
		end := (w.start + w.length + cbtGrain - 1) / cbtGrain * cbtGrain
		grains = append(grains, extent{start, end - start})
	}
	return mergeExtents(grains)
}

// mergeExtents sorts and coalesces overlapping or touching extents.
func mergeExtents(in []extent) []extent {
	if len(in) == 0 {
		return nil
	}
	sort.Slice(in, func(i, j int) bool { return in[i].start < in[j].start })
	out := []extent{in[0]}
	for _, e := range in[1:] {
		last := &out[len(out)-1]
		if e.start <= last.start+last.length {
			if end := e.start + e.length; end > last.start+last.length {
				last.length = end - last.start
			}
			continue
		}
		out = append(out, e)
	}
	return out
}

// clipExtents keeps the parts of in that fall inside [start, end), also clipping to the
// disk's capacity (the last grain may stick out).
func clipExtents(in []extent, start, end int64) []extent {
	var out []extent
	for _, e := range in {
		s, t := e.start, e.start+e.length
		if s < start {
			s = start
		}
		if t > end {
			t = end
		}
		if t > s {
			out = append(out, extent{s, t - s})
		}
	}
	return out
}
