//! The controller side of the `mem` driver: an NVMe controller in the same process.
//!
//! It does what a device does and nothing a device could not: it learns about queues only
//! from admin commands (with their ring addresses as IOVAs), learns about new submissions only
//! from doorbells, reaches host memory only through its [`IovaMap`] (its IOMMU), and answers
//! only with completion queue entries: phase tag, SQ head, status.
//!
//! Each I/O submission queue is processed by exactly one poller: the reactor that owns the
//! host side (`inline` mode: it calls [`DeviceQueue::process`] right after ringing), or the
//! device thread (`thread` mode). Admin commands are processed under a mutex when the host
//! driver waits for them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use fathom_telemetry::Clock;
use parking_lot::Mutex;

use super::media::Media;
use crate::inject::{Injector, OpClass, Rng};
use fathom_dma::IovaMap;
use fathom_nvme::doorbell::{DoorbellKind, DoorbellPage};
use fathom_nvme::spec::{
    admin_opcode, cns, feature, identify_controller as idc, identify_namespace as idn, io_opcode,
};
use fathom_nvme::spec::{
    CompletionEntry, Status, SubmissionEntry, PAGE_SIZE, PRP_ENTRIES_PER_PAGE,
};

/// MDTS reported in Identify: 2^8 pages of 4 KiB = 1 MiB per command.
pub const MDTS: u8 = 8;
/// How long Delete I/O Submission Queue waits for the queue's poller to let go of it.
const QUEUE_RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest queue the controller accepts (CAP.MQES + 1).
pub const MAX_QUEUE_ENTRIES: u32 = 4096;

/// What every queue of one device shares.
pub struct DeviceShared {
    pub media: Media,
    pub iova: IovaMap,
    pub block_shift: u32,
    pub namespace_blocks: u64,
    pub injector: Injector,
    /// Rules changed while the node runs (`fathom-ctl inject`), after the config's.
    pub runtime: RuntimeInject,
    pub clock: Clock,
    pub model: String,
    pub serial: String,
    /// I/O queue pairs the controller supports.
    pub max_io_queues: u16,
    /// Commands that failed inside the controller (media errors on flush, faults): logged once
    /// each, counted here.
    pub internal_errors: AtomicU64,
    /// Commands fetched whose completion is deferred (injected latency, or a full completion
    /// queue), over all I/O queues. Counted only off the fast path: when a command is deferred,
    /// posted late, or dropped with its deleted queue.
    pub deferred_commands: AtomicUsize,
    /// Per queue identifier: a poller (a reactor inline, or the device thread) holds the
    /// controller side of the queue. Delete I/O Submission Queue completes only once this is
    /// false, so the host never frees ring memory the controller still reads.
    pub held: Box<[AtomicBool]>,
}

/// Run-time injection rules of one device, for the controller (`device`) and for its media
/// (`media`: not applied to commands that move no data). Replaced whole; each queue's poller
/// notices a new generation with one atomic load per `process` call and takes the new set
/// under the lock then, never per command.
#[derive(Default)]
pub struct RuntimeInject {
    generation: AtomicU64,
    current: Mutex<Arc<RuntimeRules>>,
}

/// One generation of run-time rules.
#[derive(Default)]
pub struct RuntimeRules {
    pub device: Injector,
    pub media: Injector,
}

impl RuntimeRules {
    fn is_empty(&self) -> bool {
        self.device.is_empty() && self.media.is_empty()
    }
}

impl RuntimeInject {
    /// Installs a new rule set; commands fetched from now on see it, and commands stalled by
    /// the old one are released.
    pub fn replace(&self, rules: RuntimeRules) {
        *self.current.lock() = Arc::new(rules);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn current(&self) -> Arc<RuntimeRules> {
        self.current.lock().clone()
    }

    #[inline(always)]
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl DeviceShared {
    /// One "held" flag per queue identifier 0..=max_io_queues.
    pub fn queue_flags(max_io_queues: u16) -> Box<[AtomicBool]> {
        (0..=max_io_queues)
            .map(|_| AtomicBool::new(false))
            .collect()
    }

    fn max_transfer_bytes(&self) -> u64 {
        (PAGE_SIZE as u64) << MDTS
    }
}

/// Created-but-not-yet-polled state of a queue in the controller's table.
enum QueueSlot {
    Empty,
    /// A completion queue without its submission queue yet: (IOVA, entries).
    CompletionOnly {
        cq_iova: u64,
        entries: u32,
    },
    /// A complete pair waiting for its poller to take it.
    Ready(Box<DeviceQueue>),
    /// Taken by a poller.
    Polled,
}

/// The controller.
pub struct MemDevice {
    shared: Arc<DeviceShared>,
    doorbells: Arc<DoorbellPage>,
    admin: Mutex<Option<DeviceQueue>>,
    queues: Mutex<Vec<QueueSlot>>,
    /// Per queue identifier: whether the queue exists. A poller drops a queue it holds once
    /// this turns false (Delete I/O Submission Queue).
    alive: Box<[AtomicBool]>,
    /// Bumped whenever a queue is created or deleted, so a device thread knows to look.
    generation: AtomicU64,
    /// Test hook (unit tests only): an admin opcode at which the controller stops fetching,
    /// leaving that command and every later one unanswered until the hold is lifted, as a
    /// controller that stopped answering (and later recovered) would.
    #[cfg(test)]
    admin_hold: Mutex<Option<u8>>,
}

impl MemDevice {
    pub fn new(shared: Arc<DeviceShared>) -> Self {
        let max = shared.max_io_queues;
        Self {
            doorbells: DoorbellPage::new(max),
            admin: Mutex::new(None),
            queues: Mutex::new((0..=max).map(|_| QueueSlot::Empty).collect()),
            alive: (0..=max).map(|_| AtomicBool::new(false)).collect(),
            generation: AtomicU64::new(0),
            #[cfg(test)]
            admin_hold: Mutex::new(None),
            shared,
        }
    }

    /// Test hook: from now on, leave the first admin command with `opcode` and everything
    /// submitted after it unfetched (`None`: answer everything again, held commands included).
    #[cfg(test)]
    pub(crate) fn hold_admin(&self, opcode: Option<u8>) {
        *self.admin_hold.lock() = opcode;
    }

    pub fn shared(&self) -> &Arc<DeviceShared> {
        &self.shared
    }

    pub fn doorbells(&self) -> &Arc<DoorbellPage> {
        &self.doorbells
    }

    /// What writing AQA, ASQ and ACQ and setting CC.EN does: the admin queue pair exists.
    pub fn enable(&self, asq: u64, acq: u64, entries: u32) -> Result<(), Status> {
        let queue = DeviceQueue::new(0, asq, acq, entries, entries, &self.shared, &self.doorbells)?;
        self.doorbells.reset(0);
        *self.admin.lock() = Some(queue);
        Ok(())
    }

    /// Processes every admin command the host has submitted.
    pub fn process_admin(&self) {
        let mut admin = self.admin.lock();
        let Some(queue) = admin.as_mut() else { return };
        while let Some(entry) = self.next_admin(queue) {
            let (status, result) = self.execute_admin(&entry);
            // Admin commands are serialised by the host driver, so the admin CQ cannot be full;
            // if a host misbehaves the completion is dropped, as a device would stall.
            queue.post(entry.cid(), status, result);
        }
    }

    /// The next admin command to execute, if the host submitted one (and, in unit tests, the
    /// admin hold does not stop at it).
    fn next_admin(&self, queue: &mut DeviceQueue) -> Option<SubmissionEntry> {
        #[cfg(test)]
        if let Some(opcode) = *self.admin_hold.lock() {
            if queue.peek().is_some_and(|entry| entry.opcode() == opcode) {
                return None;
            }
        }
        queue.fetch()
    }

    /// Takes the controller side of I/O queue `qid` so the caller (a reactor in inline mode)
    /// polls it from now on.
    pub fn take_queue(&self, qid: u16) -> Option<DeviceQueue> {
        let mut queues = self.queues.lock();
        let slot = queues.get_mut(qid as usize)?;
        match std::mem::replace(slot, QueueSlot::Polled) {
            QueueSlot::Ready(queue) => {
                self.shared.held[qid as usize].store(true, Ordering::Release);
                Some(*queue)
            }
            other => {
                *slot = other;
                None
            }
        }
    }

    /// Whether queue `qid` still exists (a poller drops it once deleted).
    pub fn queue_alive(&self, qid: u16) -> bool {
        self.alive[qid as usize].load(Ordering::Acquire)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Takes every queue waiting for a poller (the device thread's intake).
    pub fn take_ready_queues(&self, into: &mut Vec<DeviceQueue>) {
        let mut queues = self.queues.lock();
        for slot in queues.iter_mut() {
            if matches!(slot, QueueSlot::Ready(_)) {
                if let QueueSlot::Ready(queue) = std::mem::replace(slot, QueueSlot::Polled) {
                    self.shared.held[queue.qid as usize].store(true, Ordering::Release);
                    into.push(*queue);
                }
            }
        }
    }

    fn execute_admin(&self, entry: &SubmissionEntry) -> (Status, u32) {
        match entry.opcode() {
            admin_opcode::IDENTIFY => (self.identify(entry), 0),
            admin_opcode::SET_FEATURES | admin_opcode::GET_FEATURES
                if entry.cdw10 & 0xff == feature::NUMBER_OF_QUEUES =>
            {
                let count = self.shared.max_io_queues as u32 - 1;
                (Status::SUCCESS, count | count << 16)
            }
            admin_opcode::SET_FEATURES | admin_opcode::GET_FEATURES => (Status::INVALID_FIELD, 0),
            admin_opcode::CREATE_IO_CQ => (self.create_cq(entry), 0),
            admin_opcode::CREATE_IO_SQ => (self.create_sq(entry), 0),
            admin_opcode::DELETE_IO_SQ => (self.delete_sq(entry), 0),
            admin_opcode::DELETE_IO_CQ => (self.delete_cq(entry), 0),
            _ => (Status::INVALID_OPCODE, 0),
        }
    }

    fn identify(&self, entry: &SubmissionEntry) -> Status {
        let mut data = [0u8; PAGE_SIZE];
        match entry.cdw10 & 0xff {
            cns::CONTROLLER => {
                data[idc::VID..idc::VID + 2].copy_from_slice(&0x1b36u16.to_le_bytes());
                put_text(&mut data[idc::SERIAL], &self.shared.serial);
                put_text(&mut data[idc::MODEL], &self.shared.model);
                put_text(&mut data[idc::FIRMWARE], env!("CARGO_PKG_VERSION"));
                data[idc::MDTS] = MDTS;
                data[idc::CNTLID..idc::CNTLID + 2].copy_from_slice(&1u16.to_le_bytes());
                data[idc::VER..idc::VER + 4].copy_from_slice(&0x0002_0000u32.to_le_bytes());
                data[idc::SQES] = 0x66; // 64-byte entries, required and maximum.
                data[idc::CQES] = 0x44; // 16-byte entries.
                data[idc::NN..idc::NN + 4].copy_from_slice(&1u32.to_le_bytes());
            }
            cns::NAMESPACE if entry.nsid == 1 => {
                let blocks = self.shared.namespace_blocks.to_le_bytes();
                data[idn::NSZE..idn::NSZE + 8].copy_from_slice(&blocks);
                data[idn::NCAP..idn::NCAP + 8].copy_from_slice(&blocks);
                data[idn::NUSE..idn::NUSE + 8].copy_from_slice(&blocks);
                data[idn::NLBAF] = 0; // One format (0's based).
                data[idn::FLBAS] = 0;
                data[idn::LBAF0 + 2] = self.shared.block_shift as u8;
            }
            cns::NAMESPACE => return Status::INVALID_NAMESPACE,
            cns::ACTIVE_NAMESPACE_LIST => {
                if entry.nsid < 1 {
                    data[0..4].copy_from_slice(&1u32.to_le_bytes());
                }
            }
            _ => return Status::INVALID_FIELD,
        }
        match self.shared.iova.translate(entry.prp1, PAGE_SIZE) {
            Some(dst) if entry.prp1.is_multiple_of(PAGE_SIZE as u64) => {
                // SAFETY: translate checked the 4 KiB range lies in registered DMA memory; the
                // command's data buffer belongs to the controller until it completes.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) };
                Status::SUCCESS
            }
            Some(_) => Status::INVALID_PRP_OFFSET,
            None => Status::DATA_TRANSFER_ERROR,
        }
    }

    fn create_cq(&self, entry: &SubmissionEntry) -> Status {
        let qid = (entry.cdw10 & 0xffff) as u16;
        let entries = (entry.cdw10 >> 16) + 1;
        if qid == 0 || qid > self.shared.max_io_queues {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        if !(2..=MAX_QUEUE_ENTRIES).contains(&entries) {
            return Status::INVALID_QUEUE_SIZE;
        }
        if entry.cdw11 & 1 == 0 {
            // Only physically contiguous queues are supported (CAP.CQR = 1).
            return Status::INVALID_FIELD;
        }
        let mut queues = self.queues.lock();
        if !matches!(queues[qid as usize], QueueSlot::Empty) {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        queues[qid as usize] = QueueSlot::CompletionOnly {
            cq_iova: entry.prp1,
            entries,
        };
        Status::SUCCESS
    }

    fn create_sq(&self, entry: &SubmissionEntry) -> Status {
        let qid = (entry.cdw10 & 0xffff) as u16;
        let entries = (entry.cdw10 >> 16) + 1;
        let cqid = (entry.cdw11 >> 16) as u16;
        if qid == 0 || qid > self.shared.max_io_queues {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        if !(2..=MAX_QUEUE_ENTRIES).contains(&entries) {
            return Status::INVALID_QUEUE_SIZE;
        }
        let mut queues = self.queues.lock();
        // This controller pairs SQ y with CQ y (one submission queue per completion queue).
        let QueueSlot::CompletionOnly {
            cq_iova,
            entries: cq_entries,
        } = queues[qid as usize]
        else {
            return Status::COMPLETION_QUEUE_INVALID;
        };
        if cqid != qid {
            return Status::COMPLETION_QUEUE_INVALID;
        }
        match DeviceQueue::new(
            qid,
            entry.prp1,
            cq_iova,
            entries,
            cq_entries,
            &self.shared,
            &self.doorbells,
        ) {
            Ok(queue) => {
                self.doorbells.reset(qid);
                queues[qid as usize] = QueueSlot::Ready(Box::new(queue));
                self.alive[qid as usize].store(true, Ordering::Release);
                self.generation.fetch_add(1, Ordering::AcqRel);
                Status::SUCCESS
            }
            Err(status) => status,
        }
    }

    fn delete_sq(&self, entry: &SubmissionEntry) -> Status {
        let qid = (entry.cdw10 & 0xffff) as u16;
        if qid == 0
            || qid > self.shared.max_io_queues
            || !self.alive[qid as usize].swap(false, Ordering::AcqRel)
        {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        let mut queues = self.queues.lock();
        // The completion queue stays until Delete I/O Completion Queue; remember its ring.
        queues[qid as usize] = match std::mem::replace(&mut queues[qid as usize], QueueSlot::Empty)
        {
            QueueSlot::Ready(queue) => QueueSlot::CompletionOnly {
                cq_iova: queue.cq_iova,
                entries: queue.cq_entries,
            },
            _ => QueueSlot::CompletionOnly {
                cq_iova: 0,
                entries: 0,
            },
        };
        drop(queues);
        self.generation.fetch_add(1, Ordering::AcqRel);
        // As a controller completes the deletion only once it has stopped using the queue:
        // wait for the poller holding it to let go (the device thread notices within a loop).
        let deadline = std::time::Instant::now() + QUEUE_RELEASE_TIMEOUT;
        while self.shared.held[qid as usize].load(Ordering::Acquire) {
            if std::time::Instant::now() > deadline {
                tracing::error!(
                    qid,
                    "queue still polled {QUEUE_RELEASE_TIMEOUT:?} after its deletion"
                );
                return Status::INTERNAL_ERROR;
            }
            std::thread::yield_now();
        }
        Status::SUCCESS
    }

    fn delete_cq(&self, entry: &SubmissionEntry) -> Status {
        let qid = (entry.cdw10 & 0xffff) as u16;
        if qid == 0 || qid > self.shared.max_io_queues {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        let mut queues = self.queues.lock();
        match queues[qid as usize] {
            QueueSlot::CompletionOnly { .. } => {
                queues[qid as usize] = QueueSlot::Empty;
                self.doorbells.reset(qid);
                Status::SUCCESS
            }
            // Spec: deleting a CQ whose SQ still exists is Invalid Queue Deletion.
            QueueSlot::Ready(_) | QueueSlot::Polled => Status::command_specific(0x0c),
            QueueSlot::Empty => Status::INVALID_QUEUE_IDENTIFIER,
        }
    }
}

fn put_text(field: &mut [u8], text: &str) {
    field.fill(b' ');
    let bytes = text.as_bytes();
    let len = bytes.len().min(field.len());
    field[..len].copy_from_slice(&bytes[..len]);
}

/// The due time of a command a run-time `stall` rule holds until the rules change.
const STALLED: u64 = u64::MAX;

#[derive(Clone, Copy)]
struct Deferred {
    due: u64,
    cid: u16,
    status: Status,
}

/// The controller side of one submission queue and its completion queue.
pub struct DeviceQueue {
    // ---- Hot. ----
    sq: *const SubmissionEntry,
    cq: *mut CompletionEntry,
    sq_entries: u32,
    cq_entries: u32,
    sq_head: u32,
    cq_tail: u32,
    /// The CQ head as last read from its doorbell; re-read only when the queue looks full.
    cq_head_seen: u32,
    phase: bool,
    qid: u16,
    /// Commands fetched whose completion waits: for injected latency, or for room in the CQ.
    /// Bounded by the SQ size; fetching stops when it is full.
    deferred: Vec<Deferred>,
    rng: Rng,
    /// The run-time rules this queue applies, and their generation; `None` when empty.
    runtime: Option<Arc<RuntimeRules>>,
    runtime_generation: u64,
    shared: Arc<DeviceShared>,
    doorbells: Arc<DoorbellPage>,
    // ---- Cold. ----
    cq_iova: u64,
    /// Set when the host wrote an invalid doorbell value; the queue stops, as a controller
    /// would raise an asynchronous error and stop processing it.
    faulted: bool,
}

impl Drop for DeviceQueue {
    fn drop(&mut self) {
        // The commands still deferred are dropped with the queue, never completed: the queue
        // is gone (Delete I/O Submission Queue), or the controller is. Counted before the
        // release below, so a host that saw the deletion complete sees them gone.
        self.shared
            .deferred_commands
            .fetch_sub(self.deferred.len(), Ordering::Relaxed);
        self.shared.held[self.qid as usize].store(false, Ordering::Release);
    }
}

// SAFETY: the ring pointers point into DMA memory kept alive by `shared.iova`; exactly one
// poller owns a DeviceQueue at a time, and moving it moves that poller's only access.
unsafe impl Send for DeviceQueue {}

impl DeviceQueue {
    fn new(
        qid: u16,
        sq_iova: u64,
        cq_iova: u64,
        sq_entries: u32,
        cq_entries: u32,
        shared: &Arc<DeviceShared>,
        doorbells: &Arc<DoorbellPage>,
    ) -> Result<Self, Status> {
        if !sq_iova.is_multiple_of(PAGE_SIZE as u64) || !cq_iova.is_multiple_of(PAGE_SIZE as u64) {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        let sq = shared
            .iova
            .translate(sq_iova, sq_entries as usize * 64)
            .ok_or(Status::DATA_TRANSFER_ERROR)?;
        let cq = shared
            .iova
            .translate(cq_iova, cq_entries as usize * 16)
            .ok_or(Status::DATA_TRANSFER_ERROR)?;
        Ok(Self {
            sq: sq.cast(),
            cq: cq.cast(),
            sq_entries,
            cq_entries,
            sq_head: 0,
            cq_tail: 0,
            cq_head_seen: 0,
            phase: true,
            qid,
            deferred: Vec::with_capacity(sq_entries as usize),
            rng: Rng::new(0x5eed ^ qid as u64),
            runtime: None,
            runtime_generation: 0,
            shared: shared.clone(),
            doorbells: doorbells.clone(),
            cq_iova,
            faulted: false,
        })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands fetched and not yet completed.
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// The next submitted entry, if the SQ tail doorbell shows one.
    #[inline(always)]
    fn fetch(&mut self) -> Option<SubmissionEntry> {
        let tail = self.sq_tail()?;
        self.fetch_before(tail)
    }

    /// The next submitted entry without consuming it (for the admin hold test hook).
    #[cfg(test)]
    fn peek(&mut self) -> Option<SubmissionEntry> {
        let tail = self.sq_tail()?;
        if tail == self.sq_head {
            return None;
        }
        // SAFETY: as in `fetch_before`: sq_head < sq_entries, inside the ring translated at
        // creation, and the doorbell's acquire load ordered the host's entry writes first.
        Some(unsafe { self.sq.add(self.sq_head as usize).read_volatile() })
    }

    /// The SQ tail the host last rang, or `None` if the queue is faulted or the value is
    /// invalid (which faults it).
    #[inline(always)]
    fn sq_tail(&mut self) -> Option<u32> {
        if self.faulted {
            return None;
        }
        let tail = self.doorbells.read(self.qid, DoorbellKind::SubmissionTail);
        if tail >= self.sq_entries {
            self.fault("submission queue tail doorbell", tail);
            return None;
        }
        Some(tail)
    }

    /// The entry at the SQ head, if the head has not reached `tail`.
    #[inline(always)]
    fn fetch_before(&mut self, tail: u32) -> Option<SubmissionEntry> {
        if tail == self.sq_head {
            return None;
        }
        // SAFETY: sq_head < sq_entries, inside the ring translated at creation; the acquire
        // load of the doorbell ordered the host's entry writes before this read.
        let entry = unsafe { self.sq.add(self.sq_head as usize).read_volatile() };
        self.sq_head += 1;
        if self.sq_head == self.sq_entries {
            self.sq_head = 0;
        }
        Some(entry)
    }

    /// Posts a completion entry; false when the completion queue is full.
    #[inline(always)]
    fn post(&mut self, cid: u16, status: Status, result: u32) -> bool {
        let next = if self.cq_tail + 1 == self.cq_entries {
            0
        } else {
            self.cq_tail + 1
        };
        if next == self.cq_head_seen {
            let head = self.doorbells.read(self.qid, DoorbellKind::CompletionHead);
            if head >= self.cq_entries {
                self.fault("completion queue head doorbell", head);
                return false;
            }
            self.cq_head_seen = head;
            if next == head {
                return false;
            }
        }
        // SAFETY: cq_tail < cq_entries, inside the ring translated at creation. The host reads
        // dwords 0..2 only after it sees dword 3's phase tag flip, and dword 3 is stored last
        // with release ordering.
        unsafe {
            let entry = self.cq.add(self.cq_tail as usize);
            // DW0 and DW1 as one quadword, SQ head and SQ id as one dword: three stores.
            entry.cast::<u64>().write_volatile(result as u64);
            entry
                .cast::<u32>()
                .add(2)
                .write_volatile(self.sq_head | (self.qid as u32) << 16);
            std::sync::atomic::AtomicU32::from_ptr(entry.cast::<u32>().add(3)).store(
                CompletionEntry::dw3(cid, status, self.phase),
                Ordering::Release,
            );
        }
        self.cq_tail = next;
        if next == 0 {
            self.phase = !self.phase;
        }
        true
    }

    fn fault(&mut self, what: &str, value: u32) {
        self.faulted = true;
        self.shared.internal_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            qid = self.qid,
            "host wrote invalid {what} value {value}; queue stopped"
        );
    }

    /// Executes every newly submitted command and posts what is due. Returns the number of
    /// completions posted.
    #[inline]
    pub fn process(&mut self) -> usize {
        if self.shared.runtime.generation() != self.runtime_generation {
            self.take_runtime_rules();
        }
        let posted = if self.deferred.is_empty() {
            0
        } else {
            self.post_due()
        };
        // The doorbell is read once per call: everything rung so far is one batch. Bounded: at
        // most one pass over the ring.
        let Some(tail) = self.sq_tail() else {
            return posted;
        };
        // Whether run-time rules apply is decided once per batch, not per command.
        posted
            + match self.runtime.is_some() {
                false => self.execute_batch::<false>(tail),
                true => self.execute_batch::<true>(tail),
            }
    }

    /// Executes the commands submitted before `tail`, with (`RUNTIME`) or without the
    /// run-time rules. Returns the completions posted.
    #[inline(always)]
    fn execute_batch<const RUNTIME: bool>(&mut self, tail: u32) -> usize {
        let mut posted = 0;
        for _ in 0..self.sq_entries {
            if self.deferred.len() == self.deferred.capacity() {
                break;
            }
            let Some(entry) = self.fetch_before(tail) else {
                break;
            };
            let (status, delay) = self.execute_io::<RUNTIME>(&entry);
            if delay == 0 && self.post(entry.cid(), status, 0) {
                posted += 1;
            } else {
                let due = match delay {
                    0 => 0,
                    STALLED => STALLED,
                    delay => self
                        .shared
                        .clock
                        .now()
                        .saturating_add(delay)
                        .min(STALLED - 1),
                };
                self.deferred.push(Deferred {
                    due,
                    cid: entry.cid(),
                    status,
                });
                self.shared
                    .deferred_commands
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        posted
    }

    /// Takes the device's new run-time rules; commands the old ones stalled are due now.
    #[cold]
    fn take_runtime_rules(&mut self) {
        self.runtime_generation = self.shared.runtime.generation();
        let rules = self.shared.runtime.current();
        self.runtime = (!rules.is_empty()).then_some(rules);
        for deferred in self.deferred.iter_mut() {
            if deferred.due == STALLED {
                deferred.due = 0;
            }
        }
    }

    fn post_due(&mut self) -> usize {
        let now = self.shared.clock.now();
        let mut posted = 0;
        let mut index = 0;
        while index < self.deferred.len() {
            let deferred = self.deferred[index];
            if deferred.due <= now {
                if !self.post(deferred.cid, deferred.status, 0) {
                    break;
                }
                self.deferred.swap_remove(index);
                posted += 1;
            } else {
                index += 1;
            }
        }
        self.shared
            .deferred_commands
            .fetch_sub(posted, Ordering::Relaxed);
        posted
    }

    /// Runs one I/O command: checks, injection, data transfer. Returns the status and the
    /// injected delay in ticks.
    #[inline]
    fn execute_io<const RUNTIME: bool>(&mut self, entry: &SubmissionEntry) -> (Status, u64) {
        let shared = &*self.shared;
        let opcode = entry.opcode();
        let class = match opcode {
            io_opcode::READ => OpClass::Read,
            io_opcode::WRITE | io_opcode::WRITE_ZEROES => OpClass::Write,
            io_opcode::FLUSH => OpClass::Flush,
            _ => return (Status::INVALID_OPCODE, 0),
        };
        let (slba, blocks) = if class == OpClass::Flush {
            if entry.nsid != 1 && entry.nsid != u32::MAX {
                return (Status::INVALID_NAMESPACE, 0);
            }
            (0, shared.namespace_blocks)
        } else {
            if entry.nsid != 1 {
                return (Status::INVALID_NAMESPACE, 0);
            }
            let (slba, blocks) = (entry.slba(), entry.block_count() as u64);
            if slba
                .checked_add(blocks)
                .is_none_or(|end| end > shared.namespace_blocks)
            {
                return (Status::LBA_OUT_OF_RANGE, 0);
            }
            (slba, blocks)
        };
        let mut injected = if shared.injector.is_empty() {
            Default::default()
        } else {
            shared
                .injector
                .evaluate(class, slba, blocks, shared.clock.now(), &mut self.rng)
        };
        if let Some(runtime) = self.runtime.as_deref().filter(|_| RUNTIME) {
            let no_data = entry.cdw2 & crate::NO_DATA_CDW2 != 0;
            runtime_inject(
                runtime,
                &mut self.rng,
                &shared.clock,
                &mut injected,
                class,
                slba,
                blocks,
                no_data,
            );
        }
        if let Some(status) = injected.status {
            return (status, injected.delay_ticks);
        }
        let offset = slba << shared.block_shift;
        let bytes = blocks << shared.block_shift;
        let status = match opcode {
            io_opcode::READ | io_opcode::WRITE if bytes > shared.max_transfer_bytes() => {
                Status::INVALID_FIELD
            }
            io_opcode::READ | io_opcode::WRITE
                if shared.media.kind() == super::MediaKind::Null
                    || entry.cdw2 & crate::NO_DATA_CDW2 != 0 =>
            {
                Status::SUCCESS
            }
            io_opcode::READ => transfer(shared, entry, bytes as usize, |host, at, len| {
                // SAFETY: `transfer` translated `host` for `len` bytes; `at + len` stays within
                // the command's range, which was checked against the namespace.
                unsafe { shared.media.read(offset + at as u64, host, len) }
            }),
            io_opcode::WRITE => {
                let status = transfer(shared, entry, bytes as usize, |host, at, len| {
                    // SAFETY: as for reads.
                    unsafe { shared.media.write(offset + at as u64, host, len) }
                });
                if status.is_success() && entry.fua() {
                    // Force Unit Access: this write durable, not everything before it.
                    flush_status(shared, offset, bytes)
                } else {
                    status
                }
            }
            io_opcode::WRITE_ZEROES => {
                shared.media.zero(offset, bytes);
                Status::SUCCESS
            }
            _ => flush_status(shared, 0, shared.media.len()),
        };
        (status, injected.delay_ticks)
    }
}

/// Adds what the run-time rules decide for a command to `injected` (media rules only for
/// commands that move data).
#[cold]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn runtime_inject(
    runtime: &RuntimeRules,
    rng: &mut Rng,
    clock: &Clock,
    injected: &mut crate::inject::Injected,
    class: OpClass,
    slba: u64,
    blocks: u64,
    no_data: bool,
) {
    let now = clock.now();
    for (injector, applies) in [(&runtime.device, true), (&runtime.media, !no_data)] {
        if applies && !injector.is_empty() {
            let more = injector.evaluate(class, slba, blocks, now, rng);
            injected.delay_ticks = injected.delay_ticks.saturating_add(more.delay_ticks);
            injected.status = injected.status.or(more.status);
            injected.stall |= more.stall;
        }
    }
    if injected.stall {
        injected.delay_ticks = STALLED;
    }
}

/// Makes `len` bytes at `offset` durable (the whole media for a Flush).
fn flush_status(shared: &DeviceShared, offset: u64, len: u64) -> Status {
    match shared.media.flush_range(offset, len) {
        Ok(()) => Status::SUCCESS,
        Err(error) => {
            shared.internal_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("flushing media {:?} failed: {error}", shared.media.path());
            Status::WRITE_FAULT
        }
    }
}

/// Walks a command's PRP entries (PRP1, PRP2 or a chain of PRP lists) and calls `copy` with
/// (host pointer, offset in the transfer, length) for every contiguous piece. Any address
/// outside DMA memory, or a misaligned entry, fails the command before data moves further.
#[inline]
fn transfer(
    shared: &DeviceShared,
    entry: &SubmissionEntry,
    len: usize,
    mut copy: impl FnMut(*mut u8, usize, usize),
) -> Status {
    let page = PAGE_SIZE as u64;
    if entry.prp1 & 3 != 0 {
        return Status::INVALID_PRP_OFFSET;
    }
    let first = len.min((page - entry.prp1 % page) as usize);
    let Some(host) = shared.iova.translate(entry.prp1, first) else {
        return Status::DATA_TRANSFER_ERROR;
    };
    copy(host, 0, first);
    let mut done = first;
    if done == len {
        return Status::SUCCESS;
    }
    if len - done <= PAGE_SIZE {
        if !entry.prp2.is_multiple_of(page) {
            return Status::INVALID_PRP_OFFSET;
        }
        let Some(host) = shared.iova.translate(entry.prp2, len - done) else {
            return Status::DATA_TRANSFER_ERROR;
        };
        copy(host, done, len - done);
        return Status::SUCCESS;
    }
    // PRP2 is a PRP list. Its entries run to the end of its page; when more data remains than
    // that page describes, the last entry points at the next list page.
    let mut list = entry.prp2;
    if list & 7 != 0 {
        return Status::INVALID_PRP_OFFSET;
    }
    // Bounded: one list page per 511 data pages, and MDTS caps the data pages.
    for _ in 0..=PRP_ENTRIES_PER_PAGE {
        let slots = ((page - list % page) / 8) as usize;
        for slot in 0..slots {
            let Some(entry_ptr) = shared.iova.translate(list + 8 * slot as u64, 8) else {
                return Status::DATA_TRANSFER_ERROR;
            };
            // SAFETY: translate checked the 8 bytes lie in DMA memory; list entries are
            // 8-byte aligned because the list start is (checked above).
            let address = unsafe { entry_ptr.cast::<u64>().read_volatile() };
            let remaining = len - done;
            if slot == slots - 1 && remaining > PAGE_SIZE {
                list = address;
                if list & 7 != 0 {
                    return Status::INVALID_PRP_OFFSET;
                }
                break;
            }
            if address % page != 0 {
                return Status::INVALID_PRP_OFFSET;
            }
            let piece = remaining.min(PAGE_SIZE);
            let Some(host) = shared.iova.translate(address, piece) else {
                return Status::DATA_TRANSFER_ERROR;
            };
            copy(host, done, piece);
            done += piece;
            if done == len {
                return Status::SUCCESS;
            }
        }
    }
    Status::INVALID_FIELD
}
