package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/vim25/types"
)

// defaultDiskSize is what a fresh VM's disk measures: big enough for tests to write at
// a few offsets, small enough that the sparse file costs nothing.
const defaultDiskSize = 64 << 20

// disk is the emulator's view of one VM disk. Every layer is a full raw image (sparse):
// layers[0] is the base `<vm>/disk1-flat.vmdk`, layers[i] the "delta" created by the i-th
// snapshot of the chain, and the last layer is what the guest currently writes to.
// snapshot chain[i] freezes layers[i]. Keeping full images (not real deltas) makes reads of
// any point in time trivial; the names and the frozen base are what clients can observe.
type disk struct {
	vmName string
	vmRef  types.ManagedObjectReference
	key    int32
	dsName string // e.g. LocalDS_0
	dir    string // VM folder inside the datastore, e.g. DC0_H0_VM0
	stem   string // e.g. disk1
	layers []string
	chain  []snapRecord
	cbt    cbtState
}

type snapRecord struct {
	ref      types.ManagedObjectReference
	changeID string // the disk's changeId when the snapshot was taken ("" when CBT was off)
	cbtEpoch string // CBT prefix at that time
	cbtSeq   int64
}

func (d *disk) current() string { return d.layers[len(d.layers)-1] }

// unshare gives the current layer a file of its own before the guest writes to it: a
// snapshot links the new layer to the frozen one (ESXi starts a snapshot's delta empty, in
// about no time; a link is as cheap and reads the same), and the first write copies.
func (d *disk) unshare() error {
	cur := d.current()
	fi, err := os.Stat(cur)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || st.Nlink <= 1 {
		return nil
	}
	tmp := cur + ".unshare"
	if err := copySparse(cur, tmp); err != nil {
		return fmt.Errorf("copying %s before the guest writes to it: %w", cur, err)
	}
	return os.Rename(tmp, cur)
}

// layerDescriptor is the datastore path of layer i's descriptor, as vCenter names it.
func (d *disk) layerDescriptor(i int) string {
	if i == 0 {
		return fmt.Sprintf("[%s] %s/%s.vmdk", d.dsName, d.dir, d.stem)
	}
	return fmt.Sprintf("[%s] %s/%s-%06d.vmdk", d.dsName, d.dir, d.stem, i)
}

// layerFile is the absolute path of layer i's data file.
func (d *disk) layerFile(i int) string {
	if i == 0 {
		return filepath.Join(datastoreDir, d.dir, d.stem+"-flat.vmdk")
	}
	return filepath.Join(datastoreDir, d.dir, fmt.Sprintf("%s-%06d-delta.vmdk", d.stem, i))
}

func (d *disk) size() (int64, error) {
	fi, err := os.Stat(d.current())
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// parseBackingName splits "[LocalDS_0] DC0_H0_VM0/disk1.vmdk" into its parts.
func parseBackingName(name string) (ds, dir, stem string, err error) {
	if !strings.HasPrefix(name, "[") {
		return "", "", "", fmt.Errorf("not a datastore path: %q", name)
	}
	end := strings.Index(name, "]")
	if end < 0 {
		return "", "", "", fmt.Errorf("not a datastore path: %q", name)
	}
	ds = name[1:end]
	p := strings.TrimSpace(name[end+1:])
	dir = path.Dir(p)
	stem = strings.TrimSuffix(path.Base(p), ".vmdk")
	return ds, dir, stem, nil
}

// writeDescriptor writes a monolithicFlat descriptor next to the base flat file, so that
// the datastore looks like a real one to a client that browses it.
func (d *disk) writeDescriptor(size int64) error {
	desc := fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="vmfs"

# Extent description
RW %d VMFS "%s-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.virtualHWVersion = "13"
`, size/512, d.stem)
	return os.WriteFile(filepath.Join(datastoreDir, d.dir, d.stem+".vmdk"), []byte(desc), 0o644)
}

// copySparse copies src to dst keeping holes (SEEK_DATA/SEEK_HOLE), so that a snapshot of a
// mostly empty disk costs what its data costs, and "allocated areas" stay meaningful.
func copySparse(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(fi.Size()); err != nil {
		return err
	}
	extents, err := dataExtents(in, fi.Size())
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for _, e := range extents {
		if err := copyRange(in, out, e.start, e.length, buf); err != nil {
			return err
		}
	}
	return out.Sync()
}

// copyRange copies [start, start+length) and leaves all-zero blocks as holes.
func copyRange(in io.ReaderAt, out io.WriterAt, start, length int64, buf []byte) error {
	for done := int64(0); done < length; {
		n := int64(len(buf))
		if length-done < n {
			n = length - done
		}
		chunk := buf[:n]
		if _, err := in.ReadAt(chunk, start+done); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		for off := int64(0); off < n; off += cbtGrain {
			end := off + cbtGrain
			if end > n {
				end = n
			}
			if isZero(chunk[off:end]) {
				continue
			}
			if _, err := out.WriteAt(chunk[off:end], start+done+off); err != nil {
				return err
			}
		}
		done += n
	}
	return nil
}

var zeroBlock = make([]byte, cbtGrain)

func isZero(b []byte) bool {
	for len(b) > 0 {
		n := len(b)
		if n > len(zeroBlock) {
			n = len(zeroBlock)
		}
		if !bytes.Equal(b[:n], zeroBlock[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

type extent struct{ start, length int64 }

const (
	seekData = 3 // SEEK_DATA on Linux
	seekHole = 4 // SEEK_HOLE on Linux
)

// dataExtents lists the allocated ranges of f (SEEK_DATA/SEEK_HOLE); a file system without
// the support reports the whole file as one extent, which is still correct (a superset).
func dataExtents(f *os.File, size int64) ([]extent, error) {
	var out []extent
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		start, err := syscall.Seek(fd, off, seekData)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break // no data after off
			}
			if errors.Is(err, syscall.EINVAL) {
				return []extent{{off, size - off}}, nil
			}
			return nil, err
		}
		end, err := syscall.Seek(fd, start, seekHole)
		if err != nil {
			return nil, err
		}
		if end > size {
			end = size
		}
		out = append(out, extent{start, end - start})
		off = end
	}
	return out, nil
}

// allocatedAreas lists the areas of file holding data, at cbtGrain granularity with
// all-zero grains left out, the way ESXi answers changeId "*".
func allocatedAreas(file string) ([]extent, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	exts, err := dataExtents(f, fi.Size())
	if err != nil {
		return nil, err
	}
	var grains []extent
	buf := make([]byte, cbtGrain)
	for _, e := range exts {
		first := e.start / cbtGrain * cbtGrain
		for g := first; g < e.start+e.length; g += cbtGrain {
			n := int64(cbtGrain)
			if g+n > fi.Size() {
				n = fi.Size() - g
			}
			if _, err := f.ReadAt(buf[:n], g); err != nil && !errors.Is(err, io.EOF) {
				return nil, err
			}
			if !isZero(buf[:n]) {
				grains = append(grains, extent{g, n})
			}
		}
	}
	return mergeExtents(grains), nil
}
