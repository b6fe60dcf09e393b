//! The primary's bookkeeping for one volume, sans-IO: sequence numbers, which copies hold
//! each write, when the client may be answered, and which regions each replica may lack.
//!
//! A volume has `1 + remotes` copies (the primary's own counts) and a majority is
//! `copies / 2 + 1`. For every write (Write, WriteZeroes, Trim):
//! 1. [`PrimaryVolume::begin_write`] gives it the next sequence and marks its regions dirty
//!    for every replica. Regions newly dirty are returned: their bitmap blocks go to the
//!    device (FUA) before the write is sent to anyone (activity-log semantics: after a crash,
//!    every region a replica may lack is marked).
//! 2. The local IO and one frame per replica go out in parallel; each completion is reported
//!    ([`PrimaryVolume::local_done`], [`PrimaryVolume::replica_done`]).
//! 3. The client is answered once a majority of copies completed the write (FUA: made it
//!    durable), or with an error once a majority can no longer be reached. A slow or absent
//!    replica never holds the answer back; it keeps its dirty bits and is caught up later.
//!
//! A flush ([`PrimaryVolume::begin_flush`]) covers every write acknowledged to the client
//! before it; it is answered once a majority of copies report those writes durable (a
//! replica's FlushAck says "durable up to sequence S").
//!
//! A region is clean for a replica again when every write to it is durable on that replica.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::meta::DirtyMap;

/// Which copy: the primary's own, or a replica by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Copy {
    Local,
    Replica(usize),
}

/// The client's answer for a write or a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A majority holds it (durably, for FUA and flushes).
    Done { sequence: u64 },
    /// A majority can no longer hold it.
    Failed { sequence: u64 },
}

#[derive(Debug)]
struct InFlight {
    fua: bool,
    first_region: u64,
    last_region: u64,
    /// Copies that completed it (bit 0 the primary's, bit 1 + i replica i's), and those
    /// that failed.
    done: u64,
    failed: u64,
    /// Copies whose completion counts for its majority: the primary's, and the replicas in
    /// sync when it began (one that lacks earlier writes to the region could not give it
    /// back whole to a new primary).
    counting: u64,
    answered: bool,
}

#[derive(Debug)]
struct Flush {
    /// Every write up to this sequence that was acknowledged must be durable.
    target: u64,
    durable: u64,
    failed: u64,
    answered: bool,
}

/// One replicated volume on its primary.
#[derive(Debug)]
pub struct PrimaryVolume {
    remotes: usize,
    volume_blocks: u64,
    region_shift: u32,
    block_bytes: u64,
    next_sequence: u64,
    writes: BTreeMap<u64, InFlight>,
    /// The highest sequence answered to the client so far (flushes cover up to it).
    acknowledged: u64,
    /// Per copy (0: local, 1 + i: replica i): every write up to this sequence is durable there.
    durable: Vec<u64>,
    flushes: BTreeMap<u64, Flush>,
    next_flush: u64,
    /// Per replica: the regions it may lack, and per dirty region the last write to it.
    dirty: Vec<DirtyMap>,
    last_write: Vec<HashMap<u64, u64>>,
    /// Per replica: the regions it missed writes to while it was away (or all, for a new
    /// copy). No flush cleans them, only a resync ([`PrimaryVolume::resynced`]); while any
    /// is left the replica is out of sync and counts for no majority.
    stale: Vec<BTreeSet<u64>>,
}

impl PrimaryVolume {
    /// A volume of `blocks` blocks of `block_bytes` with `remotes` replicas besides this
    /// copy, regions of `1 << region_shift` bytes, whose last write had sequence `sequence`.
    pub fn new(
        remotes: usize,
        blocks: u64,
        block_bytes: u32,
        region_shift: u32,
        sequence: u64,
    ) -> Self {
        assert!(remotes < 63, "at most 62 replicas fit the masks");
        let regions = (blocks * block_bytes as u64).div_ceil(1 << region_shift);
        Self {
            remotes,
            volume_blocks: blocks,
            region_shift,
            block_bytes: block_bytes as u64,
            next_sequence: sequence + 1,
            writes: BTreeMap::new(),
            acknowledged: sequence,
            durable: vec![sequence; 1 + remotes],
            flushes: BTreeMap::new(),
            next_flush: 1,
            dirty: (0..remotes).map(|_| DirtyMap::new(regions)).collect(),
            last_write: (0..remotes).map(|_| HashMap::new()).collect(),
            stale: (0..remotes).map(|_| BTreeSet::new()).collect(),
        }
    }

    /// Whether replica `replica` counts for majorities: it lacks no write from before its
    /// stream began (no stale region).
    pub fn in_sync(&self, replica: usize) -> bool {
        self.stale[replica].is_empty()
    }

    /// Loads replica `replica`'s dirty-region bitmap block `index` as stored (a primary that
    /// restarts learns which regions each replica may lack).
    pub fn load_dirty(
        &mut self,
        replica: usize,
        index: usize,
        block: &[u8],
    ) -> Result<(), crate::meta::MetaError> {
        self.dirty[replica].load_block(index, block)?;
        self.dirty[replica].take_changed();
        Ok(())
    }

    /// Replica `replica`'s bitmap block `index`, to be written.
    pub fn dirty_block(&self, replica: usize, index: usize) -> [u8; crate::meta::BLOCK_BYTES] {
        self.dirty[replica].block(index)
    }

    /// The regions replica `replica` must be resynchronised in, in order.
    pub fn stale(&self, replica: usize) -> &BTreeSet<u64> {
        &self.stale[replica]
    }

    /// The blocks of region `region`: its first block and how many (the last is short when
    /// the volume ends inside it).
    pub fn region_blocks(&self, region: u64) -> (u64, u64) {
        let per_region = (1u64 << self.region_shift) / self.block_bytes;
        let first = region * per_region;
        (first, per_region.min(self.blocks().saturating_sub(first)))
    }

    fn blocks(&self) -> u64 {
        self.volume_blocks
    }

    /// Whether a write not yet completed on the primary's own copy touches `region` (a
    /// resync read of it waits for them).
    pub fn local_pending(&self, region: u64) -> bool {
        let bit = Self::bit(Copy::Local);
        self.writes.values().any(|write| {
            write.done & bit == 0
                && write.failed & bit == 0
                && (write.first_region..=write.last_region).contains(&region)
        })
    }

    /// Replica `replica` lacks `regions` (a new primary's reconciliation found them behind
    /// there): they are resynchronised before it counts again.
    pub fn mark_stale(&mut self, replica: usize, regions: &[u64]) {
        for &region in regions {
            if region < self.dirty[replica].regions() {
                self.dirty[replica].set(region);
                self.stale[replica].insert(region);
            }
        }
    }

    /// Replica `replica`'s copy is new (a replaced or wiped disk): every region is stale and
    /// it is rebuilt in full. Returns the bitmap blocks that changed.
    pub fn replica_is_new(&mut self, replica: usize) -> Vec<usize> {
        let regions = self.dirty[replica].regions();
        for region in 0..regions {
            self.dirty[replica].set(region);
            self.stale[replica].insert(region);
        }
        self.dirty[replica].take_changed()
    }

    /// The sequence of the last write begun.
    pub fn last_sequence(&self) -> u64 {
        self.next_sequence - 1
    }

    /// A replica has applied writes up to `sequence` (a primary that restarted learns where
    /// the volume's numbering stands): the next write numbers after it.
    pub fn observe(&mut self, sequence: u64) {
        if sequence >= self.next_sequence {
            self.next_sequence = sequence + 1;
        }
    }

    /// Replica `replica`'s session is gone: every write and flush it had not answered failed
    /// there (it keeps the dirty bits of those writes). Returns the answers now decided.
    pub fn replica_lost(&mut self, replica: usize) -> Vec<(Option<u64>, Answer)> {
        let bit = Self::bit(Copy::Replica(replica));
        let open: Vec<u64> = self
            .writes
            .iter()
            .filter(|(_, write)| (write.done | write.failed) & bit == 0)
            .map(|(&sequence, _)| sequence)
            .collect();
        let mut answers: Vec<(Option<u64>, Answer)> = open
            .into_iter()
            .filter_map(|sequence| self.replica_done(replica, sequence, false))
            .map(|answer| (None, answer))
            .collect();
        answers.extend(
            self.flush_done(Copy::Replica(replica), 0, false)
                .into_iter()
                .map(|(id, answer)| (Some(id), answer)),
        );
        answers
    }

    /// Replica `replica` opens a new stream: its base, the last write begun (every write up
    /// to it is on the replica or in its dirty regions). The regions it may lack from before
    /// are then cleaned only by a resync; it is in sync again when none is left.
    pub fn replica_rejoined(&mut self, replica: usize) -> u64 {
        let dirty: Vec<u64> = self.dirty[replica].dirty().collect();
        self.stale[replica].extend(dirty);
        self.durable[1 + replica] = self.last_sequence();
        self.last_sequence()
    }

    /// Region `region` was copied to replica `replica` and is durable there (a resync), as
    /// the primary's copy held it once every write up to `through` had completed there. The
    /// region is clean unless a later write to it is not yet durable on the replica. Returns
    /// whether the replica is in sync now.
    pub fn resynced(&mut self, replica: usize, region: u64, through: u64) -> bool {
        if self.stale[replica].remove(&region) {
            let later = self.last_write[replica]
                .get(&region)
                .is_some_and(|&last| last > through);
            if !later {
                self.last_write[replica].remove(&region);
                self.dirty[replica].clear(region);
            }
        }
        self.in_sync(replica)
    }

    /// Copies that make a majority.
    pub fn majority(&self) -> u32 {
        let copies = 1 + self.remotes as u32;
        copies / 2 + 1
    }

    pub fn dirty(&self, replica: usize) -> &DirtyMap {
        &self.dirty[replica]
    }

    /// Writes not yet answered.
    pub fn in_flight(&self) -> usize {
        self.writes.values().filter(|write| !write.answered).count()
    }

    fn bit(copy: Copy) -> u64 {
        match copy {
            Copy::Local => 1,
            Copy::Replica(index) => 1 << (1 + index),
        }
    }

    fn regions(&self, lba: u64, blocks: u32) -> (u64, u64) {
        let first = (lba * self.block_bytes) >> self.region_shift;
        let last = ((lba + blocks.max(1) as u64) * self.block_bytes - 1) >> self.region_shift;
        (
            first,
            last.min(
                self.dirty
                    .first()
                    .map_or(u64::MAX, |map| map.regions().saturating_sub(1)),
            ),
        )
    }

    /// A new write of `blocks` from `lba`: its sequence, and for each replica the bitmap
    /// blocks that changed (to be written before the write is sent).
    pub fn begin_write(&mut self, lba: u64, blocks: u32, fua: bool) -> (u64, Vec<(usize, usize)>) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let (first_region, last_region) = self.regions(lba, blocks);
        let mut changed = Vec::new();
        let mut counting = Self::bit(Copy::Local);
        for replica in 0..self.remotes {
            if self.stale[replica].is_empty() {
                counting |= Self::bit(Copy::Replica(replica));
            }
            for region in first_region..=last_region {
                self.dirty[replica].set(region);
                self.last_write[replica].insert(region, sequence);
            }
            changed.extend(
                self.dirty[replica]
                    .take_changed()
                    .into_iter()
                    .map(|block| (replica, block)),
            );
        }
        self.writes.insert(
            sequence,
            InFlight {
                fua,
                first_region,
                last_region,
                done: 0,
                failed: 0,
                counting,
                answered: false,
            },
        );
        (sequence, changed)
    }

    /// The primary's own copy of write `sequence` completed (`ok`) or failed.
    pub fn local_done(&mut self, sequence: u64, ok: bool) -> Option<Answer> {
        self.copy_done(Copy::Local, sequence, ok)
    }

    /// Replica `replica` acknowledged write `sequence` (`ok`), or failed it (an error
    /// status, or the connection is gone: it then lacks the write and keeps the dirty bits).
    pub fn replica_done(&mut self, replica: usize, sequence: u64, ok: bool) -> Option<Answer> {
        self.copy_done(Copy::Replica(replica), sequence, ok)
    }

    fn copy_done(&mut self, copy: Copy, sequence: u64, ok: bool) -> Option<Answer> {
        let majority = self.majority();
        let write = self.writes.get_mut(&sequence)?;
        let bit = Self::bit(copy);
        if (write.done | write.failed) & bit != 0 {
            return None;
        }
        if ok {
            write.done |= bit;
        } else {
            write.failed |= bit;
        }
        let fua = write.fua;
        let answer = if write.answered {
            None
        } else if (write.done & write.counting).count_ones() >= majority {
            write.answered = true;
            Some(Answer::Done { sequence })
        } else if (write.counting & !write.failed).count_ones() < majority {
            write.answered = true;
            Some(Answer::Failed { sequence })
        } else {
            None
        };
        if matches!(answer, Some(Answer::Done { .. })) {
            self.acknowledged = self.acknowledged.max(sequence);
        }
        if ok && fua {
            // A FUA write is durable on the copy that completed it; nothing earlier is
            // implied, so only a contiguous run moves the copy's durable mark (flushes do).
            let index = match copy {
                Copy::Local => 0,
                Copy::Replica(replica) => 1 + replica,
            };
            if self.durable[index] + 1 == sequence {
                self.durable[index] = sequence;
            }
        }
        self.retire();
        answer
    }

    /// A flush from the client: its id. It covers every write acknowledged so far.
    pub fn begin_flush(&mut self) -> (u64, u64) {
        let id = self.next_flush;
        self.next_flush += 1;
        let target = self.acknowledged;
        self.flushes.insert(
            id,
            Flush {
                target,
                durable: 0,
                failed: 0,
                answered: false,
            },
        );
        (id, target)
    }

    /// A copy's flush completed: every write up to `durable_up_to` is durable there (the
    /// local flush: up to the flush's target). Returns the answers of flushes now decided.
    pub fn flush_done(&mut self, copy: Copy, durable_up_to: u64, ok: bool) -> Vec<(u64, Answer)> {
        let index = match copy {
            Copy::Local => 0,
            Copy::Replica(replica) => 1 + replica,
        };
        if ok {
            self.durable[index] = self.durable[index].max(durable_up_to);
        }
        let bit = Self::bit(copy);
        let durable = self.durable[index];
        let counts = match copy {
            Copy::Local => true,
            Copy::Replica(replica) => self.stale[replica].is_empty(),
        };
        for flush in self.flushes.values_mut().filter(|flush| !flush.answered) {
            if ok && counts && durable >= flush.target {
                flush.durable |= bit;
            } else if !ok || !counts {
                // A replica out of sync lacks writes from before its stream: it can make no
                // flush durable until it is resynchronised.
                flush.failed |= bit;
            }
        }
        self.decide_flushes()
    }

    /// A copy answered a flush that asked for every write up to `asked` with less
    /// (`flush_done` took what it said): it could not make them durable (a write failed there,
    /// or it lacks one), so every flush up to `asked` it did not make durable failed there.
    /// Returns the answers now decided.
    pub fn flush_fell_short(&mut self, copy: Copy, asked: u64) -> Vec<(u64, Answer)> {
        let bit = Self::bit(copy);
        for flush in self.flushes.values_mut() {
            if !flush.answered && flush.target <= asked && flush.durable & bit == 0 {
                flush.failed |= bit;
            }
        }
        self.decide_flushes()
    }

    /// Answers the flushes a majority made durable, or can no longer make durable.
    fn decide_flushes(&mut self) -> Vec<(u64, Answer)> {
        let majority = self.majority();
        let copies = 1 + self.remotes as u32;
        let mut answers = Vec::new();
        for (&id, flush) in self.flushes.iter_mut().filter(|(_, flush)| !flush.answered) {
            let sequence = flush.target;
            if flush.durable.count_ones() >= majority {
                flush.answered = true;
                answers.push((id, Answer::Done { sequence }));
            } else if copies - flush.failed.count_ones() < majority {
                flush.answered = true;
                answers.push((id, Answer::Failed { sequence }));
            }
        }
        self.flushes.retain(|_, flush| !flush.answered);
        self.clean();
        answers
    }

    /// Forgets writes every copy has answered for, once the client was answered.
    fn retire(&mut self) {
        let all = (1u64 << (1 + self.remotes)) - 1;
        self.writes
            .retain(|_, write| !(write.answered && (write.done | write.failed) == all));
    }

    /// Regions whose every write is durable on a replica are clean for it again.
    fn clean(&mut self) {
        for replica in 0..self.remotes {
            let durable = self.durable[1 + replica];
            let in_flight: Vec<(u64, u64)> = self
                .writes
                .values()
                .filter(|write| write.done & Self::bit(Copy::Replica(replica)) == 0)
                .map(|write| (write.first_region, write.last_region))
                .collect();
            let last_write = &mut self.last_write[replica];
            let dirty = &mut self.dirty[replica];
            let stale = &self.stale[replica];
            last_write.retain(|&region, &mut last| {
                let pending = in_flight
                    .iter()
                    .any(|&(first, end)| (first..=end).contains(&region));
                if last <= durable && !pending {
                    // A stale region stays dirty until its resync.
                    if !stale.contains(&region) {
                        dirty.clear(region);
                    }
                    false
                } else {
                    true
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Three copies, 64 MiB of 4 KiB blocks in 1 MiB regions.
    fn volume() -> PrimaryVolume {
        PrimaryVolume::new(2, 16384, 4096, 20, 0)
    }

    #[test]
    fn a_write_is_answered_by_the_majority_and_a_slow_replica_does_not_hold_it() {
        let mut v = volume();
        assert_eq!(v.majority(), 2);
        let (sequence, changed) = v.begin_write(0, 1, false);
        assert_eq!(sequence, 1);
        assert_eq!(
            changed,
            vec![(0, 0), (1, 0)],
            "region 0's bitmap block, for each replica"
        );
        assert_eq!(v.local_done(1, true), None, "one copy of three");
        assert_eq!(
            v.replica_done(0, 1, true),
            Some(Answer::Done { sequence: 1 })
        );
        // Replica 1 answers late: nothing more for the client.
        assert_eq!(v.replica_done(1, 1, true), None);
        // The region is already dirty: the next write there needs no bitmap write.
        assert_eq!(v.begin_write(1, 1, false).1, vec![]);
    }

    #[test]
    fn a_write_fails_once_a_majority_cannot_hold_it() {
        let mut v = volume();
        v.begin_write(0, 1, false);
        assert_eq!(v.replica_done(0, 1, false), None);
        assert_eq!(
            v.replica_done(1, 1, false),
            Some(Answer::Failed { sequence: 1 })
        );
        assert_eq!(v.local_done(1, true), None, "answered already");
    }

    #[test]
    fn a_flush_waits_for_a_majority_durable_up_to_what_was_acknowledged() {
        let mut v = volume();
        for lba in 0..3 {
            let (sequence, _) = v.begin_write(lba * 256, 1, false);
            v.local_done(sequence, true);
            v.replica_done(0, sequence, true);
        }
        let (id, target) = v.begin_flush();
        assert_eq!(target, 3);
        assert!(
            v.flush_done(Copy::Local, 3, true).is_empty(),
            "one copy of three"
        );
        // Replica 0 is durable only up to 2: not enough.
        assert!(v.flush_done(Copy::Replica(0), 2, true).is_empty());
        assert_eq!(
            v.flush_done(Copy::Replica(0), 3, true),
            vec![(id, Answer::Done { sequence: 3 })]
        );
    }

    #[test]
    fn a_flush_ack_short_of_what_it_asked_fails_that_copy_for_the_flush() {
        let mut v = volume();
        for lba in 0..3 {
            let (sequence, _) = v.begin_write(lba * 256, 1, false);
            v.local_done(sequence, true);
            v.replica_done(0, sequence, true);
            v.replica_done(1, sequence, sequence != 3);
        }
        let (id, target) = v.begin_flush();
        assert!(v.flush_done(Copy::Local, target, true).is_empty());
        // Replica 1 lacks write 3 for good: its answer to the flush says 2.
        assert!(v.flush_done(Copy::Replica(1), 2, true).is_empty());
        assert!(
            v.flush_fell_short(Copy::Replica(1), target).is_empty(),
            "two copies may still make it durable"
        );
        assert_eq!(
            v.flush_fell_short(Copy::Replica(0), target),
            vec![(id, Answer::Failed { sequence: 3 })],
            "no majority left"
        );
    }

    #[test]
    fn regions_clean_up_once_a_replica_has_every_write_durably() {
        let mut v = volume();
        let (a, _) = v.begin_write(0, 1, false);
        let (b, _) = v.begin_write(256, 1, false);
        assert_eq!(v.dirty(1).dirty().collect::<Vec<_>>(), vec![0, 1]);
        for sequence in [a, b] {
            v.local_done(sequence, true);
            v.replica_done(0, sequence, true);
        }
        v.flush_done(Copy::Replica(0), b, true);
        assert_eq!(v.dirty(0).count(), 0, "replica 0 has both durably");
        assert_eq!(v.dirty(1).count(), 2, "replica 1 has neither");
        // Replica 1 completes them, but they are not durable there until it flushes.
        v.replica_done(1, a, true);
        v.replica_done(1, b, true);
        v.flush_done(Copy::Local, b, true);
        assert_eq!(
            v.dirty(1).count(),
            2,
            "written but not durable on replica 1"
        );
        v.flush_done(Copy::Replica(1), a, true);
        assert_eq!(
            v.dirty(1).dirty().collect::<Vec<_>>(),
            vec![1],
            "durable up to a only"
        );
    }

    #[test]
    fn a_replica_that_rejoins_lacks_its_missed_regions_until_they_are_resynced() {
        let mut v = volume();
        let (a, _) = v.begin_write(0, 1, false);
        v.local_done(a, true);
        v.replica_done(0, a, true);
        // Replica 1's session goes: write a is failed there (it keeps its dirty bit).
        assert!(v.replica_lost(1).is_empty(), "a was answered already");
        let (b, _) = v.begin_write(512, 1, false);
        assert_eq!(v.replica_done(1, b, false), None, "b was never sent to it");
        v.local_done(b, true);
        assert_eq!(
            v.replica_done(0, b, true),
            Some(Answer::Done { sequence: b })
        );
        // It comes back: its stream starts after b, and regions 0 and 2 are its to catch up.
        assert_eq!(v.replica_rejoined(1), b);
        assert!(!v.in_sync(1));
        let (c, _) = v.begin_write(256, 1, false);
        v.local_done(c, true);
        assert_eq!(
            v.replica_done(1, c, true),
            None,
            "an out-of-sync replica does not make a majority"
        );
        assert_eq!(
            v.replica_done(0, c, true),
            Some(Answer::Done { sequence: c })
        );
        let (id, target) = v.begin_flush();
        assert_eq!(target, c);
        v.flush_done(Copy::Local, c, true);
        // Replica 1 says it is durable up to c; it lacks a and b, so it does not count.
        assert!(v.flush_done(Copy::Replica(1), c, true).is_empty());
        assert_eq!(
            v.dirty(1).dirty().collect::<Vec<_>>(),
            vec![0, 2],
            "no flush cleans what it missed (region 1 had only c, durable there)"
        );
        assert_eq!(
            v.flush_done(Copy::Replica(0), c, false),
            vec![(id, Answer::Failed { sequence: c })],
            "only the primary's copy is durable"
        );
        assert!(!v.resynced(1, 0, c));
        assert!(v.resynced(1, 2, c), "region 1 was cleaned by its flush");
        assert!(v.in_sync(1));
        assert_eq!(v.dirty(1).count(), 0);
        // In sync again, it counts for the next write's majority.
        let (d, _) = v.begin_write(0, 1, false);
        v.local_done(d, true);
        assert_eq!(
            v.replica_done(1, d, true),
            Some(Answer::Done { sequence: d })
        );
    }

    proptest! {
        /// Whatever order the copies answer in, and whichever fail: a write is answered once,
        /// Done only with a majority done, Failed only when a majority cannot be; and dirty
        /// bits cover every write a replica did not complete.
        #[test]
        fn answers_follow_the_majority(events in proptest::collection::vec((0u64..20, 0usize..3, any::<bool>()), 1..300)) {
            let mut v = volume();
            let writes: Vec<(u64, u64)> = (0..20)
                .map(|i| (v.begin_write(i * 300, 1 + (i % 3) as u32, i % 4 == 0).0, i * 300))
                .collect();
            let mut done = [[false; 3]; 20];
            let mut failed = [[false; 3]; 20];
            let mut answered = [None; 20];
            for (write, copy, ok) in events {
                let (sequence, _) = writes[write as usize];
                if done[write as usize][copy] || failed[write as usize][copy] {
                    continue;
                }
                let answer = match copy {
                    0 => v.local_done(sequence, ok),
                    replica => v.replica_done(replica - 1, sequence, ok),
                };
                if ok { done[write as usize][copy] = true } else { failed[write as usize][copy] = true }
                let dones = done[write as usize].iter().filter(|&&d| d).count();
                let fails = failed[write as usize].iter().filter(|&&f| f).count();
                match answer {
                    Some(Answer::Done { .. }) => {
                        prop_assert!(answered[write as usize].is_none(), "answered twice");
                        prop_assert!(dones >= 2, "Done with {dones} copies");
                        answered[write as usize] = Some(true);
                    }
                    Some(Answer::Failed { .. }) => {
                        prop_assert!(answered[write as usize].is_none(), "answered twice");
                        prop_assert!(fails >= 2, "Failed with {fails} failures");
                        answered[write as usize] = Some(false);
                    }
                    None => prop_assert!(answered[write as usize].is_some() || (dones < 2 && fails < 2)),
                }
            }
            // Every write a replica has not completed is in a region dirty for it.
            for (index, &(_, lba)) in writes.iter().enumerate() {
                for replica in 0..2 {
                    if !done[index][1 + replica] {
                        let region = (lba * 4096) >> 20;
                        prop_assert!(v.dirty(replica).is_dirty(region), "write {index} missing on replica {replica} but region {region} clean");
                    }
                }
            }
        }
    }
}
