//! The host driver of one NVMe controller: the admin queue and what is done through it.
//!
//! Transport-independent: a [`Transport`] supplies the doorbells (BAR0 registers for VFIO, a
//! doorbell page for the in-process controller) and has already brought the controller up to
//! the point where the admin queue exists (AQA/ASQ/ACQ written, CC.EN set, CSTS.RDY seen).
//! From there everything is admin commands: Identify Controller and Namespaces, Set Features
//! (Number of Queues), Create/Delete I/O Completion and Submission Queues.
//!
//! Admin commands are rare (start-up, one queue pair per reactor core, shutdown), so they are
//! serialised by a mutex and waited for by polling, with a timeout: a controller that does not
//! answer is reported, never waited on forever.
//!
//! A command that timed out is not over: the controller may still execute it and complete it
//! later. So every completion is matched to its command (the queue pair maps the completion's
//! command identifier to the command that holds it, and each admin command carries a sequence
//! number of its own): a late completion is logged and discarded, never taken as the answer to
//! whichever command waits next. And the DMA memory a timed-out command was given stays in the
//! controller's *quarantine* for good: the controller may still write it, so it is never freed
//! or handed out again (see [`NvmeController::quarantined_bytes`]).

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::doorbell::{Doorbell, DoorbellKind};
use super::qpair::{Completed, DataRange, QueueMemory, QueuePair};
use super::spec::{
    admin_opcode, cns, feature, identify_controller as idc, identify_namespace as idn,
};
use super::spec::{Status, SubmissionEntry, PAGE_SIZE};
use fathom_dma::{DmaBuf, DmaError, DmaPool};

/// What a transport provides to the host controller driver.
pub trait Transport: Send + Sync {
    /// The doorbell register of queue `qid`.
    fn doorbell(&self, qid: u16, kind: DoorbellKind) -> Doorbell;
    /// Gives an emulated controller the chance to process its admin queue while the host
    /// waits for an admin completion. Hardware needs nothing: the default does nothing.
    fn service_admin(&self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("{device}: {command} failed with NVMe status {status}")]
    CommandFailed {
        device: String,
        command: &'static str,
        status: Status,
    },
    #[error("{device}: {command} did not complete within {timeout:?}: the controller is not answering its admin queue")]
    Timeout {
        device: String,
        command: &'static str,
        timeout: Duration,
    },
    #[error("{device}: the controller granted {granted} I/O queue pairs but {wanted} are needed (one per reactor core); use fewer cores")]
    NotEnoughQueues {
        device: String,
        granted: u16,
        wanted: u16,
    },
    #[error("{device}: no I/O queue identifier is free (all {granted} granted queue pairs exist)")]
    NoFreeQueue { device: String, granted: u16 },
    #[error("{device}: Identify returned unusable data: {what}")]
    BadIdentify { device: String, what: String },
    #[error("{device}: DMA memory for the admin path")]
    Dma {
        device: String,
        #[source]
        source: DmaError,
    },
}

/// What Identify Controller says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerIdentity {
    pub vendor_id: u16,
    pub model: String,
    pub serial: String,
    pub firmware: String,
    pub controller_id: u16,
    /// Largest transfer the controller accepts, from MDTS (`None`: no limit).
    pub max_transfer_bytes: Option<usize>,
    pub namespace_count: u32,
}

/// One active namespace, from Identify Namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    pub nsid: u32,
    pub block_size: u32,
    pub blocks: u64,
}

impl Namespace {
    /// Reads size and block size from an Identify Namespace data structure (4096 bytes).
    pub fn from_identify(nsid: u32, data: &[u8]) -> Result<Self, String> {
        if data.len() < PAGE_SIZE {
            return Err(format!("Identify Namespace returned {} bytes", data.len()));
        }
        let blocks =
            u64::from_le_bytes(data[idn::NSZE..idn::NSZE + 8].try_into().expect("8 bytes"));
        let format = (data[idn::FLBAS] & 0xf) as usize;
        let lbads = data[idn::LBAF0 + 4 * format + 2];
        if !(9..=16).contains(&lbads) {
            return Err(format!(
                "namespace {nsid} has LBA data size 2^{lbads}; 512 B to 64 KiB is expected"
            ));
        }
        Ok(Namespace {
            nsid,
            block_size: 1 << lbads,
            blocks,
        })
    }
}

/// The admin queue pair and what the host remembers about its commands, under one lock.
struct AdminQueue {
    /// Present until the controller is dropped (then freed, or leaked if commands are still
    /// unanswered: see `Drop for AdminQueue`).
    qp: Option<QueuePair>,
    /// The cookie of the next admin command: a sequence number, so that a completion names the
    /// one command it answers. (It wraps after 2^32 commands; a command timed out that long
    /// before and still unanswered is not a case to design for.)
    next_cookie: u32,
    /// Commands that timed out and still hold their command identifier, as (cookie, command):
    /// at most the queue's capacity, as each holds a tracker until it completes.
    abandoned: Vec<(u32, &'static str)>,
    /// Completions that arrived for abandoned commands, logged and discarded.
    stale_completions: u64,
    /// DMA memory the controller may still read or write at any time: the data buffer of an
    /// admin command that timed out, and the rings of an I/O queue pair whose creation timed
    /// out or whose deletion was not confirmed. It is kept here, never freed and never handed
    /// back to safe code; it grows only when the controller misbehaves.
    quarantine: Vec<DmaBuf>,
}

impl AdminQueue {
    /// Logs and drops a completion that answers an abandoned command, releasing its identifier.
    fn discard_stale(&mut self, device: &str, done: Completed) {
        self.stale_completions += 1;
        let command = match self
            .abandoned
            .iter()
            .position(|&(cookie, _)| cookie == done.cookie)
        {
            Some(index) => self.abandoned.swap_remove(index).1,
            // The queue pair reports completions only for identifiers in flight, and every
            // identifier in flight that is not the current command's is an abandoned one.
            None => "an admin command",
        };
        tracing::warn!(
            "{device}: {command} completed (status {}) after it had timed out; the completion is discarded",
            done.status
        );
    }
}

impl Drop for AdminQueue {
    fn drop(&mut self) {
        // Dropping the host's handle does not stop the controller: a transport that can stop
        // it (VFIO disables it) does so on its own schedule, the in-process one not at all.
        // Memory the controller may still use is therefore leaked, not freed: the quarantine,
        // and the admin queue itself while a command on it is unanswered.
        for buf in self.quarantine.drain(..) {
            std::mem::forget(buf);
        }
        if let Some(qp) = self.qp.take() {
            if !self.abandoned.is_empty() {
                std::mem::forget(qp);
            }
        }
    }
}

/// The host's handle on a controller whose admin queue is up.
pub struct NvmeController {
    name: String,
    transport: std::sync::Arc<dyn Transport>,
    pool: DmaPool,
    admin: Mutex<AdminQueue>,
    identity: ControllerIdentity,
    namespaces: Vec<Namespace>,
    io_queues_granted: u16,
    free_qids: Mutex<Vec<u16>>,
    timeout: Duration,
}

impl NvmeController {
    /// Identifies the controller and its namespaces and asks for `io_queues` I/O queue pairs.
    pub fn attach(
        name: &str,
        transport: std::sync::Arc<dyn Transport>,
        pool: DmaPool,
        admin: QueuePair,
        io_queues: u16,
        timeout: Duration,
    ) -> Result<Self, NvmeError> {
        let mut controller = Self {
            name: name.to_string(),
            transport,
            pool,
            admin: Mutex::new(AdminQueue {
                qp: Some(admin),
                next_cookie: 0,
                abandoned: Vec::new(),
                stale_completions: 0,
                quarantine: Vec::new(),
            }),
            identity: ControllerIdentity {
                vendor_id: 0,
                model: String::new(),
                serial: String::new(),
                firmware: String::new(),
                controller_id: 0,
                max_transfer_bytes: None,
                namespace_count: 0,
            },
            namespaces: Vec::new(),
            io_queues_granted: 0,
            free_qids: Mutex::new(Vec::new()),
            timeout,
        };
        controller.identity = controller.identify_controller()?;
        controller.namespaces = controller.identify_namespaces()?;
        // Set Features, Number of Queues: CDW11 holds NSQR (15:0) and NCQR (31:16), 0's based;
        // DW0 of the completion says how many were allocated, in the same form.
        let mut entry = SubmissionEntry::new(admin_opcode::SET_FEATURES, 0, 0);
        entry.cdw10 = feature::NUMBER_OF_QUEUES;
        entry.cdw11 = (io_queues as u32 - 1) | (io_queues as u32 - 1) << 16;
        let granted = controller.admin_command("Set Features (Number of Queues)", entry)?;
        let granted = ((granted & 0xffff).min(granted >> 16) + 1).min(u16::MAX as u32) as u16;
        if granted < io_queues {
            return Err(NvmeError::NotEnoughQueues {
                device: controller.name.clone(),
                granted,
                wanted: io_queues,
            });
        }
        controller.io_queues_granted = granted;
        *controller.free_qids.get_mut() = (1..=granted).rev().collect();
        Ok(controller)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn identity(&self) -> &ControllerIdentity {
        &self.identity
    }

    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// Completions that arrived after their command had timed out (logged and discarded).
    pub fn stale_completions(&self) -> u64 {
        self.admin.lock().stale_completions
    }

    /// Bytes of DMA memory quarantined: given to the controller by commands that timed out
    /// (or queues it did not confirm deleting), never freed, because it may still write them.
    pub fn quarantined_bytes(&self) -> usize {
        let admin = self.admin.lock();
        admin.quarantine.iter().map(DmaBuf::capacity).sum()
    }

    /// Runs one admin command without data and waits for it; returns the completion's DW0.
    pub fn admin_command(
        &self,
        command: &'static str,
        entry: SubmissionEntry,
    ) -> Result<u32, NvmeError> {
        self.run_admin(command, entry, None)
            .map(|(result, _)| result)
    }

    /// Runs one admin command that transfers data through `buf` and waits for it; returns the
    /// completion's DW0 and the buffer. The buffer is taken by value because the controller
    /// owns it while the command runs: if the command times out, the controller may still
    /// write it, and it is quarantined instead of returned (or freed).
    pub fn admin_command_with_data(
        &self,
        command: &'static str,
        entry: SubmissionEntry,
        buf: DmaBuf,
    ) -> Result<(u32, DmaBuf), NvmeError> {
        let (result, buf) = self.run_admin(command, entry, Some(buf))?;
        Ok((result, buf.expect("a completed command returns its buffer")))
    }

    fn run_admin(
        &self,
        command: &'static str,
        entry: SubmissionEntry,
        buf: Option<DmaBuf>,
    ) -> Result<(u32, Option<DmaBuf>), NvmeError> {
        let timeout = || NvmeError::Timeout {
            device: self.name.clone(),
            command,
            timeout: self.timeout,
        };
        let mut guard = self.admin.lock();
        let admin = &mut *guard;
        let cookie = admin.next_cookie;
        admin.next_cookie = cookie.wrapping_add(1);
        let qp = admin.qp.as_mut().expect("admin queue present until drop");
        // The admin lock serialises commands, so at most one is in flight: a full queue here
        // means every other identifier is held by a command that timed out and was never
        // answered. The buffer never reached the controller, so dropping it is safe.
        if qp
            .submit(entry, buf.as_ref().map(DataRange::of), cookie)
            .is_err()
        {
            return Err(timeout());
        }
        qp.ring();
        let started = Instant::now();
        let mut completion = [Completed::default()];
        loop {
            self.transport.service_admin();
            let qp = admin.qp.as_mut().expect("admin queue present until drop");
            if qp.reap(&mut completion) == 1 {
                let done = completion[0];
                if done.cookie != cookie {
                    // A late answer to an earlier command; ours may be right behind it.
                    admin.discard_stale(&self.name, done);
                    continue;
                }
                if !done.status.is_success() {
                    return Err(NvmeError::CommandFailed {
                        device: self.name.clone(),
                        command,
                        status: done.status,
                    });
                }
                return Ok((done.result, buf));
            }
            if started.elapsed() > self.timeout {
                // The command keeps its identifier until the controller answers it, and its
                // memory for good.
                admin.abandoned.push((cookie, command));
                if let Some(buf) = buf {
                    admin.quarantine.push(buf);
                }
                return Err(timeout());
            }
            std::thread::yield_now();
        }
    }

    fn identify(&self, command: &'static str, cns: u32, nsid: u32) -> Result<Vec<u8>, NvmeError> {
        let buf = self
            .pool
            .alloc(PAGE_SIZE)
            .map_err(|source| NvmeError::Dma {
                device: self.name.clone(),
                source,
            })?;
        let mut entry = SubmissionEntry::new(admin_opcode::IDENTIFY, 0, nsid);
        entry.cdw10 = cns;
        let (_, buf) = self.admin_command_with_data(command, entry, buf)?;
        Ok(buf.to_vec())
    }

    fn identify_controller(&self) -> Result<ControllerIdentity, NvmeError> {
        let data = self.identify("Identify Controller", cns::CONTROLLER, 0)?;
        let text = |range: std::ops::Range<usize>| {
            String::from_utf8_lossy(&data[range]).trim().to_string()
        };
        let mdts = data[idc::MDTS];
        Ok(ControllerIdentity {
            vendor_id: u16::from_le_bytes([data[idc::VID], data[idc::VID + 1]]),
            model: text(idc::MODEL),
            serial: text(idc::SERIAL),
            firmware: text(idc::FIRMWARE),
            controller_id: u16::from_le_bytes([data[idc::CNTLID], data[idc::CNTLID + 1]]),
            // MDTS is in units of the minimum memory page size, which is 4 KiB on every
            // controller this driver configures (CC.MPS = 0).
            max_transfer_bytes: (mdts != 0).then(|| PAGE_SIZE << mdts.min(20)),
            namespace_count: u32::from_le_bytes(
                data[idc::NN..idc::NN + 4].try_into().expect("4 bytes"),
            ),
        })
    }

    fn identify_namespaces(&self) -> Result<Vec<Namespace>, NvmeError> {
        let list = self.identify(
            "Identify (Active Namespace ID list)",
            cns::ACTIVE_NAMESPACE_LIST,
            0,
        )?;
        let mut namespaces = Vec::new();
        for chunk in list.chunks_exact(4) {
            let nsid = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            if nsid == 0 {
                break;
            }
            let data = self.identify("Identify Namespace", cns::NAMESPACE, nsid)?;
            namespaces.push(Namespace::from_identify(nsid, &data).map_err(|what| {
                NvmeError::BadIdentify {
                    device: self.name.clone(),
                    what,
                }
            })?);
        }
        Ok(namespaces)
    }

    /// Creates an I/O completion queue and an I/O submission queue bound to it, both of
    /// `entries`, in memory from the DMA pool.
    ///
    /// If the controller may have created either queue despite the error (a command timed out,
    /// or the completion queue of a failed pair could not be deleted), the rings are
    /// quarantined and the queue identifier is retired: the controller may write into that
    /// memory and may hold that identifier.
    pub fn create_io_queue_pair(&self, entries: u16) -> Result<QueuePair, NvmeError> {
        let qid = self
            .free_qids
            .lock()
            .pop()
            .ok_or_else(|| NvmeError::NoFreeQueue {
                device: self.name.clone(),
                granted: self.io_queues_granted,
            })?;
        let memory = match QueueMemory::allocate(&self.pool, entries) {
            Ok(memory) => memory,
            Err(source) => {
                self.free_qids.lock().push(qid);
                return Err(NvmeError::Dma {
                    device: self.name.clone(),
                    source,
                });
            }
        };
        match self.create_queues(qid, entries, &memory) {
            Ok(()) => Ok(QueuePair::new(
                qid,
                entries,
                memory,
                self.transport.doorbell(qid, DoorbellKind::SubmissionTail),
                self.transport.doorbell(qid, DoorbellKind::CompletionHead),
            )),
            Err(QueueFailure::NotHeld(error)) => {
                drop(memory);
                self.free_qids.lock().push(qid);
                Err(error)
            }
            Err(QueueFailure::MayBeHeld(error)) => {
                self.quarantine_queue(qid, memory);
                Err(error)
            }
        }
    }

    fn create_queues(
        &self,
        qid: u16,
        entries: u16,
        memory: &QueueMemory,
    ) -> Result<(), QueueFailure> {
        let size_and_id = (entries as u32 - 1) << 16 | qid as u32;
        let mut entry = SubmissionEntry::new(admin_opcode::CREATE_IO_CQ, 0, 0);
        entry.prp1 = memory.cq.iova();
        entry.cdw10 = size_and_id;
        entry.cdw11 = 1; // Physically contiguous; interrupts disabled (polled).
        self.admin_command("Create I/O Completion Queue", entry)
            .map_err(QueueFailure::after)?;
        let mut entry = SubmissionEntry::new(admin_opcode::CREATE_IO_SQ, 0, 0);
        entry.prp1 = memory.sq.iova();
        entry.cdw10 = size_and_id;
        entry.cdw11 = (qid as u32) << 16 | 1; // Bound to CQ `qid`; physically contiguous.
        match self.admin_command("Create I/O Submission Queue", entry) {
            Ok(_) => Ok(()),
            // A controller that did not answer would not answer a Delete either.
            Err(error @ NvmeError::Timeout { .. }) => Err(QueueFailure::MayBeHeld(error)),
            Err(error) => {
                let mut delete = SubmissionEntry::new(admin_opcode::DELETE_IO_CQ, 0, 0);
                delete.cdw10 = qid as u32;
                match self.admin_command("Delete I/O Completion Queue", delete) {
                    Ok(_) => Err(QueueFailure::NotHeld(error)),
                    Err(_) => Err(QueueFailure::MayBeHeld(error)),
                }
            }
        }
    }

    /// Deletes a queue pair's submission queue, then its completion queue. Commands still in
    /// flight are aborted by the controller (their completions are never reaped).
    ///
    /// If the controller does not confirm both deletions, the queue's memory is quarantined
    /// (never freed) and its identifier retired: a controller that still holds the queue may
    /// still write into it, and memory handed out again would be corrupted.
    pub fn delete_io_queue_pair(&self, queue: QueuePair) -> Result<(), NvmeError> {
        let qid = queue.qid();
        let mut entry = SubmissionEntry::new(admin_opcode::DELETE_IO_SQ, 0, 0);
        entry.cdw10 = qid as u32;
        let deleted = self
            .admin_command("Delete I/O Submission Queue", entry)
            .and_then(|_| {
                let mut entry = SubmissionEntry::new(admin_opcode::DELETE_IO_CQ, 0, 0);
                entry.cdw10 = qid as u32;
                self.admin_command("Delete I/O Completion Queue", entry)
            });
        match deleted {
            Ok(_) => {
                drop(queue);
                self.free_qids.lock().push(qid);
                Ok(())
            }
            Err(error) => {
                self.quarantine_queue(qid, queue.into_memory());
                Err(error)
            }
        }
    }

    /// Keeps the rings of a queue the controller may still hold, and retires its identifier.
    fn quarantine_queue(&self, qid: u16, memory: QueueMemory) {
        let QueueMemory { sq, cq, prp_lists } = memory;
        let bytes = sq.capacity() + cq.capacity() + prp_lists.capacity();
        tracing::warn!(
            "{}: the controller may still hold I/O queue {qid}: its {bytes} bytes of DMA memory are quarantined and the queue identifier is not reused",
            self.name
        );
        self.admin.lock().quarantine.extend([sq, cq, prp_lists]);
    }
}

/// Why creating or deleting an I/O queue pair failed, as far as its memory is concerned.
enum QueueFailure {
    /// The controller holds no queue in the memory: it may be freed, the identifier reused.
    NotHeld(NvmeError),
    /// The controller may hold a queue in the memory, now or later.
    MayBeHeld(NvmeError),
}

impl QueueFailure {
    /// After a failed creation command: refused means nothing was created; a timeout means the
    /// controller may still create the queue.
    fn after(error: NvmeError) -> Self {
        match error {
            NvmeError::Timeout { .. } => QueueFailure::MayBeHeld(error),
            error => QueueFailure::NotHeld(error),
        }
    }
}

/// An I/O queue pair together with the controller that created it, for a reactor to own:
/// dropping it deletes the queues from the controller (the memory is quarantined instead if
/// the controller does not confirm, see [`NvmeController::delete_io_queue_pair`]).
pub struct OwnedQueuePair {
    qp: Option<QueuePair>,
    controller: std::sync::Arc<NvmeController>,
}

impl OwnedQueuePair {
    pub fn new(qp: QueuePair, controller: std::sync::Arc<NvmeController>) -> Self {
        Self {
            qp: Some(qp),
            controller,
        }
    }

    #[inline(always)]
    pub fn get(&mut self) -> &mut QueuePair {
        self.qp.as_mut().expect("queue pair present until drop")
    }

    #[inline(always)]
    pub fn get_ref(&self) -> &QueuePair {
        self.qp.as_ref().expect("queue pair present until drop")
    }
}

impl Drop for OwnedQueuePair {
    fn drop(&mut self) {
        if let Some(qp) = self.qp.take() {
            if let Err(error) = self.controller.delete_io_queue_pair(qp) {
                tracing::warn!("deleting an I/O queue pair: {error}");
            }
        }
    }
}
