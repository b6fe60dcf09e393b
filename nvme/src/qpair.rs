//! The host side of an NVMe submission/completion queue pair.
//!
//! This is the one queue-pair implementation every NVMe transport uses: the in-process `mem`
//! controller and VFIO against real hardware differ only in where the doorbells are.
//!
//! Model (as SPDK's `nvme_qpair`): the rings live in DMA memory the host allocated; each
//! command in flight owns a *tracker* indexed by its command identifier, allocated at queue
//! creation with its own PRP list page, so submitting never allocates. A submit that finds no
//! free tracker is refused ([`QueueFull`]) and the caller keeps its request: that is the
//! back-pressure. There are at most `entries - 1` trackers, so the submission queue itself can
//! never overflow (one slot stays empty to tell full from empty).
//!
//! Submissions are published by [`QueuePair::ring`], once per batch; completions are reaped in
//! bounded batches by [`QueuePair::reap`], which rings the completion head doorbell once per
//! batch.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::doorbell::Doorbell;
use super::spec::{CompletionEntry, Status, SubmissionEntry, PAGE_SIZE, PRP_ENTRIES_PER_PAGE};
use fathom_dma::{DmaBuf, DmaError, DmaPool};

/// Largest transfer one command can carry with a single PRP list page: PRP1 plus 512 list
/// entries of 4 KiB (the controller's MDTS may allow less).
pub const MAX_TRANSFER_BYTES: usize = PRP_ENTRIES_PER_PAGE * PAGE_SIZE;

/// Every tracker is busy: the request was not queued. Try again after reaping completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("NVMe queue full: all command identifiers are in flight")]
pub struct QueueFull;

/// One reaped completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completed {
    /// What the submitter attached to the command.
    pub cookie: u32,
    pub status: Status,
    /// Command specific result (CQE DW0).
    pub result: u32,
}

/// Where a command's data is: an IOVA range (contiguous in IOVA space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRange {
    /// The address the device is given (PRPs for NVMe).
    pub iova: u64,
    /// The same memory's address in this process (for kernel interfaces such as io_uring).
    pub addr: u64,
    pub len: usize,
}

impl DataRange {
    /// The range of `buf`'s view, for a command that transfers it.
    ///
    /// A `DataRange` is only addresses: it does not keep the buffer, and the borrow ends here.
    /// Whoever submits a command with it must hand the buffer itself, by value, to whatever
    /// tracks the command (the engine's IO slot, [`NvmeController::admin_command_with_data`])
    /// before the doorbell rings, and may give it back to safe code only once the completion
    /// has been reaped: that is what makes [`DmaBuf::as_bytes`] and the other accessors sound
    /// (the ownership rule in the `fathom_dma` crate documentation). A buffer whose command is
    /// abandoned (timed out) is never given back.
    ///
    /// [`NvmeController::admin_command_with_data`]: crate::NvmeController::admin_command_with_data
    pub fn of(buf: &DmaBuf) -> Self {
        Self {
            iova: buf.iova(),
            addr: buf.as_ptr() as u64,
            len: buf.len(),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Tracker {
    cookie: u32,
    busy: bool,
}

/// A submission/completion queue pair with its trackers.
pub struct QueuePair {
    // ---- Hot: touched by every submit and every reap. ----
    sq: NonNull<SubmissionEntry>,
    cq: NonNull<CompletionEntry>,
    sq_tail: u16,
    cq_head: u16,
    entries: u16,
    /// The phase tag value that marks a new completion entry at `cq_head`.
    phase: bool,
    /// The SQ tail last written to the doorbell.
    sq_tail_rung: u16,
    free_cids: Vec<u16>,
    trackers: Box<[Tracker]>,
    /// IOVA and host address of the PRP list page of command identifier 0; cid n's page is
    /// `n * PAGE_SIZE` further.
    prp_lists_iova: u64,
    prp_lists: NonNull<u64>,
    sq_doorbell: Doorbell,
    cq_doorbell: Doorbell,
    // ---- Cold: the IO path never touches what follows. ----
    qid: u16,
    /// The controller's SQ head as last reported in a completion entry.
    sq_head_reported: u16,
    /// Completions whose command identifier matched no command in flight (a controller bug);
    /// they are dropped and counted.
    stray_completions: u64,
    memory: QueueMemory,
}

// SAFETY: the raw pointers point into DMA memory owned by `memory` (moved along with the queue
// pair); the queue pair is the only host-side user of those rings, so moving it to another
// thread moves every accessor with it.
unsafe impl Send for QueuePair {}

/// The DMA memory behind a queue pair: given to the controller by address (the admin queue
/// registers, or Create I/O Completion/Submission Queue) and from then on owned by the
/// [`QueuePair`], which never lends it out: the controller writes the completion ring, and
/// reads the submission ring and PRP lists, at any time while the queue exists.
pub struct QueueMemory {
    pub sq: DmaBuf,
    pub cq: DmaBuf,
    pub prp_lists: DmaBuf,
}

impl QueueMemory {
    /// Allocates rings of `entries` and one PRP list page per possible command.
    pub fn allocate(pool: &DmaPool, entries: u16) -> Result<Self, DmaError> {
        let entries = entries as usize;
        Ok(Self {
            sq: pool.alloc(entries * std::mem::size_of::<SubmissionEntry>())?,
            cq: pool.alloc(entries * std::mem::size_of::<CompletionEntry>())?,
            prp_lists: pool.alloc((entries - 1).max(1) * PAGE_SIZE)?,
        })
    }
}

impl QueuePair {
    /// Wraps rings the controller has been told about (Create I/O SQ/CQ, or the admin queue
    /// registers). `entries` must be 2..=65536 and match what the controller was given.
    pub fn new(
        qid: u16,
        entries: u16,
        memory: QueueMemory,
        sq_doorbell: Doorbell,
        cq_doorbell: Doorbell,
    ) -> Self {
        assert!(entries >= 2, "a queue needs at least two entries");
        assert!(
            memory.sq.len() >= entries as usize * 64 && memory.cq.len() >= entries as usize * 16
        );
        let trackers = entries - 1;
        assert!(memory.prp_lists.len() >= trackers as usize * PAGE_SIZE);
        Self {
            sq: NonNull::new(memory.sq.as_ptr().cast()).expect("non-null ring"),
            cq: NonNull::new(memory.cq.as_ptr().cast()).expect("non-null ring"),
            sq_tail: 0,
            cq_head: 0,
            entries,
            phase: true,
            sq_tail_rung: 0,
            // Popped from the end: hand out low identifiers first.
            free_cids: (0..trackers).rev().collect(),
            trackers: vec![Tracker::default(); trackers as usize].into_boxed_slice(),
            prp_lists_iova: memory.prp_lists.iova(),
            prp_lists: NonNull::new(memory.prp_lists.as_ptr().cast()).expect("non-null"),
            sq_doorbell,
            cq_doorbell,
            qid,
            sq_head_reported: 0,
            stray_completions: 0,
            memory,
        }
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Entries in each ring.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Commands that can be in flight at once (`entries - 1`).
    pub fn capacity(&self) -> usize {
        self.trackers.len()
    }

    /// Commands in flight.
    #[inline(always)]
    pub fn outstanding(&self) -> usize {
        self.trackers.len() - self.free_cids.len()
    }

    /// Takes the rings back from a queue pair the controller no longer uses, or may still
    /// use (to quarantine them). The host side of the queue is gone either way.
    pub(crate) fn into_memory(self) -> QueueMemory {
        self.memory
    }

    pub fn stray_completions(&self) -> u64 {
        self.stray_completions
    }

    /// The controller's last reported SQ head.
    pub fn sq_head_reported(&self) -> u16 {
        self.sq_head_reported
    }

    /// Writes `entry` into the submission queue with a fresh command identifier and PRPs for
    /// `data`. Nothing reaches the controller until [`QueuePair::ring`].
    ///
    /// `data.len` must not exceed [`MAX_TRANSFER_BYTES`] and `data.iova` must be dword aligned
    /// (callers validate; violating either is a bug and panics). The buffer behind `data` must
    /// belong to the command until its completion is reaped (see [`DataRange::of`]).
    #[inline]
    pub fn submit(
        &mut self,
        mut entry: SubmissionEntry,
        data: Option<DataRange>,
        cookie: u32,
    ) -> Result<u16, QueueFull> {
        let Some(cid) = self.free_cids.pop() else {
            return Err(QueueFull);
        };
        let tracker = &mut self.trackers[cid as usize];
        debug_assert!(!tracker.busy, "free list held a busy command identifier");
        tracker.busy = true;
        tracker.cookie = cookie;
        entry.cdw0 = (entry.cdw0 & 0xffff) | (cid as u32) << 16;
        if let Some(data) = data {
            let (prp1, prp2) = self.build_prps(cid, data);
            entry.prp1 = prp1;
            entry.prp2 = prp2;
        }
        // Stored as eight quadwords computed in registers: copying an entry assembled on the
        // stack with 4-byte stores through 16-byte loads stalls store forwarding.
        // SAFETY: sq_tail < entries, and the ring holds `entries` 64-byte entries of DMA memory
        // owned by `self.memory`; the controller reads this slot only after the doorbell covers it.
        let slot = unsafe { self.sq.as_ptr().add(self.sq_tail as usize) }.cast::<u64>();
        for (index, qword) in entry.to_qwords().into_iter().enumerate() {
            // SAFETY: index < 8 quadwords inside the 64-byte slot above.
            unsafe { slot.add(index).write_volatile(qword) };
        }
        self.sq_tail += 1;
        if self.sq_tail == self.entries {
            self.sq_tail = 0;
        }
        Ok(cid)
    }

    /// PRP entries for a transfer (Base Specification, "Physical Region Page Entry and List").
    #[inline]
    fn build_prps(&mut self, cid: u16, data: DataRange) -> (u64, u64) {
        // Always checked (two compares): an oversized transfer would spill into the next
        // command's PRP list page. Callers validate first, so this only catches bugs.
        assert!(data.iova.is_multiple_of(4), "PRP1 must be dword aligned");
        assert!(
            data.len <= MAX_TRANSFER_BYTES,
            "transfer of {} bytes exceeds one PRP list",
            data.len
        );
        let page = PAGE_SIZE as u64;
        let first_len = (page - data.iova % page) as usize;
        if data.len <= first_len {
            return (data.iova, 0);
        }
        let next_page = (data.iova & !(page - 1)) + page;
        let rest = data.len - first_len;
        if rest <= PAGE_SIZE {
            return (data.iova, next_page);
        }
        let pages = rest.div_ceil(PAGE_SIZE);
        debug_assert!(pages <= PRP_ENTRIES_PER_PAGE);
        // SAFETY: cid < entries - 1 and the PRP list area holds one page per command identifier.
        let list = unsafe {
            self.prp_lists
                .as_ptr()
                .add(cid as usize * PRP_ENTRIES_PER_PAGE)
        };
        for index in 0..pages {
            // SAFETY: index < pages <= 512 entries of this command's own list page, which no
            // controller reads while the command is not submitted.
            unsafe {
                list.add(index)
                    .write_volatile(next_page + index as u64 * page)
            };
        }
        (data.iova, self.prp_lists_iova + cid as u64 * page)
    }

    /// Publishes every entry written since the last ring with one doorbell write.
    #[inline]
    pub fn ring(&mut self) -> bool {
        if self.sq_tail == self.sq_tail_rung {
            return false;
        }
        self.sq_tail_rung = self.sq_tail;
        self.sq_doorbell.ring(self.sq_tail as u32);
        true
    }

    /// Reaps at most `out.len()` completions into `out`, frees their command identifiers and
    /// rings the completion head doorbell once. Returns how many were reaped.
    #[inline]
    pub fn reap(&mut self, out: &mut [Completed]) -> usize {
        let mut reaped = 0;
        while reaped < out.len() {
            // SAFETY: cq_head < entries; the ring is DMA memory owned by `self.memory`.
            let entry = unsafe { self.cq.as_ptr().add(self.cq_head as usize) };
            // The controller publishes an entry by storing its last dword (CID, status, phase);
            // the acquire load orders the reads of the other dwords after it.
            // SAFETY: dword 3 of a 16-byte aligned entry is 4-byte aligned and inside the ring;
            // the controller writes it with an atomic store (or as a whole-entry DMA write).
            let dw3 =
                unsafe { AtomicU32::from_ptr(entry.cast::<u32>().add(3)) }.load(Ordering::Acquire);
            let status_phase = (dw3 >> 16) as u16;
            if (status_phase & 1 == 1) != self.phase {
                break;
            }
            // SAFETY: as above; the entry is complete once its phase tag flipped.
            let (result, sq_head) = unsafe { ((*entry).dw0, (*entry).sq_head) };
            self.sq_head_reported = sq_head;
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            let cid = dw3 as u16;
            match self.trackers.get_mut(cid as usize) {
                Some(tracker) if tracker.busy => {
                    tracker.busy = false;
                    out[reaped] = Completed {
                        cookie: tracker.cookie,
                        status: Status::from_status_phase(status_phase),
                        result,
                    };
                    self.free_cids.push(cid);
                    reaped += 1;
                }
                _ => self.stray_completions += 1,
            }
        }
        if reaped > 0 {
            self.cq_doorbell.ring(self.cq_head as u32);
        }
        reaped
    }
}
