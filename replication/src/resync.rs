//! Resynchronisation of one replica, sans-IO: which chunk of which stale region the primary
//! copies to it next, how many chunks are out at once, and when a region is done.
//!
//! The primary copies one stale region at a time, in region order, in chunks of at most
//! `chunk_blocks`, with at most `window` chunks read or sent and not yet answered. A region is
//! done when every chunk of it was acknowledged (durably: a Resync frame is written with
//! FUA); [`Resync::answered`] then returns it with the sequence it was copied through (the
//! primary's last write when its first chunk was read), for
//! [`crate::primary::PrimaryVolume::resynced`]. A chunk that fails makes its region be copied
//! again from its start.

use crate::primary::PrimaryVolume;

/// One chunk to copy: read from the primary's copy, sent as a Resync frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub region: u64,
    /// Volume blocks.
    pub lba: u64,
    pub blocks: u32,
}

#[derive(Debug)]
struct Copying {
    region: u64,
    next: u64,
    end: u64,
    through: u64,
    unanswered: usize,
    failed: bool,
}

/// One replica's resync.
#[derive(Debug)]
pub struct Resync {
    chunk_blocks: u32,
    window: usize,
    current: Option<Copying>,
    in_flight: usize,
    /// Bytes copied and acknowledged, for progress.
    copied_blocks: u64,
}

impl Resync {
    pub fn new(chunk_blocks: u32, window: usize) -> Self {
        assert!(chunk_blocks > 0 && window > 0);
        Self {
            chunk_blocks,
            window,
            current: None,
            in_flight: 0,
            copied_blocks: 0,
        }
    }

    /// Chunks read or sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Blocks copied and acknowledged so far.
    pub fn copied_blocks(&self) -> u64 {
        self.copied_blocks
    }

    /// The next chunk to copy to replica `replica` of `primary`, if the window has room: the
    /// rest of the region being copied, else the first stale region once the one before is
    /// answered.
    pub fn next(&mut self, primary: &PrimaryVolume, replica: usize) -> Option<Chunk> {
        if self.in_flight >= self.window {
            return None;
        }
        if self
            .current
            .as_ref()
            .is_some_and(|copying| copying.next == copying.end && copying.unanswered > 0)
        {
            // The region's last chunks are out: the next region waits for their answers.
            return None;
        }
        if self.current.is_none() {
            let &region = primary.stale(replica).iter().next()?;
            let (first, blocks) = primary.region_blocks(region);
            self.current = Some(Copying {
                region,
                next: first,
                end: first + blocks,
                through: primary.last_sequence(),
                unanswered: 0,
                failed: false,
            });
        }
        let copying = self.current.as_mut().expect("set above");
        let blocks = (copying.end - copying.next).min(self.chunk_blocks as u64) as u32;
        if blocks == 0 {
            // An empty region (past the volume's end): nothing to copy.
            self.current = None;
            return None;
        }
        let chunk = Chunk {
            region: copying.region,
            lba: copying.next,
            blocks,
        };
        copying.next += blocks as u64;
        copying.unanswered += 1;
        self.in_flight += 1;
        Some(chunk)
    }

    /// A chunk of `region` was acknowledged (`ok`) or failed. When the region's last chunk is
    /// answered: the region and the sequence it was copied through if every chunk went well
    /// (else it is copied again).
    pub fn answered(&mut self, chunk: Chunk, ok: bool) -> Option<(u64, u64)> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let copying = self.current.as_mut()?;
        if copying.region != chunk.region {
            return None;
        }
        copying.unanswered -= 1;
        copying.failed |= !ok;
        if ok {
            self.copied_blocks += chunk.blocks as u64;
        }
        if copying.next < copying.end || copying.unanswered > 0 {
            return None;
        }
        let done = self.current.take().expect("checked above");
        (!done.failed).then_some((done.region, done.through))
    }

    /// The session broke: what was out is lost, and the region is copied again from its
    /// start next time.
    pub fn reset(&mut self) {
        self.current = None;
        self.in_flight = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three copies, 8 MiB of 4 KiB blocks in 1 MiB regions (256 blocks each).
    fn volume() -> PrimaryVolume {
        PrimaryVolume::new(2, 2048, 4096, 20, 0)
    }

    /// Replica 1 missed writes to regions 2 and 5, and came back.
    fn stale_volume() -> PrimaryVolume {
        let mut v = volume();
        v.replica_lost(1);
        for lba in [2 * 256 + 3, 5 * 256] {
            let (sequence, _) = v.begin_write(lba, 1, false);
            v.local_done(sequence, true);
            v.replica_done(0, sequence, true);
            v.replica_done(1, sequence, false);
        }
        v.replica_rejoined(1);
        v
    }

    #[test]
    fn stale_regions_are_copied_in_order_in_chunks_and_each_is_done_once_answered() {
        let mut v = stale_volume();
        assert_eq!(v.stale(1).iter().copied().collect::<Vec<_>>(), vec![2, 5]);
        let mut resync = Resync::new(64, 3);
        let first: Vec<Chunk> = std::iter::from_fn(|| resync.next(&v, 1)).collect();
        assert_eq!(
            first,
            vec![
                Chunk {
                    region: 2,
                    lba: 512,
                    blocks: 64
                },
                Chunk {
                    region: 2,
                    lba: 576,
                    blocks: 64
                },
                Chunk {
                    region: 2,
                    lba: 640,
                    blocks: 64
                },
            ],
            "a window of three"
        );
        assert_eq!(resync.answered(first[0], true), None);
        let fourth = resync.next(&v, 1).unwrap();
        assert_eq!(
            fourth,
            Chunk {
                region: 2,
                lba: 704,
                blocks: 64
            }
        );
        assert_eq!(resync.next(&v, 1), None, "region 2 is all out; 5 waits");
        assert_eq!(resync.answered(first[1], true), None);
        assert_eq!(resync.answered(first[2], true), None);
        let (region, through) = resync.answered(fourth, true).unwrap();
        assert_eq!((region, through), (2, 2));
        assert!(!v.resynced(1, region, through));
        let next = resync.next(&v, 1).unwrap();
        assert_eq!(
            next,
            Chunk {
                region: 5,
                lba: 1280,
                blocks: 64
            }
        );
        assert_eq!(resync.copied_blocks(), 256);
    }

    #[test]
    fn a_failed_chunk_or_a_lost_session_copies_the_region_again() {
        let v = stale_volume();
        let mut resync = Resync::new(128, 4);
        let a = resync.next(&v, 1).unwrap();
        let b = resync.next(&v, 1).unwrap();
        assert_eq!(resync.answered(a, false), None);
        assert_eq!(resync.answered(b, true), None, "not done: a failed");
        assert_eq!(
            resync.next(&v, 1),
            Some(Chunk {
                region: 2,
                lba: 512,
                blocks: 128
            }),
            "region 2 again"
        );
        resync.reset();
        assert_eq!(resync.in_flight(), 0);
        assert_eq!(
            resync.next(&v, 1),
            Some(Chunk {
                region: 2,
                lba: 512,
                blocks: 128
            })
        );
    }

    #[test]
    fn an_in_sync_replica_has_nothing_to_copy() {
        let v = volume();
        let mut resync = Resync::new(64, 2);
        assert_eq!(resync.next(&v, 0), None);
    }
}
