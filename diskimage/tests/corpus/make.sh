#!/usr/bin/env bash
# Regenerates the hand-made corrupt samples of this folder from tiny qemu-img images.
# (Samples found by the fuzzers are added as they are, named fuzz-<target>-<hash>.)
# A name containing ".err." must fail to open with an error naming the file.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -c 70000 /dev/zero | tr '\0' 'x' > "$tmp/d.raw"
truncate -s 3M "$tmp/d.raw"
qemu-img create -q -f vpc -o subformat=dynamic "$tmp/e.vhd" 1M
qemu-img convert -O vpc -o subformat=dynamic "$tmp/d.raw" "$tmp/d.vhd"
qemu-img create -q -f vhdx "$tmp/e.vhdx" 5M
qemu-img convert -O vmdk -o subformat=streamOptimized "$tmp/d.raw" "$tmp/s.vmdk"
qemu-img convert -O vmdk -o subformat=monolithicSparse "$tmp/d.raw" "$tmp/m.vmdk"

python3 - "$tmp" <<'PY'
import struct, sys
tmp = sys.argv[1]
def rd(n): return bytearray(open(f"{tmp}/{n}", "rb").read())
def wr(n, b): open(n, "wb").write(bytes(b))
def vhd_footer_fix(f, at):
    f[at+64:at+68] = b"\0\0\0\0"
    s = (~sum(f[at:at+512])) & 0xffffffff
    f[at+64:at+68] = struct.pack(">I", s)

# VHD: footer copy claims 2^60 bytes (checksums resealed): a lying size.
v = rd("e.vhd")
for at in (0, len(v) - 512):
    v[at+28:at+32] = b"win "; v[at+48:at+56] = struct.pack(">Q", 1 << 60); vhd_footer_fix(v, at)
wr("vhd-size-2p60.err.vhd", v)
# VHD: wrong cookie at both ends, so neither footer is valid, but the tail says "conectix".
v = rd("e.vhd"); v[0:8] = b"conectiX"; v[-512+64] ^= 0xff
wr("vhd-bad-checksums.err.vhd", v)
# VHD: truncated in the middle of its BAT.
wr("vhd-truncated.err.vhd", rd("e.vhd")[:1536 + 2])
# VHD: dynamic header's block size 3 (not a power of two), header checksum resealed.
v = rd("e.vhd"); h = 512
v[h+32:h+36] = struct.pack(">I", 3)
v[h+36:h+40] = b"\0\0\0\0"; v[h+36:h+40] = struct.pack(">I", (~sum(v[h:h+1024])) & 0xffffffff)
wr("vhd-block-size-3.err.vhd", v)
# VHDX: cut after the region tables (metadata and BAT missing).
wr("vhdx-truncated.err.vhdx", rd("e.vhdx")[:300 * 1024])
# VHDX: both headers' CRCs broken.
v = rd("e.vhdx")[:1 << 20]; v[65536 + 100] ^= 1; v[131072 + 100] ^= 1
wr("vhdx-bad-headers.err.vhdx", v)
# VMDK streamOptimized: cut inside its first compressed grain.
s = rd("s.vmdk"); wr("vmdk-stream-truncated.vmdk", s[:len(s) // 3])
# VMDK streamOptimized: a compressed grain's bytes flipped (reads must fail cleanly).
s = rd("s.vmdk")
gd = struct.unpack_from("<Q", s, 56)[0]
first_grain = 512 * 128 if len(s) > 512 * 128 else 512
s[len(s) // 2] ^= 0xff; s[len(s) // 2 + 17] ^= 0x55
wr("vmdk-stream-flipped.vmdk", s)
# VMDK sparse: capacity 2^60 sectors.
m = rd("m.vmdk"); m[12:20] = struct.pack("<Q", 1 << 60)
wr("vmdk-capacity-2p60.err.vmdk", m[:65536])
# VMDK sparse: grain directory offset past the end of the file.
m = rd("m.vmdk"); m[56:64] = struct.pack("<Q", 1 << 40); m[48:56] = struct.pack("<Q", 1 << 40)
wr("vmdk-gd-past-eof.err.vmdk", m)
# VMDK descriptor naming a parent that loops back to itself.
wr("vmdk-self-parent.err.vmdk", b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=12345678\n'
   b'createType="monolithicSparse"\nparentFileNameHint="vmdk-self-parent.err.vmdk"\n'
   b'RW 2048 ZERO\n')
PY
ls -la
