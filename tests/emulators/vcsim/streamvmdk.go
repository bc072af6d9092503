package main

import (
	"bufio"
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"fmt"
	"io"
	"os"
)

// writeESXiStream writes src (a raw disk image) as a streamOptimized VMDK the way ESXi's
// ExportVm streams it: header with gdOffset = GD_AT_END, zlib-compressed grains behind
// grain markers, a GT marker + grain table after each group of 512 grains, then a GD marker
// + grain directory, a footer marker + footer (the header with the real gdOffset) and an
// end-of-stream marker. qemu-img writes another layout (GD offset in the header, no footer);
// readers meet both.
func writeESXiStream(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	w := &sectorWriter{w: bufio.NewWriterSize(out, 1<<20)}

	const (
		sector       = 512
		grainSectors = 128 // 64 KiB grains, as ESXi writes them
		grainBytes   = grainSectors * sector
		gtEntries    = 512
	)
	capacitySectors := (fi.Size() + sector - 1) / sector
	grains := (capacitySectors + grainSectors - 1) / grainSectors
	numGTs := (grains + gtEntries - 1) / gtEntries

	descriptor := fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%08x
parentCID=ffffffff
createType="streamOptimized"

# Extent description
RW %d SPARSE "disk-0.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "%d"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.virtualHWVersion = "13"
`, uint32(fi.ModTime().UnixNano()), capacitySectors, capacitySectors/(255*63))
	descSectors := int64((len(descriptor) + sector - 1) / sector)
	overhead := int64(1 + descSectors)
	overhead = (overhead + grainSectors - 1) / grainSectors * grainSectors // grains start aligned

	header := func(gdOffset uint64) []byte {
		h := make([]byte, sector)
		le := binary.LittleEndian
		le.PutUint32(h[0:], 0x564d444b) // "KDMV"
		le.PutUint32(h[4:], 3)
		le.PutUint32(h[8:], 1|1<<16|1<<17) // newline test, compressed grains, markers
		le.PutUint64(h[12:], uint64(capacitySectors))
		le.PutUint64(h[20:], grainSectors)
		le.PutUint64(h[28:], 1) // descriptorOffset
		le.PutUint64(h[36:], uint64(descSectors))
		le.PutUint32(h[44:], gtEntries)
		le.PutUint64(h[48:], 0) // rgdOffset
		le.PutUint64(h[56:], gdOffset)
		le.PutUint64(h[64:], uint64(overhead))
		h[72] = 0 // uncleanShutdown
		h[73], h[74], h[75], h[76] = '\n', ' ', '\r', '\n'
		le.PutUint16(h[77:], 1) // deflate
		return h
	}
	if err := w.write(header(^uint64(0))); err != nil {
		return err
	}
	if err := w.write([]byte(descriptor)); err != nil {
		return err
	}
	if err := w.padTo(overhead * sector); err != nil {
		return err
	}

	gd := make([]uint32, numGTs)
	buf := make([]byte, grainBytes)
	var z bytes.Buffer
	for gt := int64(0); gt < numGTs; gt++ {
		table := make([]uint32, gtEntries)
		used := false
		for i := int64(0); i < gtEntries; i++ {
			g := gt*gtEntries + i
			if g >= grains {
				break
			}
			n, err := in.ReadAt(buf, g*grainBytes)
			if err != nil && err != io.EOF {
				return err
			}
			for j := n; j < len(buf); j++ {
				buf[j] = 0
			}
			if isZero(buf) {
				continue
			}
			z.Reset()
			zw := zlib.NewWriter(&z)
			if _, err := zw.Write(buf); err != nil {
				return err
			}
			if err := zw.Close(); err != nil {
				return err
			}
			table[i] = uint32(w.off / sector)
			used = true
			m := make([]byte, 12)
			binary.LittleEndian.PutUint64(m[0:], uint64(g*grainSectors))
			binary.LittleEndian.PutUint32(m[8:], uint32(z.Len()))
			if err := w.write(m); err != nil {
				return err
			}
			if err := w.write(z.Bytes()); err != nil {
				return err
			}
			if err := w.padSector(); err != nil {
				return err
			}
		}
		if !used {
			continue
		}
		if err := w.marker(gtEntries*4/sector, 1); err != nil {
			return err
		}
		gd[gt] = uint32(w.off / sector)
		if err := binary.Write(w, binary.LittleEndian, table); err != nil {
			return err
		}
	}
	gdSectors := (numGTs*4 + sector - 1) / sector
	if err := w.marker(uint64(gdSectors), 2); err != nil {
		return err
	}
	gdOffset := uint64(w.off / sector)
	if err := binary.Write(w, binary.LittleEndian, gd); err != nil {
		return err
	}
	if err := w.padSector(); err != nil {
		return err
	}
	if err := w.marker(1, 3); err != nil {
		return err
	}
	if err := w.write(header(gdOffset)); err != nil {
		return err
	}
	if err := w.marker(0, 0); err != nil {
		return err
	}
	if err := w.w.Flush(); err != nil {
		return err
	}
	return out.Sync()
}

// sectorWriter tracks the offset and pads to 512-byte sectors.
type sectorWriter struct {
	w   *bufio.Writer
	off int64
}

func (s *sectorWriter) Write(p []byte) (int, error) {
	n, err := s.w.Write(p)
	s.off += int64(n)
	return n, err
}

func (s *sectorWriter) write(p []byte) error {
	_, err := s.Write(p)
	return err
}

func (s *sectorWriter) padTo(off int64) error {
	if off <= s.off {
		return nil
	}
	return s.write(make([]byte, off-s.off))
}

func (s *sectorWriter) padSector() error {
	return s.padTo((s.off + 511) / 512 * 512)
}

// marker writes a metadata marker: numSectors, size 0, type, padded to a sector.
func (s *sectorWriter) marker(numSectors uint64, kind uint32) error {
	m := make([]byte, 512)
	binary.LittleEndian.PutUint64(m[0:], numSectors)
	binary.LittleEndian.PutUint32(m[12:], kind)
	return s.write(m)
}
