"""A small VHDX (and dynamic VHD) writer/reader for the Hyper-V double, from Microsoft's specs.

VHDX: [MS-VHDX] v20160714 (file identifier, two headers, two region tables, log, metadata
region, BAT; CRC-32C checksums; dynamic and differencing images with sector bitmaps and a
parent locator). VHD: Microsoft's "Virtual Hard Disk Image Format Specification" 1.0
(footer, dynamic header, BAT, per-block sector bitmaps; dynamic and differencing).

An image object reads through its parent chain (`parent` attribute, set by the caller) and
writes only whole logical sectors (the caller aligns). Standard library only."""

import os
import struct
import uuid

MIB = 1 << 20
KIB = 1 << 10
SECTOR = 512

# ---------------------------------------------------------------- CRC-32C (Castagnoli)

def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    t = _CRC_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------- VHDX constants

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
SB_PRESENT = 6

# Layout of the files this module creates (every region 1 MiB-aligned, as the spec requires).
LOG_OFFSET = 1 * MIB
LOG_LENGTH = 1 * MIB
METADATA_OFFSET = 2 * MIB
METADATA_LENGTH = 1 * MIB
BAT_OFFSET = 3 * MIB


def _guid_bytes(g):
    return g.bytes_le


def guid_text(g):
    return "{" + str(g).upper() + "}"


def _round_up(n, m):
    return (n + m - 1) // m * m


class Vhdx:
    """An open VHDX file. `parent` (another image) must be set for a differencing one."""

    format = "vhdx"

    def __init__(self, path):
        self.path = path
        self.parent = None
        self.f = open(path, "r+b")
        self._load()

    # ---- creation

    @classmethod
    def create(cls, path, size, block_size=32 * MIB, logical_sector=512, physical_sector=4096,
               parent=None, parent_paths=None):
        """A new dynamic VHDX, or a differencing one when `parent` (an open image) is given;
        parent_paths = {"relative_path": .., "absolute_win32_path": ..}."""
        if size % logical_sector or size <= 0:
            raise ValueError("size must be a positive multiple of the logical sector size")
        if block_size % MIB or not (MIB <= block_size <= 256 * MIB) or block_size & (block_size - 1):
            raise ValueError("block size must be a power of two MiB between 1 and 256 MiB")
        chunk_ratio = (1 << 23) * logical_sector // block_size
        data_blocks = -(-size // block_size)
        if parent is not None:
            sb_blocks = -(-data_blocks // chunk_ratio)
            total = sb_blocks * (chunk_ratio + 1)
        else:
            total = data_blocks + (data_blocks - 1) // chunk_ratio
        bat_length = _round_up(total * 8, MIB)
        with open(path, "wb") as f:
            ident = b"vhdxfile" + "rehost Hyper-V double".encode("utf-16-le")
            f.write(ident.ljust(64 * KIB, b"\0"))
            f.truncate(BAT_OFFSET + bat_length)
            # region tables
            entries = [
                (BAT_GUID, BAT_OFFSET, bat_length, 1),
                (METADATA_GUID, METADATA_OFFSET, METADATA_LENGTH, 1),
            ]
            rt = bytearray(64 * KIB)
            struct.pack_into("<4sIII", rt, 0, b"regi", 0, len(entries), 0)
            for i, (g, off, length, req) in enumerate(entries):
                struct.pack_into("<16sQII", rt, 16 + 32 * i, _guid_bytes(g), off, length, req)
            struct.pack_into("<I", rt, 4, crc32c(rt))
            f.seek(192 * KIB)
            f.write(rt)
            f.seek(256 * KIB)
            f.write(rt)
            # metadata
            items = [
                (FILE_PARAMETERS, struct.pack("<II", block_size, 2 if parent is not None else 0), 4),
                (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), 6),
                (VIRTUAL_DISK_ID, _guid_bytes(uuid.uuid4()), 6),
                (LOGICAL_SECTOR_SIZE, struct.pack("<I", logical_sector), 6),
                (PHYSICAL_SECTOR_SIZE, struct.pack("<I", physical_sector), 6),
            ]
            if parent is not None:
                pairs = [("parent_linkage", guid_text(parent.data_write_guid))]
                pairs += [(k, v) for k, v in (parent_paths or {}).items()]
                items.append((PARENT_LOCATOR, encode_locator(pairs), 4))
            f.seek(METADATA_OFFSET)
            f.write(encode_metadata(items))
        cls._write_headers(path, uuid.uuid4(), uuid.uuid4(), seq=1)
        img = cls(path)
        img.parent = parent
        return img

    @staticmethod
    def _write_headers(path, file_write_guid, data_write_guid, seq):
        with open(path, "r+b") as f:
            for i, at in enumerate((64 * KIB, 128 * KIB)):
                h = bytearray(4 * KIB)
                struct.pack_into("<4sIQ16s16s16sHHIQ", h, 0, b"head", 0, seq + i,
                                 _guid_bytes(file_write_guid), _guid_bytes(data_write_guid),
                                 b"\0" * 16, 0, 1, LOG_LENGTH, LOG_OFFSET)
                struct.pack_into("<I", h, 4, crc32c(h))
                f.seek(at)
                f.write(h)

    # ---- loading

    def _load(self):
        f = self.f
        f.seek(0)
        if f.read(8) != b"vhdxfile":
            raise ValueError(f"{self.path}: not a VHDX file")
        best = None
        for at in (64 * KIB, 128 * KIB):
            f.seek(at)
            h = bytearray(f.read(4 * KIB))
            sig, crc, seq = struct.unpack_from("<4sIQ", h, 0)
            struct.pack_into("<I", h, 4, 0)
            if sig == b"head" and crc32c(h) == crc and (best is None or seq > best[0]):
                best = (seq, bytes(h))
        if best is None:
            raise ValueError(f"{self.path}: no valid VHDX header")
        self.seq, h = best
        fw, dw = struct.unpack_from("<16s16s", h, 16)
        self.file_write_guid = uuid.UUID(bytes_le=fw)
        self.data_write_guid = uuid.UUID(bytes_le=dw)
        f.seek(192 * KIB)
        rt = f.read(64 * KIB)
        (count,) = struct.unpack_from("<I", rt, 8)
        regions = {}
        for i in range(count):
            g, off, length, _ = struct.unpack_from("<16sQII", rt, 16 + 32 * i)
            regions[uuid.UUID(bytes_le=g)] = (off, length)
        self.bat_offset, self.bat_length = regions[BAT_GUID]
        self.meta_offset, self.meta_length = regions[METADATA_GUID]
        f.seek(self.meta_offset)
        meta = f.read(self.meta_length)
        self.items = decode_metadata(meta)
        self.block_size, flags = struct.unpack("<II", self.items[FILE_PARAMETERS])
        self.has_parent = bool(flags & 2)
        (self.size,) = struct.unpack("<Q", self.items[VIRTUAL_DISK_SIZE])
        (self.logical_sector,) = struct.unpack("<I", self.items[LOGICAL_SECTOR_SIZE])
        (self.physical_sector,) = struct.unpack("<I", self.items[PHYSICAL_SECTOR_SIZE])
        self.locator = dict(decode_locator(self.items[PARENT_LOCATOR])) if self.has_parent else {}
        self.chunk_ratio = (1 << 23) * self.logical_sector // self.block_size
        self.data_blocks = -(-self.size // self.block_size)
        f.seek(self.bat_offset)
        raw = f.read(self.bat_length)
        n = self.bat_length // 8
        self.bat = list(struct.unpack(f"<{n}Q", raw))
        f.seek(0, 2)
        self.end = _round_up(f.tell(), MIB)

    def close(self):
        self.f.close()

    # ---- BAT helpers

    def _payload_index(self, block):
        return block + block // self.chunk_ratio

    def _sb_index(self, chunk):
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def _set_entry(self, idx, state, file_offset):
        entry = state | ((file_offset // MIB) << 20)
        self.bat[idx] = entry
        os.pwrite(self.f.fileno(), struct.pack("<Q", entry), self.bat_offset + idx * 8)

    def _alloc(self, length):
        at = self.end
        self.end += _round_up(length, MIB)
        os.ftruncate(self.f.fileno(), self.end)
        return at

    def _sector_bitmap(self, block):
        """(file offset of the bitmap bytes of this block, byte length) or None."""
        chunk = block // self.chunk_ratio
        entry = self.bat[self._sb_index(chunk)]
        if entry & 7 != SB_PRESENT:
            return None
        per_block = self.block_size // self.logical_sector // 8
        return (entry >> 20) * MIB + (block % self.chunk_ratio) * per_block, per_block

    # ---- reading

    def _pieces(self, offset, length):
        """(offset, n, kind, file_offset) with kind 'data', 'zero' or 'parent'."""
        bs = self.block_size
        end = offset + length
        while offset < end:
            block = offset // bs
            in_block = offset % bs
            n = min(end - offset, bs - in_block)
            entry = self.bat[self._payload_index(block)]
            state = entry & 7
            base = (entry >> 20) * MIB
            if state == FULLY_PRESENT:
                yield offset, n, "data", base + in_block
            elif state == PARTIALLY_PRESENT:
                sb = self._sector_bitmap(block)
                ls = self.logical_sector
                first = in_block // ls
                last = (in_block + n - 1) // ls
                bits = os.pread(self.f.fileno(), (last // 8) - (first // 8) + 1, sb[0] + first // 8)
                pos = offset
                s = first
                while s <= last:
                    present = bits[(s // 8) - (first // 8)] >> (s % 8) & 1
                    t = s
                    while t + 1 <= last and (bits[((t + 1) // 8) - (first // 8)] >> ((t + 1) % 8) & 1) == present:
                        t += 1
                    run_end = min(offset + n, block * bs + (t + 1) * ls)
                    k = run_end - pos
                    yield pos, k, "data" if present else "parent", base + (pos - block * bs)
                    pos = run_end
                    s = t + 1
            elif state == NOT_PRESENT and self.has_parent:
                yield offset, n, "parent", 0
            else:
                yield offset, n, "zero", 0
            offset += n

    def read(self, offset, length):
        out = bytearray(length)
        for at, n, kind, fo in self._pieces(offset, length):
            i = at - offset
            if kind == "data":
                out[i:i + n] = os.pread(self.f.fileno(), n, fo)
            elif kind == "parent":
                out[i:i + n] = self.parent.read(at, n)
        return bytes(out)

    def own_ranges(self):
        """Ranges this file itself holds data for (a differencing file's sectors)."""
        out = []
        for at, n, kind, _ in self._pieces(0, self.size):
            if kind == "data":
                if out and out[-1][0] + out[-1][1] == at:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((at, n))
        return out

    # ---- writing (whole logical sectors)

    def write(self, offset, data):
        ls = self.logical_sector
        if offset % ls or len(data) % ls:
            raise ValueError("writes must be whole logical sectors")
        if offset + len(data) > self.size:
            raise ValueError("write past the end of the disk")
        bs = self.block_size
        mv = memoryview(data)
        pos = 0
        fd = self.f.fileno()
        while pos < len(data):
            at = offset + pos
            block = at // bs
            in_block = at % bs
            n = min(len(data) - pos, bs - in_block)
            idx = self._payload_index(block)
            entry = self.bat[idx]
            state = entry & 7
            if state in (FULLY_PRESENT, PARTIALLY_PRESENT):
                base = (entry >> 20) * MIB
            else:
                base = self._alloc(bs)
                if self.has_parent and n < bs:
                    state = PARTIALLY_PRESENT
                else:
                    state = FULLY_PRESENT
                    if self.has_parent is False and state == FULLY_PRESENT:
                        pass  # new space is zero: the unwritten rest of the block reads as zeros
                self._set_entry(idx, state, base)
            os.pwrite(fd, mv[pos:pos + n], base + in_block)
            if state == PARTIALLY_PRESENT:
                self._mark_sectors(block, in_block // ls, (in_block + n) // ls)
            pos += n

    def _mark_sectors(self, block, first, end):
        chunk = block // self.chunk_ratio
        sbi = self._sb_index(chunk)
        if self.bat[sbi] & 7 != SB_PRESENT:
            self._set_entry(sbi, SB_PRESENT, self._alloc(MIB))
        sb_at, _ = self._sector_bitmap(block)
        fd = self.f.fileno()
        b0, b1 = first // 8, (end - 1) // 8
        bits = bytearray(os.pread(fd, b1 - b0 + 1, sb_at + b0))
        for s in range(first, end):
            if s % 8 == 0 and s + 8 <= end:
                bits[s // 8 - b0] = 0xFF
            else:
                bits[s // 8 - b0] |= 1 << (s % 8)
        os.pwrite(fd, bytes(bits), sb_at + b0)

    def new_data_write_guid(self):
        """Rewrites both headers with a fresh DataWriteGuid (after its data changed by a merge)."""
        self.data_write_guid = uuid.uuid4()
        self.file_write_guid = uuid.uuid4()
        self._write_headers(self.path, self.file_write_guid, self.data_write_guid, self.seq + 1)
        self.seq += 2
        return self.data_write_guid

    def set_parent(self, parent, parent_paths):
        """Rewrites the parent locator (after the parent changed, e.g. by a merge)."""
        pairs = [("parent_linkage", guid_text(parent.data_write_guid))] + list(parent_paths.items())
        items = [(g, v, self._item_flags[g]) for g, v in self._item_list if g != PARENT_LOCATOR]
        items.append((PARENT_LOCATOR, encode_locator(pairs), 4))
        os.pwrite(self.f.fileno(), encode_metadata(items), self.meta_offset)
        self.locator = dict(pairs)
        self.parent = parent

    @property
    def _item_list(self):
        return list(self.items.items_with_order)

    @property
    def _item_flags(self):
        return self.items.flags


class _Items(dict):
    pass


def encode_metadata(items):
    """items: [(guid, bytes, flags)] → the metadata region's bytes (table + items)."""
    region = bytearray(64 * KIB)
    struct.pack_into("<8sHH", region, 0, b"metadata", 0, len(items))
    at = 64 * KIB
    payload = bytearray()
    for i, (g, value, flags) in enumerate(items):
        struct.pack_into("<16sIIII", region, 32 + 32 * i, _guid_bytes(g), at + len(payload), len(value), flags, 0)
        payload += value
        payload += b"\0" * (_round_up(len(payload), 8) - len(payload))
    return bytes(region) + bytes(payload)


def decode_metadata(meta):
    sig, _, count = struct.unpack_from("<8sHH", meta, 0)
    if sig != b"metadata":
        raise ValueError("bad metadata region")
    items = _Items()
    order = []
    flags = {}
    for i in range(count):
        g, off, length, fl, _ = struct.unpack_from("<16sIIII", meta, 32 + 32 * i)
        gid = uuid.UUID(bytes_le=g)
        items[gid] = bytes(meta[off:off + length])
        flags[gid] = fl
        order.append((gid, items[gid]))
    items.items_with_order = order
    items.flags = flags
    return items


def encode_locator(pairs):
    header = struct.pack("<16sHH", _guid_bytes(VHDX_LOCATOR_TYPE), 0, len(pairs))
    table = bytearray()
    blob = bytearray()
    base = len(header) + 12 * len(pairs)
    for k, v in pairs:
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        ko = base + len(blob)
        blob += kb
        vo = base + len(blob)
        blob += vb
        table += struct.pack("<IIHH", ko, vo, len(kb), len(vb))
    return header + bytes(table) + bytes(blob)


def decode_locator(data):
    _, _, count = struct.unpack_from("<16sHH", data, 0)
    out = []
    for i in range(count):
        ko, vo, kl, vl = struct.unpack_from("<IIHH", data, 20 + 12 * i)
        out.append((data[ko:ko + kl].decode("utf-16-le"), data[vo:vo + vl].decode("utf-16-le")))
    return out


# ---------------------------------------------------------------- VHD (legacy), dynamic and differencing

VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z


def chs_geometry(size):
    """The VHD spec's CHS algorithm (Appendix: CHS calculation)."""
    total = size // SECTOR
    if total > 65535 * 16 * 255:
        total = 65535 * 16 * 255
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = (cth + 1023) // 1024
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def _vhd_checksum(buf):
    return (~sum(buf)) & 0xFFFFFFFF


class Vhd:
    format = "vhd"
    logical_sector = 512

    def __init__(self, path):
        self.path = path
        self.parent = None
        self.f = open(path, "r+b")
        self._load()

    @classmethod
    def create(cls, path, size, block_size=2 * MIB, parent=None, parent_paths=None):
        if size % SECTOR or size <= 0:
            raise ValueError("size must be a positive multiple of 512")
        entries = -(-size // block_size)
        bat_len = _round_up(entries * 4, SECTOR)
        unique = uuid.uuid4()
        footer = cls._footer(size, 4 if parent else 3, unique)
        dyn = bytearray(1024)
        struct.pack_into(">8sQQIII", dyn, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, 1536, 0x00010000, entries, block_size)
        locators_at = 1536 + bat_len
        locator_data = b""
        if parent is not None:
            struct.pack_into(">16sI", dyn, 40, parent.unique_id.bytes, int(os.path.getmtime(parent.path)) - VHD_EPOCH)
            name = os.path.basename(parent.path).encode("utf-16-be")[:512]
            dyn[64:64 + len(name)] = name
            paths = parent_paths or {}
            slot = 0
            for code, key in ((b"W2ru", "relative_path"), (b"W2ku", "absolute_win32_path")):
                if key not in paths:
                    continue
                data = paths[key].encode("utf-16-le")
                space = _round_up(len(data), SECTOR)
                struct.pack_into(">4sIII Q".replace(" ", ""), dyn, 576 + 24 * slot, code, space, len(data), 0,
                                 locators_at + len(locator_data))
                locator_data += data.ljust(space, b"\0")
                slot += 1
        struct.pack_into(">I", dyn, 36, _vhd_checksum(dyn))
        with open(path, "wb") as f:
            f.write(footer)
            f.write(dyn)
            f.write(b"\xff" * (entries * 4) + b"\0" * (bat_len - entries * 4))
            f.write(locator_data)
            f.write(footer)
        img = cls(path)
        img.parent = parent
        return img

    @staticmethod
    def _footer(size, disk_type, unique):
        c, h, s = chs_geometry(size)
        ft = bytearray(512)
        import time as _t
        struct.pack_into(">8sIIQI4sI4sQQHBBII16sB", ft, 0, b"conectix", 2, 0x00010000, 512,
                         int(_t.time()) - VHD_EPOCH, b"win ", 0x000A0000, b"Wi2k", size, size,
                         min(c, 65535), h, s, disk_type, 0, unique.bytes, 0)
        struct.pack_into(">I", ft, 64, _vhd_checksum(ft))
        return bytes(ft)

    def _load(self):
        f = self.f
        f.seek(0)
        footer = f.read(512)
        if footer[:8] != b"conectix":
            raise ValueError(f"{self.path}: not a dynamic VHD")
        self.footer = footer
        (self.size,) = struct.unpack_from(">Q", footer, 48)
        (self.disk_type,) = struct.unpack_from(">I", footer, 60)
        self.unique_id = uuid.UUID(bytes=footer[68:84])
        self.has_parent = self.disk_type == 4
        dyn = f.read(1024)
        _, _, self.bat_offset, _, self.entries, self.block_size = struct.unpack_from(">8sQQIII", dyn, 0)
        self.bitmap_len = _round_up(self.block_size // SECTOR // 8, SECTOR)
        f.seek(self.bat_offset)
        self.bat = list(struct.unpack(f">{self.entries}I", f.read(self.entries * 4)))
        f.seek(0, 2)
        self.end = f.tell() - 512
        self.physical_sector = 512
        self.locator = {}

    def close(self):
        self.f.close()

    def _bit(self, bitmap, i):
        return bitmap[i // 8] >> (7 - i % 8) & 1

    def _pieces(self, offset, length):
        bs = self.block_size
        end = offset + length
        fd = self.f.fileno()
        while offset < end:
            block = offset // bs
            in_block = offset % bs
            n = min(end - offset, bs - in_block)
            entry = self.bat[block]
            if entry == 0xFFFFFFFF:
                yield offset, n, "parent" if self.has_parent else "zero", 0
            else:
                base = entry * SECTOR
                data_at = base + self.bitmap_len
                if not self.has_parent:
                    yield offset, n, "data", data_at + in_block
                else:
                    bitmap = os.pread(fd, self.bitmap_len, base)
                    pos = offset
                    while pos < offset + n:
                        s = (pos % bs) // SECTOR
                        present = self._bit(bitmap, s)
                        t = s
                        last = (offset + n - 1 - block * bs) // SECTOR
                        while t + 1 <= last and self._bit(bitmap, t + 1) == present:
                            t += 1
                        run_end = min(offset + n, block * bs + (t + 1) * SECTOR)
                        yield pos, run_end - pos, "data" if present else "parent", data_at + (pos - block * bs)
                        pos = run_end
            offset += n

    read = Vhdx.read
    own_ranges = Vhdx.own_ranges

    def write(self, offset, data):
        if offset % SECTOR or len(data) % SECTOR:
            raise ValueError("writes must be whole sectors")
        bs = self.block_size
        fd = self.f.fileno()
        mv = memoryview(data)
        pos = 0
        while pos < len(data):
            at = offset + pos
            block = at // bs
            in_block = at % bs
            n = min(len(data) - pos, bs - in_block)
            if self.bat[block] == 0xFFFFFFFF:
                base = self.end
                self.end += self.bitmap_len + bs
                bitmap = b"\xff" * self.bitmap_len if not self.has_parent else b"\0" * self.bitmap_len
                os.pwrite(fd, bitmap, base)
                os.ftruncate(fd, self.end)
                os.pwrite(fd, self.footer, self.end)
                self.bat[block] = base // SECTOR
                os.pwrite(fd, struct.pack(">I", base // SECTOR), self.bat_offset + block * 4)
            base = self.bat[block] * SECTOR
            os.pwrite(fd, mv[pos:pos + n], base + self.bitmap_len + in_block)
            if self.has_parent:
                bitmap = bytearray(os.pread(fd, self.bitmap_len, base))
                for s in range(in_block // SECTOR, (in_block + n) // SECTOR):
                    bitmap[s // 8] |= 0x80 >> (s % 8)
                os.pwrite(fd, bytes(bitmap), base)
            pos += n

    def new_data_write_guid(self):
        return None

    def set_parent(self, parent, parent_paths):
        fd = self.f.fileno()
        dyn = bytearray(os.pread(fd, 1024, 512))
        struct.pack_into(">16sI", dyn, 40, parent.unique_id.bytes, int(os.path.getmtime(parent.path)) - VHD_EPOCH)
        struct.pack_into(">I", dyn, 36, 0)
        struct.pack_into(">I", dyn, 36, _vhd_checksum(dyn))
        os.pwrite(fd, bytes(dyn), 512)
        self.parent = parent


def open_image(path):
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == b"vhdxfile":
        return Vhdx(path)
    if magic == b"conectix":
        return Vhd(path)
    raise ValueError(f"{path}: neither VHDX nor dynamic VHD")
