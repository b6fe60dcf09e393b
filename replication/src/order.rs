//! Overlapping writes are applied in the same order on every replica: the primary's sequence
//! order. A replica runs writes to disjoint blocks concurrently, and holds a write that
//! overlaps an earlier one still in flight (or still waiting) until that one is done. Sans-IO:
//! the replica service asks [`WriteOrder::admit`] before submitting a write and tells
//! [`WriteOrder::completed`] when it finishes; what becomes ready is handed back.
//!
//! Writes arrive in sequence order on a session (TCP keeps the primary's order), so a write
//! only ever waits for writes with lower sequences: no cycle, and every held write runs once
//! those before it complete. Bounded: at most `capacity` writes are tracked; beyond that the
//! service stops reading the socket (back-pressure on the primary).

use std::collections::VecDeque;

/// One write as the order sees it: its sequence and its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    pub sequence: u64,
    pub lba: u64,
    pub blocks: u32,
}

impl Write {
    fn end(&self) -> u64 {
        self.lba.saturating_add(self.blocks as u64)
    }

    fn overlaps(&self, other: &Write) -> bool {
        self.lba < other.end() && other.lba < self.end()
    }
}

/// Whether a write may be submitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// No earlier overlapping write is outstanding: submit it.
    Now,
    /// It waits for an earlier overlapping write; [`WriteOrder::completed`] hands it back.
    Held,
    /// The order tracks `capacity` writes already: stop taking frames until one completes.
    Full,
}

/// Why a completion was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error(
        "write {sequence} completed but was not submitted (in flight: none with that sequence)"
    )]
    NotInFlight { sequence: u64 },
    #[error(
        "write {sequence} is not after write {last}: a session's writes come in sequence order"
    )]
    OutOfOrder { sequence: u64, last: u64 },
}

/// The writes of one volume on a replica: those in flight, and those held behind them.
#[derive(Debug)]
pub struct WriteOrder {
    in_flight: Vec<Write>,
    held: VecDeque<Write>,
    capacity: usize,
    last: Option<u64>,
}

impl WriteOrder {
    pub fn new(capacity: usize) -> Self {
        Self {
            in_flight: Vec::with_capacity(capacity),
            held: VecDeque::with_capacity(capacity),
            capacity,
            last: None,
        }
    }

    /// Writes tracked (in flight and held).
    pub fn len(&self) -> usize {
        self.in_flight.len() + self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A write that arrived: may it be submitted now?
    pub fn admit(&mut self, write: Write) -> Result<Admit, OrderError> {
        if let Some(last) = self.last {
            if write.sequence <= last {
                return Err(OrderError::OutOfOrder {
                    sequence: write.sequence,
                    last,
                });
            }
        }
        if self.len() >= self.capacity {
            return Ok(Admit::Full);
        }
        self.last = Some(write.sequence);
        if self.blocked(&write) {
            self.held.push_back(write);
            Ok(Admit::Held)
        } else {
            self.in_flight.push(write);
            Ok(Admit::Now)
        }
    }

    /// Whether an earlier outstanding write overlaps `write`.
    fn blocked(&self, write: &Write) -> bool {
        self.in_flight
            .iter()
            .chain(self.held.iter())
            .any(|earlier| earlier.sequence < write.sequence && earlier.overlaps(write))
    }

    /// Write `sequence` finished: the held writes that may go now, in sequence order (they
    /// are in flight from here on).
    pub fn completed(&mut self, sequence: u64) -> Result<Vec<Write>, OrderError> {
        let index = self
            .in_flight
            .iter()
            .position(|write| write.sequence == sequence)
            .ok_or(OrderError::NotInFlight { sequence })?;
        self.in_flight.swap_remove(index);
        let mut ready = Vec::new();
        let mut index = 0;
        while index < self.held.len() {
            let write = self.held[index];
            // Earlier held writes stay ahead of it: blocked() looks at them too.
            let earlier_held = self.held.iter().take(index);
            let blocked = self
                .in_flight
                .iter()
                .chain(earlier_held)
                .any(|earlier| earlier.sequence < write.sequence && earlier.overlaps(&write));
            if blocked {
                index += 1;
            } else {
                self.held.remove(index);
                self.in_flight.push(write);
                ready.push(write);
            }
        }
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write(sequence: u64, lba: u64, blocks: u32) -> Write {
        Write {
            sequence,
            lba,
            blocks,
        }
    }

    #[test]
    fn disjoint_writes_run_together_and_an_overlapping_one_waits_its_turn() {
        let mut order = WriteOrder::new(8);
        assert_eq!(order.admit(write(1, 0, 8)).unwrap(), Admit::Now);
        assert_eq!(order.admit(write(2, 8, 8)).unwrap(), Admit::Now);
        assert_eq!(
            order.admit(write(3, 4, 8)).unwrap(),
            Admit::Held,
            "overlaps 1 and 2"
        );
        assert_eq!(order.admit(write(4, 100, 1)).unwrap(), Admit::Now);
        // Overlaps the held write 3 only: it waits behind it.
        assert_eq!(order.admit(write(5, 11, 1)).unwrap(), Admit::Held);
        assert_eq!(order.completed(1).unwrap(), vec![], "3 still overlaps 2");
        assert_eq!(order.completed(2).unwrap(), vec![write(3, 4, 8)]);
        assert_eq!(order.completed(3).unwrap(), vec![write(5, 11, 1)]);
        assert_eq!(order.completed(4).unwrap(), vec![]);
        assert_eq!(order.completed(5).unwrap(), vec![]);
        assert!(order.is_empty());
    }

    #[test]
    fn out_of_order_writes_unknown_completions_and_a_full_order_are_refused() {
        let mut order = WriteOrder::new(2);
        order.admit(write(5, 0, 1)).unwrap();
        assert_eq!(
            order.admit(write(5, 9, 1)),
            Err(OrderError::OutOfOrder {
                sequence: 5,
                last: 5
            })
        );
        order.admit(write(6, 9, 1)).unwrap();
        assert_eq!(order.admit(write(7, 20, 1)).unwrap(), Admit::Full);
        // A full order takes the same write later.
        order.completed(5).unwrap();
        assert_eq!(order.admit(write(7, 20, 1)).unwrap(), Admit::Now);
        assert_eq!(
            order.completed(42),
            Err(OrderError::NotInFlight { sequence: 42 })
        );
    }

    proptest! {
        /// Whatever the writes and whenever they complete: no two overlapping writes are ever
        /// in flight together, and overlapping writes start in sequence order.
        #[test]
        fn overlapping_writes_never_run_together_and_start_in_sequence_order(
            writes in proptest::collection::vec((0u64..64, 1u32..16), 1..40),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 40..200),
        ) {
            let mut order = WriteOrder::new(64);
            let mut running: Vec<Write> = Vec::new();
            let mut started: Vec<Write> = Vec::new();
            let start = |write: Write, running: &mut Vec<Write>, started: &mut Vec<Write>| {
                for other in running.iter() {
                    prop_assert!(!other.overlaps(&write), "{other:?} and {write:?} run together");
                }
                for earlier in started.iter().filter(|earlier| earlier.overlaps(&write)) {
                    prop_assert!(earlier.sequence < write.sequence, "{write:?} started before {earlier:?}");
                }
                running.push(write);
                started.push(write);
                Ok(())
            };
            for (index, &(lba, blocks)) in writes.iter().enumerate() {
                let w = write(index as u64 + 1, lba, blocks);
                if order.admit(w).unwrap() == Admit::Now {
                    start(w, &mut running, &mut started)?;
                }
            }
            let mut picks = picks.into_iter();
            while !running.is_empty() {
                let pick = picks.next().map_or(0, |pick| pick.index(running.len()));
                let done = running.swap_remove(pick);
                for ready in order.completed(done.sequence).unwrap() {
                    start(ready, &mut running, &mut started)?;
                }
            }
            prop_assert!(order.is_empty(), "{} writes never ran", order.len());
            prop_assert_eq!(started.len(), writes.len());
        }
    }
}
