//! The `vfio` driver: an NVMe controller driven from userspace, as SPDK drives one.
//!
//! The controller is opened through VFIO ([`pci`]): BAR0 is mapped into this process, the DMA
//! pool into the controller's IOMMU domain. Bring-up follows the NVMe specification's
//! initialisation sequence on the BAR0 registers: disable (CC.EN = 0, wait for CSTS.RDY = 0
//! within CAP.TO), program the admin queue (AQA/ASQ/ACQ), enable with 64/16-byte queue
//! entries and 4 KiB pages, wait for CSTS.RDY = 1. From there the host controller driver that
//! every NVMe transport shares ([`NvmeController`]) identifies the controller, asks for the
//! queues, and creates one I/O queue pair per reactor; the reactors poll their completion
//! queues (interrupts stay off). Shutdown is the normal shutdown notification (CC.SHN).
//!
//! Errors never hang: register waits are bounded by CAP.TO, admin commands by a timeout, and
//! an I/O queue that stops completing is reported with the controller status (CSTS.CFS).

pub mod bind;
pub mod pci;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::pci::{Bar, VfioPci};
use super::{DeviceInfo, Driver, DriverError, IoCommand, IoQueue};
use fathom_dma::DmaPool;
use fathom_nvme::spec::register as reg;
use fathom_nvme::{
    Completed, Doorbell, DoorbellKind, NvmeController, OwnedQueuePair, QueueFull, QueueMemory,
    QueuePair, Transport, MAX_TRANSFER_BYTES,
};

/// Admin queue entries (capped by CAP.MQES).
const ADMIN_ENTRIES: u16 = 32;
/// How long an admin command may take. Generous: emulated controllers are slow.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The least time allowed for CSTS.RDY to follow CC.EN, whatever CAP.TO says.
const MIN_READY_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a normal shutdown (CC.SHN) may take before it is reported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// An I/O queue with commands outstanding and no completion for this long is reported.
const IO_STALL_REPORT: Duration = Duration::from_secs(10);
/// Empty polls between two looks at the clock and CSTS while commands are outstanding:
/// the check costs nothing per IO.
const STALL_CHECK_POLLS: u32 = 1 << 16;

/// The registers of one controller, with the facts CAP gave at start.
struct Registers {
    bar: Arc<Bar>,
    name: String,
    doorbell_stride: usize,
    ready_timeout: Duration,
    max_queue_entries: u32,
}

impl Registers {
    fn error(&self, what: String) -> DriverError {
        DriverError::Setup {
            device: self.name.clone(),
            what,
        }
    }

    fn status(&self) -> u32 {
        self.bar.read32(reg::CSTS)
    }

    /// Waits until CSTS.RDY equals `ready`, reporting a fatal controller status, a vanished
    /// device, or CAP.TO running out.
    fn wait_ready(&self, ready: bool, doing: &str) -> Result<(), DriverError> {
        let started = Instant::now();
        loop {
            let csts = self.status();
            if csts == u32::MAX {
                return Err(self.error(format!(
                    "{doing}: the controller reads as all ones (removed from the bus, or in reset)"
                )));
            }
            if csts & reg::CSTS_FATAL != 0 {
                return Err(self.error(format!(
                    "{doing}: controller fatal status (CSTS.CFS set, CSTS = {csts:#x}); reset or power-cycle the device"
                )));
            }
            if (csts & reg::CSTS_READY != 0) == ready {
                return Ok(());
            }
            if started.elapsed() > self.ready_timeout {
                return Err(self.error(format!(
                    "{doing}: CSTS.RDY did not become {} within {:?} (CAP.TO); CSTS = {csts:#x}",
                    ready as u8, self.ready_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn disable(&self) -> Result<(), DriverError> {
        let cc = self.bar.read32(reg::CC);
        if cc & reg::CC_ENABLE != 0 {
            self.bar.write32(reg::CC, cc & !reg::CC_ENABLE);
        }
        self.wait_ready(false, "disabling the controller (CC.EN = 0)")
    }
}

struct VfioTransport {
    registers: Arc<Registers>,
}

impl Transport for VfioTransport {
    fn doorbell(&self, qid: u16, kind: DoorbellKind) -> Doorbell {
        let offset = reg::DOORBELLS + kind.index(qid) * self.registers.doorbell_stride;
        let register = self.registers.bar.register32(offset);
        // SAFETY: `register32` checked the doorbell lies inside the BAR mapping; the mapping is
        // kept alive by `registers`, which the controller (and so every queue pair holding
        // such a doorbell) keeps through this transport; each queue's doorbell is handed to
        // its one queue pair only.
        unsafe { Doorbell::mmio(register) }
    }
}

/// What a `vfio` device is: the driver's own options.
#[derive(Debug, Clone)]
pub struct VfioOptions {
    pub name: String,
    /// The controller's PCI address, e.g. "0000:00:04.0", bound to vfio-pci.
    pub pci: String,
}

pub struct VfioDriver {
    info: DeviceInfo,
    registers: Arc<Registers>,
    controller: Arc<NvmeController>,
    shut_down: AtomicBool,
    // Dropped last: unmaps DMA memory from the IOMMU after the controller is disabled.
    pci: VfioPci,
}

impl VfioDriver {
    /// Opens the controller at `config.pci`, maps `pool` for its DMA, brings it up and asks for
    /// `io_queues` I/O queue pairs (one per reactor).
    pub fn open(config: &VfioOptions, pool: &DmaPool, io_queues: u16) -> Result<Self, DriverError> {
        let name = config.name.clone();
        let address = config.pci.as_str();
        let mut pci = VfioPci::open(address)?;
        pci.enable_bus_master()?;
        pci.map_dma(pool)?;
        let bar = pci.bar0().clone();
        let cap = bar.read64(reg::CAP);
        let setup = |what: String| DriverError::Setup {
            device: name.clone(),
            what: format!("{} ({address}): {what}", "NVMe controller"),
        };
        if cap == u64::MAX {
            return Err(setup(
                "CAP reads as all ones: the device is not responding".into(),
            ));
        }
        if !reg::cap_nvm_command_set(cap) {
            return Err(setup(format!(
                "CAP = {cap:#x} does not offer the NVM command set"
            )));
        }
        if reg::cap_min_page_size(cap) > 4096 {
            return Err(setup(format!(
                "the smallest memory page size is {} bytes (CAP.MPSMIN); this driver uses 4 KiB pages",
                reg::cap_min_page_size(cap)
            )));
        }
        let registers = Arc::new(Registers {
            bar: bar.clone(),
            name: name.clone(),
            doorbell_stride: reg::cap_doorbell_stride(cap),
            ready_timeout: reg::cap_timeout(cap).max(MIN_READY_TIMEOUT),
            max_queue_entries: reg::cap_mqes(cap),
        });
        let last_doorbell = reg::DOORBELLS
            + DoorbellKind::CompletionHead.index(io_queues.max(1)) * registers.doorbell_stride;
        if last_doorbell + 4 > bar.len() {
            return Err(setup(format!(
                "BAR0 maps {} bytes, too few for the doorbells of {io_queues} I/O queues",
                bar.len()
            )));
        }
        registers.disable()?;

        let admin_entries =
            ADMIN_ENTRIES.min(registers.max_queue_entries.min(u16::MAX as u32) as u16);
        let admin_memory =
            QueueMemory::allocate(pool, admin_entries).map_err(|source| DriverError::Dma {
                device: name.clone(),
                source,
            })?;
        let aqa = (admin_entries as u32 - 1) << 16 | (admin_entries as u32 - 1);
        bar.write32(reg::AQA, aqa);
        bar.write64(reg::ASQ, admin_memory.sq.iova());
        bar.write64(reg::ACQ, admin_memory.cq.iova());
        bar.write32(reg::CC, reg::CC_ENTRY_SIZES | reg::CC_ENABLE);
        registers.wait_ready(true, "enabling the controller (CC.EN = 1)")?;
        let version = bar.read32(reg::VS);

        let transport = Arc::new(VfioTransport {
            registers: registers.clone(),
        });
        let admin = QueuePair::new(
            0,
            admin_entries,
            admin_memory,
            transport.doorbell(0, DoorbellKind::SubmissionTail),
            transport.doorbell(0, DoorbellKind::CompletionHead),
        );
        let controller = match NvmeController::attach(
            &name,
            transport,
            pool.clone(),
            admin,
            io_queues.max(1),
            ADMIN_TIMEOUT,
        ) {
            Ok(controller) => controller,
            Err(error) => {
                let _ = registers.disable();
                return Err(error.into());
            }
        };
        let identity = controller.identity();
        tracing::info!(
            "{name}: {address} NVMe {}.{}, CAP.MQES {}, doorbell stride {} B, CAP.TO {:?}",
            version >> 16,
            version >> 8 & 0xff,
            registers.max_queue_entries,
            registers.doorbell_stride,
            registers.ready_timeout
        );
        let info = DeviceInfo {
            name,
            driver: "vfio",
            model: identity.model.clone(),
            serial: identity.serial.clone(),
            namespaces: controller.namespaces().to_vec(),
            max_transfer_bytes: identity
                .max_transfer_bytes
                .unwrap_or(MAX_TRANSFER_BYTES)
                .min(MAX_TRANSFER_BYTES),
        };
        Ok(Self {
            info,
            registers,
            controller: Arc::new(controller),
            shut_down: AtomicBool::new(false),
            pci,
        })
    }

    pub fn pci_address(&self) -> &str {
        self.pci.address()
    }
}

impl Driver for VfioDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn create_queue(&self, depth: u16) -> Result<Box<dyn IoQueue>, DriverError> {
        let entries = depth as u32 + 1;
        if entries > self.registers.max_queue_entries {
            return Err(self.registers.error(format!(
                "queue depth {depth} needs {entries} queue entries; the controller allows {} (CAP.MQES)",
                self.registers.max_queue_entries
            )));
        }
        let qp = self.controller.create_io_queue_pair(entries as u16)?;
        Ok(Box::new(VfioQueue {
            qp: OwnedQueuePair::new(qp, self.controller.clone()),
            registers: self.registers.clone(),
            empty_polls: 0,
            stalled_since: None,
            reported: false,
        }))
    }

    /// The normal shutdown notification: the controller finishes what it has, makes written
    /// data durable, and reports CSTS.SHST = complete.
    fn shutdown(&self) -> Result<(), DriverError> {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let bar = &self.registers.bar;
        let cc = bar.read32(reg::CC);
        bar.write32(
            reg::CC,
            (cc & !reg::CC_SHUTDOWN_MASK) | reg::CC_SHUTDOWN_NORMAL,
        );
        let started = Instant::now();
        loop {
            let csts = self.registers.status();
            if csts & reg::CSTS_SHUTDOWN_MASK == reg::CSTS_SHUTDOWN_COMPLETE {
                return Ok(());
            }
            if csts == u32::MAX || csts & reg::CSTS_FATAL != 0 {
                return Err(self.registers.error(format!(
                    "shutdown (CC.SHN): the controller failed (CSTS = {csts:#x})"
                )));
            }
            if started.elapsed() > SHUTDOWN_TIMEOUT {
                return Err(self.registers.error(format!(
                    "shutdown (CC.SHN): CSTS.SHST did not report completion within {SHUTDOWN_TIMEOUT:?} (CSTS = {csts:#x})"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for VfioDriver {
    fn drop(&mut self) {
        // Stop the controller's DMA before the IOMMU mapping and the memory behind it go.
        if let Err(error) = self.registers.disable() {
            tracing::warn!("{error}");
        }
    }
}

/// A reactor's I/O queue pair on the controller.
struct VfioQueue {
    qp: OwnedQueuePair,
    registers: Arc<Registers>,
    /// Polls that found nothing while commands were outstanding, since the last completion.
    empty_polls: u32,
    stalled_since: Option<Instant>,
    reported: bool,
}

impl VfioQueue {
    /// Called every [`STALL_CHECK_POLLS`] empty polls with commands outstanding: reports a
    /// controller that failed or a queue that stopped completing.
    #[cold]
    fn check_stall(&mut self) {
        let now = Instant::now();
        let since = *self.stalled_since.get_or_insert(now);
        if self.reported {
            return;
        }
        let csts = self.registers.status();
        let qp = self.qp.get_ref();
        let (qid, outstanding) = (qp.qid(), qp.outstanding());
        if csts == u32::MAX || csts & reg::CSTS_FATAL != 0 {
            tracing::error!(
                "{}: I/O queue {qid}: controller failed (CSTS = {csts:#x}) with {outstanding} commands outstanding; they will not complete",
                self.registers.name
            );
            self.reported = true;
        } else if now.duration_since(since) > IO_STALL_REPORT {
            tracing::error!(
                "{}: I/O queue {qid}: {outstanding} commands outstanding and none completed for {:?} (CSTS = {csts:#x}): the controller is not answering",
                self.registers.name,
                now.duration_since(since)
            );
            self.reported = true;
        }
    }
}

impl IoQueue for VfioQueue {
    #[inline]
    fn submit(&mut self, command: &IoCommand, cookie: u32) -> Result<(), QueueFull> {
        let entry = command.nvme_entry();
        self.qp.get().submit(entry, command.data, cookie).map(drop)
    }

    #[inline]
    fn ring(&mut self) {
        self.qp.get().ring();
    }

    #[inline]
    fn reap(&mut self, out: &mut [Completed]) -> usize {
        let reaped = self.qp.get().reap(out);
        if reaped > 0 {
            if self.stalled_since.is_some() {
                self.stalled_since = None;
                self.reported = false;
            }
            self.empty_polls = 0;
        } else if self.qp.get().outstanding() > 0 {
            self.empty_polls = self.empty_polls.wrapping_add(1);
            if self.empty_polls.is_multiple_of(STALL_CHECK_POLLS) {
                self.check_stall();
            }
        }
        reaped
    }

    #[inline]
    fn outstanding(&self) -> usize {
        self.qp.get_ref().outstanding()
    }

    fn capacity(&self) -> usize {
        self.qp.get_ref().capacity()
    }
}
