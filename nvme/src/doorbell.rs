//! Doorbell registers.
//!
//! A doorbell is how the host tells a controller that a submission queue's tail or a
//! completion queue's head moved. On real hardware it is a 32-bit register in BAR0 at
//! `0x1000 + (2y + k) * (4 << CAP.DSTRD)`; for the in-process controller it is a word in a
//! [`DoorbellPage`] with the same indexing, read by the controller with acquire loads.

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;

/// Which of a queue pair's two doorbells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoorbellKind {
    SubmissionTail,
    CompletionHead,
}

impl DoorbellKind {
    /// Index of the doorbell for queue `qid` in doorbell-stride units (2y, 2y+1).
    pub fn index(self, qid: u16) -> usize {
        2 * qid as usize + matches!(self, DoorbellKind::CompletionHead) as usize
    }
}

/// The doorbell words of an in-process controller, laid out as in BAR0.
pub struct DoorbellPage {
    words: Box<[AtomicU32]>,
}

impl DoorbellPage {
    pub fn new(max_queues: u16) -> Arc<Self> {
        Arc::new(Self {
            words: (0..2 * (max_queues as usize + 1))
                .map(|_| AtomicU32::new(0))
                .collect(),
        })
    }

    /// The controller's read of a doorbell: pairs with the host's release store, so the queue
    /// entries written before the doorbell are visible once the new value is.
    #[inline(always)]
    pub fn read(&self, qid: u16, kind: DoorbellKind) -> u32 {
        self.words[kind.index(qid)].load(Ordering::Acquire)
    }

    /// Resets a queue's doorbells when the controller creates or deletes it.
    pub fn reset(&self, qid: u16) {
        self.words[DoorbellKind::SubmissionTail.index(qid)].store(0, Ordering::Release);
        self.words[DoorbellKind::CompletionHead.index(qid)].store(0, Ordering::Release);
    }

    pub fn max_queues(&self) -> u16 {
        (self.words.len() / 2 - 1) as u16
    }
}

enum Target {
    /// A memory-mapped register in a device BAR. The mapping outlives the doorbell (the driver
    /// that created it keeps the BAR mapped until every queue pair is gone).
    Mmio(NonNull<u32>),
    /// A word of an in-process controller's doorbell page.
    Memory {
        page: Arc<DoorbellPage>,
        index: usize,
    },
}

/// One doorbell register, owned by the queue pair that rings it.
pub struct Doorbell {
    target: Target,
}

// SAFETY: an MMIO doorbell is a device register written only by the one queue pair that owns
// this handle (it is not Clone); moving that owner to another thread moves the only writer.
unsafe impl Send for Doorbell {}

impl Doorbell {
    /// A doorbell in an in-process controller's page.
    pub fn memory(page: Arc<DoorbellPage>, qid: u16, kind: DoorbellKind) -> Self {
        let index = kind.index(qid);
        assert!(
            index < page.words.len(),
            "queue {qid} beyond the doorbell page"
        );
        Self {
            target: Target::Memory { page, index },
        }
    }

    /// A doorbell register in mapped device memory.
    ///
    /// # Safety
    /// `register` must point to a 4-byte aligned doorbell in a BAR mapping that stays mapped
    /// for the doorbell's whole life, and no other handle may write the same register.
    pub unsafe fn mmio(register: NonNull<u32>) -> Self {
        Self {
            target: Target::Mmio(register),
        }
    }

    /// Publishes `value` (the new SQ tail or CQ head).
    ///
    /// The queue entries the host wrote before this call must be visible to the controller
    /// before the doorbell is: the release ordering (a compiler barrier on x86, where stores
    /// are not reordered with other stores) provides that for both targets.
    #[inline(always)]
    pub fn ring(&self, value: u32) {
        match &self.target {
            Target::Memory { page, index } => page.words[*index].store(value, Ordering::Release),
            Target::Mmio(register) => {
                fence(Ordering::Release);
                // SAFETY: the constructor's contract: a live, aligned register only we write.
                unsafe { register.as_ptr().write_volatile(value) }
            }
        }
    }
}
