package main

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"testing"
)

func TestChangeIDFormatAndParse(t *testing.T) {
	var c cbtState
	if c.changeID() != "" {
		t.Fatalf("changeId with CBT off: %q", c.changeID())
	}
	c.enable()
	c.record(0, 1)
	id := c.changeID()
	if !regexp.MustCompile(`^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/1$`).MatchString(id) {
		t.Fatalf("changeId %q is not in vCenter's format", id)
	}
	epoch, seq, ok := parseChangeID(id)
	if !ok || epoch != c.epoch || seq != 1 {
		t.Fatalf("parse %q: %q %d %v", id, epoch, seq, ok)
	}
	for _, bad := range []string{"*", "", "/3", "52 aa/x", "52 aa/-1"} {
		if _, _, ok := parseChangeID(bad); ok {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestChangedSinceWidensToGrainsAndHonoursTheInterval(t *testing.T) {
	var c cbtState
	c.enable()
	c.record(10, 5)                 // seq 1: grain 0
	c.record(cbtGrain*3-1, 2)       // seq 2: grains 2 and 3
	c.record(cbtGrain*10, cbtGrain) // seq 3: grain 10 exactly
	got := c.changedSince(1, 3)
	want := []extent{{2 * cbtGrain, 2 * cbtGrain}, {10 * cbtGrain, cbtGrain}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("changedSince(1,3) = %v, want %v", got, want)
	}
	if got := c.changedSince(0, 1); !reflect.DeepEqual(got, []extent{{0, cbtGrain}}) {
		t.Fatalf("changedSince(0,1) = %v", got)
	}
	if got := c.changedSince(3, 3); got != nil {
		t.Fatalf("changedSince(3,3) = %v", got)
	}
}

func TestMergeAndClipExtents(t *testing.T) {
	got := mergeExtents([]extent{{100, 10}, {0, 10}, {10, 5}, {105, 20}})
	want := []extent{{0, 15}, {100, 25}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("merge = %v, want %v", got, want)
	}
	if got := clipExtents(want, 5, 110); !reflect.DeepEqual(got, []extent{{5, 10}, {100, 10}}) {
		t.Fatalf("clip = %v", got)
	}
}

func TestAllocatedAreasSkipHolesAndZeroGrains(t *testing.T) {
	p := filepath.Join(t.TempDir(), "flat")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(64 * cbtGrain); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{1}, 5*cbtGrain+7); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, cbtGrain), 20*cbtGrain); err != nil { // allocated zeros
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{2}, 64*cbtGrain-1); err != nil {
		t.Fatal(err)
	}
	f.Close()
	got, err := allocatedAreas(p)
	if err != nil {
		t.Fatal(err)
	}
	want := []extent{{5 * cbtGrain, cbtGrain}, {63 * cbtGrain, cbtGrain}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("allocatedAreas = %v, want %v", got, want)
	}
	// A sparse copy keeps content and holes.
	q := p + ".copy"
	if err := copySparse(p, q); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(p)
	b, _ := os.ReadFile(q)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("sparse copy differs")
	}
}
