//! Turns a [`Disk`] into an ordered extent stream, reading data chunks on several threads
//! at once (so inflating streamOptimized grains uses every core) while the consumer sees
//! them strictly in order, with a bounded number of chunks in memory.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Mutex, PoisonError, mpsc};

use bytes::{Bytes, BytesMut};
use rehost_core::{Extent, ExtentKind};

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::map::MapWalker;
use crate::sink::is_zero;

/// How to stream a disk.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Largest `Data` extent handed out; data is split at multiples of it. 1 MiB keeps
    /// threads busy and memory low (in flight: about `2 × threads` chunks).
    pub chunk_bytes: u64,
    /// Reader threads. 1 reads on the caller's thread.
    pub threads: usize,
    /// Report all-zero data chunks as `Zero` (what a full image wants; a delta writer
    /// still writes them, since `Zero` is not `Unchanged`).
    pub detect_zeros: bool,
    /// Unallocated areas are reported as `Unchanged` (a delta's "as in the parent", a base
    /// image's hole) unless this is set, in which case they are reported as `Zero`.
    pub unallocated_as_zero: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            chunk_bytes: 1 << 20,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            detect_zeros: true,
            unallocated_as_zero: false,
        }
    }
}

/// A piece of work: data to read, or a non-data extent passed through in order.
enum Job {
    Read { offset: u64, len: u64 },
    Ready(Extent),
}

/// Calls `sink` with every extent of `disk`, in order, covering the whole disk.
pub fn for_each_extent(
    disk: &Disk,
    options: &StreamOptions,
    mut sink: impl FnMut(Extent) -> Result<()>,
) -> Result<()> {
    if options.threads <= 1 {
        return plan(disk, options, |job| sink(run(disk, options, job)?));
    }
    let threads = options.threads;
    let max_in_flight = threads * 2;
    std::thread::scope(|scope| {
        // Dispatching a job takes a token; emitting a result gives it back. So at most
        // `max_in_flight` chunks exist between the planner and the sink, however slow one is.
        let (token_tx, token_rx) = sync_channel::<()>(max_in_flight);
        let (job_tx, job_rx) = sync_channel::<(u64, Job)>(threads);
        let (result_tx, result_rx) = mpsc::channel::<(u64, Result<Extent>)>();
        let job_rx = std::sync::Arc::new(Mutex::new(job_rx));

        let planner = scope.spawn(move || {
            let mut seq = 0u64;
            plan(disk, options, |job| {
                token_tx.send(()).map_err(|_| stopped())?;
                job_tx.send((seq, job)).map_err(|_| stopped())?;
                seq += 1;
                Ok(())
            })
        });
        for _ in 0..threads {
            let (job_rx, result_tx) = (job_rx.clone(), result_tx.clone());
            scope.spawn(move || {
                while let Some((seq, job)) = next_job(&job_rx) {
                    if result_tx.send((seq, run(disk, options, job))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(result_tx);

        let consumed = consume(result_rx, &token_rx, &mut sink);
        // Dropping the receivers unblocks the planner and the workers if we stopped early.
        drop(token_rx);
        let planned = planner
            .join()
            .unwrap_or_else(|_| Err(Error::InvalidInput("planner thread panicked".into())));
        match (consumed, planned) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    })
}

fn next_job(job_rx: &Mutex<Receiver<(u64, Job)>>) -> Option<(u64, Job)> {
    job_rx
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .recv()
        .ok()
}

fn consume(
    results: Receiver<(u64, Result<Extent>)>,
    tokens: &Receiver<()>,
    sink: &mut impl FnMut(Extent) -> Result<()>,
) -> Result<()> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for (seq, result) in results {
        pending.insert(seq, result);
        while let Some(result) = pending.remove(&next) {
            sink(result?)?;
            let _ = tokens.recv();
            next += 1;
        }
    }
    Ok(())
}

fn stopped() -> Error {
    Error::InvalidInput("extent stream stopped".into())
}

/// Walks the disk's map and calls `dispatch` with jobs in disk order.
fn plan(
    disk: &Disk,
    options: &StreamOptions,
    mut dispatch: impl FnMut(Job) -> Result<()>,
) -> Result<()> {
    let chunk = options.chunk_bytes.max(512);
    for (window_offset, window_len) in MapWalker::new(disk.virtual_size()) {
        for e in disk.map_range(window_offset, window_len)? {
            match e.kind {
                ExtentKind::Data => {
                    let mut offset = e.offset;
                    while offset < e.end() {
                        let boundary = (offset / chunk + 1) * chunk;
                        let len = boundary.min(e.end()) - offset;
                        dispatch(Job::Read { offset, len })?;
                        offset += len;
                    }
                }
                ExtentKind::Zero => dispatch(Job::Ready(Extent::Zero {
                    offset: e.offset,
                    len: e.len,
                }))?,
                ExtentKind::Unallocated if options.unallocated_as_zero => {
                    dispatch(Job::Ready(Extent::Zero {
                        offset: e.offset,
                        len: e.len,
                    }))?
                }
                ExtentKind::Unallocated => dispatch(Job::Ready(Extent::Unchanged {
                    offset: e.offset,
                    len: e.len,
                }))?,
            }
        }
    }
    Ok(())
}

fn run(disk: &Disk, options: &StreamOptions, job: Job) -> Result<Extent> {
    match job {
        Job::Ready(extent) => Ok(extent),
        Job::Read { offset, len } => {
            let len =
                usize::try_from(len).map_err(|_| Error::InvalidInput("chunk too large".into()))?;
            let mut buf = BytesMut::zeroed(len);
            disk.read_at(&mut buf, offset)?;
            if options.detect_zeros && is_zero(&buf) {
                Ok(Extent::Zero {
                    offset,
                    len: len as u64,
                })
            } else {
                Ok(Extent::Data {
                    offset,
                    data: Bytes::from(buf),
                })
            }
        }
    }
}

/// Merges neighbouring extents of the same non-data kind, which chunking and zero
/// detection leave split; writers and uploaders then see one run per hole.
#[derive(Debug, Default)]
pub struct Coalescer {
    pending: Option<Extent>,
}

impl Coalescer {
    /// Takes `extent`; returns the extent that is now complete, if any.
    pub fn push(&mut self, extent: Extent) -> Option<Extent> {
        match (&mut self.pending, extent) {
            (Some(Extent::Zero { len, .. }), Extent::Zero { len: more, .. })
            | (Some(Extent::Unchanged { len, .. }), Extent::Unchanged { len: more, .. }) => {
                *len += more;
                None
            }
            (pending, extent) => pending.replace(extent),
        }
    }

    /// The last extent held back.
    pub fn finish(self) -> Option<Extent> {
        self.pending
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::io::MemFs;

    fn disk_of(bytes: Vec<u8>) -> Disk {
        Disk::from_bytes(&MemFs::new(), "raw", bytes).unwrap()
    }

    fn collect(disk: &Disk, threads: usize) -> Vec<Extent> {
        let options = StreamOptions {
            chunk_bytes: 4096,
            threads,
            ..Default::default()
        };
        let mut out = Vec::new();
        for_each_extent(disk, &options, |e| {
            out.push(e);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn threaded_stream_is_ordered_and_complete() {
        let mut bytes = vec![0u8; 1 << 20];
        for (i, b) in bytes.iter_mut().enumerate().skip(8192).step_by(3) {
            *b = (i % 251) as u8 + 1;
        }
        let disk = disk_of(bytes.clone());
        let one = collect(&disk, 1);
        let many = collect(&disk, 4);
        assert_eq!(one, many);
        let mut rebuilt = vec![0u8; bytes.len()];
        let mut pos = 0;
        for e in &many {
            assert_eq!(e.offset(), pos);
            if let Extent::Data { offset, data } = e {
                rebuilt[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            pos = e.end();
        }
        assert_eq!(pos, bytes.len() as u64);
        assert_eq!(rebuilt, bytes);
        assert!(matches!(
            many[0],
            Extent::Zero {
                offset: 0,
                len: 4096
            }
        ));
    }

    #[test]
    fn a_failing_sink_stops_the_stream() {
        let disk = disk_of(vec![1u8; 1 << 20]);
        let options = StreamOptions {
            chunk_bytes: 4096,
            threads: 3,
            ..Default::default()
        };
        let mut seen = 0;
        let err = for_each_extent(&disk, &options, |_| {
            seen += 1;
            if seen == 5 {
                Err(Error::InvalidInput("stop".into()))
            } else {
                Ok(())
            }
        });
        assert!(err.is_err());
        assert_eq!(seen, 5);
    }

    #[test]
    fn coalescer_merges_holes() {
        let mut c = Coalescer::default();
        assert_eq!(c.push(Extent::Zero { offset: 0, len: 1 }), None);
        assert_eq!(c.push(Extent::Zero { offset: 1, len: 2 }), None);
        assert_eq!(
            c.push(Extent::Unchanged { offset: 3, len: 1 }),
            Some(Extent::Zero { offset: 0, len: 3 })
        );
        assert_eq!(c.finish(), Some(Extent::Unchanged { offset: 3, len: 1 }));
    }
}
