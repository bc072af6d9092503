//! GUIDs as VHDX stores them: Microsoft's mixed-endian layout, where the first three
//! fields (u32, u16, u16) are little-endian and the last eight bytes are stored as written.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A GUID in its on-disk byte order.
pub(crate) type Guid = [u8; 16];

/// The all-zero GUID (an empty log, an unset field).
pub(crate) const ZERO: Guid = [0; 16];

/// Builds the on-disk bytes of the GUID written `d1-d2-d3-d4[0..2]-d4[2..8]`.
pub(crate) const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// Parses the text form `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional) into
/// on-disk bytes.
pub(crate) fn parse(text: &str) -> Option<Guid> {
    let t = text.trim();
    let t = t
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(t);
    let parts: Vec<&str> = t.split('-').collect();
    let lens = [8usize, 4, 4, 4, 12];
    if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let d1 = u32::try_from(hex(parts[0])?).ok()?;
    let d2 = u16::try_from(hex(parts[1])?).ok()?;
    let d3 = u16::try_from(hex(parts[2])?).ok()?;
    let d4a = hex(parts[3])?.to_be_bytes();
    let d4b = hex(parts[4])?.to_be_bytes();
    Some(guid(
        d1,
        d2,
        d3,
        [
            d4a[6], d4a[7], d4b[2], d4b[3], d4b[4], d4b[5], d4b[6], d4b[7],
        ],
    ))
}

/// The text form `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}` of on-disk bytes (as Hyper-V
/// writes `parent_linkage`).
pub(crate) fn format(g: &Guid) -> String {
    let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let d2 = u16::from_le_bytes([g[4], g[5]]);
    let d3 = u16::from_le_bytes([g[6], g[7]]);
    let tail: String = g[10..].iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{{{d1:08X}-{d2:04X}-{d3:04X}-{:02X}{:02X}-{tail}}}",
        g[8], g[9]
    )
}

/// A fresh random (version 4) GUID. No RNG crate is needed: `RandomState` is seeded from
/// the OS per process, mixed with the time and a counter so two calls never repeat.
pub(crate) fn random() -> Guid {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let state = RandomState::new();
    let mut out = [0u8; 16];
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_u128(nanos);
        h.write_u64(n);
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    // RFC 4122 version 4 and variant bits; data3's high byte is byte 7 on disk.
    out[7] = (out[7] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn text_and_disk_order_round_trip() {
        let bat = guid(
            0x2DC2_7766,
            0xF623,
            0x4200,
            [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
        );
        assert_eq!(&bat[..4], &[0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}"), Some(bat));
        assert_eq!(parse("2dc27766-f623-4200-9d64-115e9bfd4a08"), Some(bat));
        assert_eq!(format(&bat), "{2DC27766-F623-4200-9D64-115E9BFD4A08}");
        assert_eq!(parse("{2DC27766-F623-4200-9D64}"), None);
        assert_eq!(parse("{2DC27766-F623-4200-9D64-115E9BFD4A0G}"), None);
        assert_ne!(random(), random());
    }
}
