//! Page ranges: the blob service's `<PageList>` answer, read purely from bytes, and the plan
//! of a disk read made from it — 64 KiB grains to read, grains known to be zero, and the
//! rest unchanged.
//!
//! A managed disk's blob is a fixed VHD: the disk's bytes and then a 512-byte footer, whose
//! page the list includes and which is not disk data; the plan clips everything to the
//! disk's size.

use quick_xml::Reader;
use quick_xml::events::Event;

use crate::error::{Error, Result};

/// The page size of a page blob: every range starts and ends on it.
pub const PAGE_SIZE: u64 = 512;

/// One `<PageRange>` or `<ClearRange>`, as a half-open byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// A `<ClearRange>`: pages cleared since the previous snapshot (read as zeros).
    pub cleared: bool,
}

/// One answer of Get Page Ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageList {
    /// The ranges, in offset order.
    pub ranges: Vec<PageRange>,
    /// Where the next answer starts, when the list goes on.
    pub next_marker: Option<String>,
}

/// Parses a `<PageList>` answer. Ranges must be page-aligned, in order and disjoint; the
/// service guarantees it, and a list that breaks it would make a wrong disk.
pub fn parse_page_list(body: &[u8]) -> Result<PageList> {
    let bad = |detail: String| Error::Protocol {
        operation: "Get Page Ranges".into(),
        detail,
    };
    let mut reader = Reader::from_reader(body);
    reader.config_mut().trim_text(true);
    let mut list = PageList::default();
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut start: Option<u64> = None;
    let mut end: Option<u64> = None;
    let mut saw_root = false;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| bad(format!("XML at byte {}: {e}", reader.buffer_position())))?;
        match event {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_vec();
                if path.is_empty() {
                    if name != b"PageList" {
                        return Err(bad(format!(
                            "the root element is <{}>, not <PageList>",
                            String::from_utf8_lossy(&name)
                        )));
                    }
                    saw_root = true;
                }
                if matches!(name.as_slice(), b"PageRange" | b"ClearRange") {
                    start = None;
                    end = None;
                }
                path.push(name);
                if path.len() > 8 {
                    return Err(bad("elements nested too deeply".into()));
                }
            }
            Event::Empty(e) if path.is_empty() && e.local_name().as_ref() == b"PageList" => {
                saw_root = true;
            }
            Event::Text(t) => {
                let text = t
                    .decode()
                    .map_err(|e| bad(format!("text: {e}")))?
                    .into_owned();
                let Some(leaf) = path.last() else { continue };
                let number = || {
                    text.trim()
                        .parse::<u64>()
                        .map_err(|_| bad(format!("{text:?} is not a byte offset")))
                };
                match (path.len(), leaf.as_slice()) {
                    (3, b"Start") => start = Some(number()?),
                    (3, b"End") => end = Some(number()?),
                    (2, b"NextMarker") if !text.trim().is_empty() => {
                        list.next_marker = Some(text.trim().to_owned());
                    }
                    _ => {}
                }
            }
            Event::End(_) => {
                let Some(name) = path.pop() else {
                    return Err(bad("an end tag without its start".into()));
                };
                if path.len() == 1 && matches!(name.as_slice(), b"PageRange" | b"ClearRange") {
                    let cleared = name == b"ClearRange";
                    let (Some(s), Some(e)) = (start, end) else {
                        return Err(bad("a range without Start or End".into()));
                    };
                    let range = checked_range(s, e, cleared).map_err(bad)?;
                    if let Some(last) = list.ranges.last()
                        && range.start < last.end
                    {
                        return Err(bad(format!(
                            "range {}-{} overlaps or precedes {}-{}",
                            range.start,
                            range.end - 1,
                            last.start,
                            last.end - 1
                        )));
                    }
                    list.ranges.push(range);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !saw_root {
        return Err(bad("no <PageList> element".into()));
    }
    if !path.is_empty() {
        return Err(bad("the XML ends inside an element".into()));
    }
    Ok(list)
}

fn checked_range(
    start: u64,
    end_inclusive: u64,
    cleared: bool,
) -> std::result::Result<PageRange, String> {
    let end = end_inclusive
        .checked_add(1)
        .ok_or_else(|| format!("End {end_inclusive} is out of range"))?;
    if end <= start || start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 {
        return Err(format!(
            "range {start}-{end_inclusive} is not whole 512-byte pages"
        ));
    }
    Ok(PageRange {
        start,
        end,
        cleared,
    })
}

pub use rehost_core::plan::{Area, AreaKind};

/// Turns page ranges (in order, disjoint) into `block`-aligned areas within `[0, capacity)`:
/// a block any written page touches is read whole; a block wholly cleared is zero; a block
/// partly cleared and otherwise untouched is read too (its other pages are as in the parent,
/// which only the blob holds). Ranges past `capacity` (the VHD footer's page) are dropped.
pub fn plan_areas(ranges: &[PageRange], capacity: u64, block: u64) -> Vec<Area> {
    let block = block.max(PAGE_SIZE);
    let block_len = |index: u64| (capacity - index * block).min(block);
    let mut areas: Vec<Area> = Vec::new();
    // The block being looked at: its index, whether a written page touches it, and how many
    // of its bytes are cleared.
    let mut current: Option<(u64, bool, u64)> = None;
    let flush = |current: Option<(u64, bool, u64)>, areas: &mut Vec<Area>| {
        let Some((index, written, cleared)) = current else {
            return;
        };
        let len = block_len(index);
        let kind = if !written && cleared >= len {
            AreaKind::Zero
        } else {
            AreaKind::Read
        };
        let offset = index * block;
        match areas.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.len == offset => last.len += len,
            _ => areas.push(Area { offset, len, kind }),
        }
    };
    for range in ranges {
        let start = range.start.min(capacity);
        let end = range.end.min(capacity);
        let mut at = start;
        while at < end {
            let index = at / block;
            let piece_end = end.min((index + 1) * block);
            match current.as_mut() {
                Some((i, written, cleared)) if *i == index => {
                    if range.cleared {
                        *cleared += piece_end - at;
                    } else {
                        *written = true;
                    }
                }
                _ => {
                    flush(current.take(), &mut areas);
                    current = Some(if range.cleared {
                        (index, false, piece_end - at)
                    } else {
                        (index, true, 0)
                    });
                }
            }
            at = piece_end;
        }
    }
    flush(current, &mut areas);
    areas
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1024;

    fn xml(ranges: &[(u64, u64, bool)], marker: Option<&str>) -> Vec<u8> {
        let mut s = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><PageList>");
        for (start, end, cleared) in ranges {
            let tag = if *cleared { "ClearRange" } else { "PageRange" };
            s.push_str(&format!(
                "<{tag}><Start>{start}</Start><End>{}</End></{tag}>",
                end - 1
            ));
        }
        match marker {
            Some(m) => s.push_str(&format!("<NextMarker>{m}</NextMarker>")),
            None => s.push_str("<NextMarker />"),
        }
        s.push_str("</PageList>");
        s.into_bytes()
    }

    #[test]
    fn a_page_list_is_read() {
        let list = parse_page_list(&xml(&[(0, 512, false), (4096, 8192, true)], Some("m2")))
            .expect("list");
        assert_eq!(
            list.ranges,
            vec![
                PageRange {
                    start: 0,
                    end: 512,
                    cleared: false
                },
                PageRange {
                    start: 4096,
                    end: 8192,
                    cleared: true
                }
            ]
        );
        assert_eq!(list.next_marker.as_deref(), Some("m2"));
        let empty = parse_page_list(b"<?xml version=\"1.0\"?><PageList />").expect("empty");
        assert!(empty.ranges.is_empty() && empty.next_marker.is_none());
    }

    #[test]
    fn broken_lists_are_refused() {
        for body in [
            &b""[..],
            b"<Error><Code>x</Code></Error>",
            b"<PageList><PageRange><Start>0</Start></PageRange></PageList>",
            b"<PageList><PageRange><Start>1</Start><End>511</End></PageRange></PageList>",
            b"<PageList><PageRange><Start>512</Start><End>511</End></PageRange></PageList>",
            b"<PageList><PageRange><Start>x</Start><End>511</End></PageRange></PageList>",
            b"<PageList><PageRange><Start>0</Start><End>18446744073709551615</End></PageRange></PageList>",
            b"<PageList><PageRange><Start>0</Start><End>1023</End>",
        ] {
            assert!(
                parse_page_list(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let overlapping = xml(&[(0, 1024, false), (512, 2048, false)], None);
        assert!(parse_page_list(&overlapping).is_err());
    }

    fn r(start: u64, end: u64, cleared: bool) -> PageRange {
        PageRange {
            start,
            end,
            cleared,
        }
    }

    #[test]
    fn blocks_are_read_zeroed_or_left() {
        let block = 512 * KIB;
        let capacity = 8 * block;
        let areas = plan_areas(
            &[
                r(4096, 8192, false),                // block 0: read
                r(2 * block, 4 * block, true),       // blocks 2-3: cleared whole: zero
                r(5 * block, 5 * block + 512, true), // block 5: partly cleared: read
                r(capacity, capacity + 512, false),  // the VHD footer: dropped
            ],
            capacity,
            block,
        );
        assert_eq!(
            areas,
            vec![
                Area {
                    offset: 0,
                    len: block,
                    kind: AreaKind::Read
                },
                Area {
                    offset: 2 * block,
                    len: 2 * block,
                    kind: AreaKind::Zero
                },
                Area {
                    offset: 5 * block,
                    len: block,
                    kind: AreaKind::Read
                },
            ]
        );
    }

    #[test]
    fn a_written_page_wins_over_a_clear_in_the_same_block() {
        let block = 512 * KIB;
        let areas = plan_areas(
            &[r(0, block - 512, true), r(block - 512, block, false)],
            block,
            block,
        );
        assert_eq!(
            areas,
            vec![Area {
                offset: 0,
                len: block,
                kind: AreaKind::Read
            }]
        );
    }

    proptest! {
        /// Every changed byte is in an area, areas are aligned, disjoint and in order, and
        /// a Zero area holds no written page.
        #[test]
        fn plans_cover_what_changed(
            pieces in proptest::collection::vec((0u64..64, 1u64..40, any::<bool>()), 0..20),
            blocks in 1u64..8,
        ) {
            let block = 4 * KIB;
            let capacity = blocks * 16 * KIB;
            let mut ranges = Vec::new();
            let mut at = 0;
            for (gap, len, cleared) in pieces {
                let start = at + gap * PAGE_SIZE;
                let end = start + len * PAGE_SIZE;
                ranges.push(r(start, end, cleared));
                at = end;
            }
            let areas = plan_areas(&ranges, capacity, block);
            let mut last_end = 0;
            for a in &areas {
                prop_assert!(a.offset % block == 0 && a.offset >= last_end && a.len > 0);
                prop_assert!(a.offset + a.len <= capacity);
                last_end = a.offset + a.len;
            }
            for range in &ranges {
                let (s, e) = (range.start.min(capacity), range.end.min(capacity));
                let mut p = s;
                while p < e {
                    let area = areas.iter().find(|a| a.offset <= p && p < a.offset + a.len);
                    prop_assert!(area.is_some(), "byte {} not covered", p);
                    if !range.cleared {
                        prop_assert_eq!(area.map(|a| a.kind), Some(AreaKind::Read));
                    }
                    p += PAGE_SIZE;
                }
            }
        }

        #[test]
        fn any_bytes_parse_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_page_list(&body);
        }
    }
}
