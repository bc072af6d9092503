"""The guest's writes between a full and an incremental export, shared by the export
benchmarks (export.sh, azure.sh, hyperv.sh) so each source sees the same change pattern.

1% of a 4 GiB disk (rounded down to 64 KiB), written as 4 MiB runs at seeded random 64 KiB-aligned offsets (runs
may overlap, as a guest's writes do); the bytes are random, so a delta image cannot
compress them away. `changed_bytes` counts each changed byte once, however often it was
written: the denominator of the read and written ratios.
"""

import random

DISK = 4 << 30
RUN = 4 << 20
ALIGN = 64 << 10


def writes(seed, size=DISK, total=DISK // 100 // ALIGN * ALIGN, run=RUN):
    """[(offset, length)] of the writes of benchmark run `seed`: whole 64 KiB grains (an
    Azure page blob takes only 512-byte pages), `total` bytes in all."""
    rng = random.Random(1000 + seed)
    out, done = [], 0
    while done < total:
        n = min(run, total - done)
        out.append((rng.randrange(0, (size - n) // ALIGN) * ALIGN, n))
        done += n
    return out


def payload(seed, offset, n):
    """Incompressible bytes for the write at `offset`."""
    return random.Random(seed * 1_000_003 + offset).randbytes(n)


def changed_bytes(writes):
    """Bytes covered by `writes`, overlaps counted once."""
    total, end = 0, 0
    for offset, n in sorted(writes):
        start = max(offset, end)
        if offset + n > start:
            total += offset + n - start
            end = offset + n
    return total
