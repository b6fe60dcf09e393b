//! The `mem` driver: an in-process NVMe controller with `null`, `ram` or `file` media.
//!
//! The host side is the same as for hardware: [`NvmeController`] brings the controller up
//! through its admin queue (Identify, Set Features, Create I/O queues) and each reactor drives
//! its own [`QueuePair`]. What differs is who runs the controller:
//! - `inline`: the reactor that owns a queue runs the controller's side of it right after
//!   ringing the doorbell, inside its poll loop: the near-zero-latency loopback stub;
//! - `thread`: a device thread polls every queue's doorbells and completes asynchronously,
//!   as hardware does.

pub mod device;
pub mod media;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fathom_telemetry::Clock;
use parking_lot::Mutex;

use self::device::{DeviceQueue, DeviceShared, MemDevice};
use self::media::Media;
use super::{DeviceInfo, Driver, DriverError, IoCommand, IoQueue};
use crate::inject::Injector;
use fathom_dma::DmaPool;
use fathom_nvme::{
    Completed, Doorbell, DoorbellKind, NvmeController, OwnedQueuePair, QueueFull, QueueMemory,
    QueuePair, Transport, MAX_TRANSFER_BYTES,
};
use serde::Deserialize;

const ADMIN_ENTRIES: u16 = 32;
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

struct MemTransport(Arc<MemDevice>);

impl Transport for MemTransport {
    fn doorbell(&self, qid: u16, kind: DoorbellKind) -> Doorbell {
        Doorbell::memory(self.0.doorbells().clone(), qid, kind)
    }

    fn service_admin(&self) {
        self.0.process_admin();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    /// No data is stored or copied (SPDK's null bdev): measures software cost only.
    Null,
    /// Anonymous memory, lost when the node stops.
    Ram,
    /// A sparse file under the data directory, persisted across restarts.
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceMode {
    /// The controller runs inside each reactor's poll loop: the near-zero-latency stub.
    Inline,
    /// The controller runs on a device thread of its own, asynchronous as hardware is.
    Thread,
}

/// What a `mem` device is made of: the driver's own options, filled in by whoever configures
/// it (the node's `[[device]]` table).
#[derive(Debug, Clone)]
pub struct MemOptions {
    pub name: String,
    pub media: MediaKind,
    pub mode: DeviceMode,
    /// Bytes in the one namespace.
    pub size: u64,
    pub block_size: u32,
    /// `file` media: the backing file (created sparse at `size` when missing).
    pub path: PathBuf,
    /// Latency and error injection rules, applied in order.
    pub inject: Vec<crate::inject::InjectRule>,
}

pub struct MemDriver {
    info: DeviceInfo,
    mode: DeviceMode,
    device: Arc<MemDevice>,
    controller: Arc<NvmeController>,
    device_thread: Mutex<Option<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

impl MemDriver {
    /// Opens the media, brings the controller up through its admin queue, and in `thread`
    /// mode starts the device thread. `io_queues` is the number of reactors.
    pub fn open(
        config: &MemOptions,
        pool: &DmaPool,
        clock: Clock,
        io_queues: u16,
    ) -> Result<Self, DriverError> {
        let name = config.name.clone();
        let size = config.size;
        let media = match config.media {
            MediaKind::Null => Media::null(size),
            MediaKind::Ram => Media::ram(size).map_err(|source| DriverError::Media {
                device: name.clone(),
                what: format!("could not map {size} bytes of ram media"),
                source,
            })?,
            MediaKind::File => {
                let path = &config.path;
                Media::file(path, size).map_err(|source| DriverError::Media {
                    device: name.clone(),
                    what: format!("could not open or map media file {} ({size} bytes); check node.data_dir and device.path", path.display()),
                    source,
                })?
            }
        };
        let shared = Arc::new(DeviceShared {
            media,
            iova: pool.iova_map(),
            block_shift: config.block_size.trailing_zeros(),
            namespace_blocks: size / config.block_size as u64,
            injector: Injector::new(&config.inject, &clock),
            runtime: Default::default(),
            clock,
            model: "Fathom mem NVMe".to_string(),
            serial: format!("FTHM-{name}"),
            max_io_queues: io_queues.max(1) + 1,
            internal_errors: AtomicU64::new(0),
            deferred_commands: AtomicUsize::new(0),
            held: DeviceShared::queue_flags(io_queues.max(1) + 1),
        });
        let device = Arc::new(MemDevice::new(shared));
        let controller = start_controller(&name, &device, pool, io_queues.max(1), ADMIN_TIMEOUT)?;
        let identity = controller.identity();
        let info = DeviceInfo {
            name: name.clone(),
            driver: "mem",
            model: identity.model.clone(),
            serial: identity.serial.clone(),
            namespaces: controller.namespaces().to_vec(),
            max_transfer_bytes: identity
                .max_transfer_bytes
                .unwrap_or(MAX_TRANSFER_BYTES)
                .min(MAX_TRANSFER_BYTES),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let device_thread = if config.mode == DeviceMode::Thread {
            let (device, stop) = (device.clone(), stop.clone());
            let handle = std::thread::Builder::new()
                .name(format!("dev-{name}"))
                .spawn(move || run_device_thread(&device, &stop))
                .map_err(|source| DriverError::Media {
                    device: name.clone(),
                    what: "could not start the device thread".into(),
                    source,
                })?;
            Some(handle)
        } else {
            None
        };
        Ok(Self {
            info,
            mode: config.mode,
            device,
            controller: Arc::new(controller),
            device_thread: Mutex::new(device_thread),
            stop,
        })
    }

    pub fn mode(&self) -> DeviceMode {
        self.mode
    }

    /// Commands the controller failed internally (media flush failures, host faults).
    pub fn internal_errors(&self) -> u64 {
        self.device.shared().internal_errors.load(Ordering::Relaxed)
    }

    /// Commands the controller has fetched and not completed yet (held back by injected
    /// latency, or waiting for room in a completion queue), over all its I/O queues: for
    /// tests and diagnostics.
    pub fn deferred_commands(&self) -> usize {
        self.device
            .shared()
            .deferred_commands
            .load(Ordering::Relaxed)
    }
}

impl Driver for MemDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn set_inject(
        &self,
        at: crate::InjectAt,
        rules: &[crate::inject::InjectRule],
    ) -> Result<(), String> {
        let shared = self.device.shared();
        let current = shared.runtime.current();
        let injector = Injector::new(rules, &shared.clock);
        let (device, media) = match at {
            crate::InjectAt::Device => (injector, current.media.clone()),
            crate::InjectAt::Media => (current.device.clone(), injector),
        };
        shared
            .runtime
            .replace(device::RuntimeRules { device, media });
        Ok(())
    }

    fn null_media(&self) -> bool {
        true
    }

    fn create_queue(&self, depth: u16) -> Result<Box<dyn IoQueue>, DriverError> {
        let entries = depth.checked_add(1).ok_or_else(|| DriverError::Setup {
            device: self.info.name.clone(),
            what: format!("queue depth {depth} is too large"),
        })?;
        let qp = self.controller.create_io_queue_pair(entries)?;
        let inline = match self.mode {
            DeviceMode::Inline => {
                Some(
                    self.device
                        .take_queue(qp.qid())
                        .ok_or_else(|| DriverError::Setup {
                            device: self.info.name.clone(),
                            what: format!(
                                "queue {} was created but the controller did not hand it over",
                                qp.qid()
                            ),
                        })?,
                )
            }
            DeviceMode::Thread => None,
        };
        Ok(Box::new(MemQueue {
            qp: OwnedQueuePair::new(qp, self.controller.clone()),
            inline,
        }))
    }

    fn shutdown(&self) -> Result<(), DriverError> {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.device_thread.lock().take() {
            let _ = handle.join();
        }
        // What CC.SHN asks of a controller: everything written becomes durable.
        self.device
            .shared()
            .media
            .flush()
            .map_err(|source| DriverError::Media {
                device: self.info.name.clone(),
                what: "flushing media at shutdown".into(),
                source,
            })
    }
}

impl Drop for MemDriver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.device_thread.lock().take() {
            let _ = handle.join();
        }
    }
}

/// Enables the controller's admin queue and brings the host driver up through it (Identify,
/// Set Features), with `timeout` for each admin command.
fn start_controller(
    name: &str,
    device: &Arc<MemDevice>,
    pool: &DmaPool,
    io_queues: u16,
    timeout: Duration,
) -> Result<NvmeController, DriverError> {
    let admin_memory =
        QueueMemory::allocate(pool, ADMIN_ENTRIES).map_err(|source| DriverError::Dma {
            device: name.to_string(),
            source,
        })?;
    device
        .enable(
            admin_memory.sq.iova(),
            admin_memory.cq.iova(),
            ADMIN_ENTRIES as u32,
        )
        .map_err(|status| DriverError::Setup {
            device: name.to_string(),
            what: format!("enabling the admin queue: {status}"),
        })?;
    let transport = Arc::new(MemTransport(device.clone()));
    let admin = QueuePair::new(
        0,
        ADMIN_ENTRIES,
        admin_memory,
        transport.doorbell(0, DoorbellKind::SubmissionTail),
        transport.doorbell(0, DoorbellKind::CompletionHead),
    );
    Ok(NvmeController::attach(
        name,
        transport,
        pool.clone(),
        admin,
        io_queues,
        timeout,
    )?)
}

/// The device thread of `thread` mode: polls every I/O queue it holds, adopts new queues when
/// the controller's generation changes, and drops deleted ones. Idle, it backs off to short
/// sleeps, as a device's interrupt coalescing would delay completions.
fn run_device_thread(device: &MemDevice, stop: &AtomicBool) {
    let mut queues: Vec<DeviceQueue> = Vec::new();
    let mut generation = u64::MAX;
    let mut idle_since: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        let current = device.generation();
        if current != generation {
            generation = current;
            queues.retain(|queue| device.queue_alive(queue.qid()));
            device.take_ready_queues(&mut queues);
        }
        let mut work = 0;
        let mut waiting = 0;
        for queue in queues.iter_mut() {
            work += queue.process();
            waiting += queue.deferred();
        }
        if work > 0 || waiting > 0 {
            idle_since = None;
        } else {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_micros(100) {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// A reactor's queue on a `mem` device: the host queue pair and, inline, the controller's
/// side of it.
struct MemQueue {
    qp: OwnedQueuePair,
    inline: Option<DeviceQueue>,
}

impl IoQueue for MemQueue {
    #[inline]
    fn submit(&mut self, command: &IoCommand, cookie: u32) -> Result<(), QueueFull> {
        let entry = command.nvme_entry();
        self.qp.get().submit(entry, command.data, cookie).map(drop)
    }

    #[inline]
    fn ring(&mut self) {
        if self.qp.get().ring() {
            if let Some(device) = self.inline.as_mut() {
                device.process();
            }
        }
    }

    #[inline]
    fn reap(&mut self, out: &mut [Completed]) -> usize {
        if let Some(device) = self.inline.as_mut() {
            if device.deferred() > 0 {
                device.process();
            }
        }
        self.qp.get().reap(out)
    }

    #[inline]
    fn outstanding(&self) -> usize {
        self.qp.get_ref().outstanding()
    }

    fn capacity(&self) -> usize {
        self.qp.get_ref().capacity()
    }
}

impl Drop for MemQueue {
    fn drop(&mut self) {
        // The controller's side of an inline queue goes first; the queue pair (a field) is
        // deleted from the controller after this.
        self.inline = None;
    }
}
