//! The `uring` driver: io_uring on a file or block device opened with O_DIRECT, for hosts
//! without VFIO and as the kernel-path baseline.
//!
//! Each reactor gets a ring of its own. The device is a registered (fixed) file and the whole
//! DMA pool is registered as fixed buffers, so the kernel neither looks up the file nor pins
//! pages per IO. Submissions are written into the ring and published with one
//! `io_uring_enter` per doorbell round (none with SQPOLL, where a kernel thread polls);
//! completions are reaped from the shared completion ring without a system call.
//!
//! The device appears as one namespace (nsid 1) of `size / block_size` blocks. Kernel errors
//! become NVMe statuses, so the engine reports them as it reports a controller's.
//!
//! An NVMe generic character device (`/dev/ngXnY`) is driven by NVMe passthrough instead
//! (`passthru.rs`): NVMe commands as io_uring commands, its namespace's size and block size
//! from Identify.

mod passthru;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{DeviceInfo, Driver, DriverError, IoCommand, IoFlags, IoQueue, Op};
use fathom_dma::DmaPool;
use fathom_nvme::{Completed, Namespace, QueueFull, Status, MAX_TRANSFER_BYTES};

/// io_uring registers at most 1 GiB per fixed buffer: the pool is registered in such chunks.
const FIXED_BUFFER_BYTES: usize = 1 << 30;
/// The kernel polling thread sleeps after this long without submissions (SQPOLL).
const SQPOLL_IDLE_MS: u32 = 1000;

/// What a `uring` device is: the driver's own options.
#[derive(Debug, Clone)]
pub struct UringOptions {
    pub name: String,
    /// A file, a block device, or an NVMe generic character device (`/dev/ngXnY`, passthrough).
    pub path: PathBuf,
    /// Bytes to use; a missing file is created at this size. Default: all of it.
    pub size: Option<u64>,
    pub block_size: u32,
    /// A kernel thread polls the submission queue.
    pub sqpoll: bool,
    /// Completions are polled from the device instead of interrupt driven.
    pub iopoll: bool,
}

pub struct UringDriver {
    info: DeviceInfo,
    file: File,
    path: PathBuf,
    pool: DmaPool,
    sqpoll: bool,
    iopoll: bool,
    /// NVMe passthrough on a generic character device: the namespace's identifier.
    passthru_nsid: Option<u32>,
}

fn setup(device: &str, what: String) -> DriverError {
    DriverError::Setup {
        device: device.into(),
        what,
    }
}

impl UringDriver {
    /// Opens the file or block device with O_DIRECT (creating a missing file at the
    /// configured size) and checks with one read that O_DIRECT, the block size and (if asked)
    /// polled IO work on it.
    pub fn open(config: &UringOptions, pool: &DmaPool) -> Result<Self, DriverError> {
        let name = config.name.as_str();
        let path = config.path.clone();
        let media_error = |what: String| {
            move |source| DriverError::Media {
                device: name.into(),
                what,
                source,
            }
        };
        if std::fs::metadata(&path).is_ok_and(|metadata| metadata.file_type().is_char_device()) {
            return Self::open_passthru(config, path, pool);
        }
        let exists = path.exists();
        if !exists && config.size.is_none() {
            return Err(setup(
                name,
                format!(
                    "{} does not exist; give device.size to create it",
                    path.display()
                ),
            ));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!exists)
            .truncate(false)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(media_error(format!(
                "could not open {} with O_DIRECT",
                path.display()
            )))?;
        let metadata = file
            .metadata()
            .map_err(media_error(format!("could not stat {}", path.display())))?;
        let block_device = metadata.file_type().is_block_device();
        let mut size = if block_device {
            file.seek(SeekFrom::End(0))
                .map_err(media_error(format!("could not size {}", path.display())))?
        } else {
            metadata.len()
        };
        if let Some(wanted) = config.size {
            if size < wanted {
                if block_device {
                    return Err(setup(
                        name,
                        format!(
                            "{} holds {size} bytes, less than device.size {}",
                            path.display(),
                            wanted
                        ),
                    ));
                }
                file.set_len(wanted).map_err(media_error(format!(
                    "could not extend {} to {} bytes",
                    path.display(),
                    wanted
                )))?;
            }
            size = wanted;
        }
        let block_size = config.block_size;
        let blocks = size / block_size as u64;
        if blocks == 0 {
            return Err(setup(
                name,
                format!(
                    "{} is smaller than one {block_size}-byte block",
                    path.display()
                ),
            ));
        }
        let driver = Self {
            info: device_info(
                name,
                if block_device {
                    format!("block device {}", path.display())
                } else {
                    format!("file {}", path.display())
                },
                block_size,
                blocks,
            ),
            file,
            path,
            pool: pool.clone(),
            sqpoll: config.sqpoll,
            iopoll: config.iopoll,
            passthru_nsid: None,
        };
        driver.probe()?;
        Ok(driver)
    }

    /// Opens an NVMe generic character device for passthrough: the namespace's geometry comes
    /// from Identify Namespace, and one read through a ring checks the kernel takes the
    /// commands.
    fn open_passthru(
        config: &UringOptions,
        path: PathBuf,
        pool: &DmaPool,
    ) -> Result<Self, DriverError> {
        let name = config.name.as_str();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| DriverError::Media {
                device: name.into(),
                what: format!("could not open the NVMe generic device {}", path.display()),
                source,
            })?;
        let namespace = passthru::identify(&file)
            .map_err(|what| setup(name, format!("{}: {what}", path.display())))?;
        let mut blocks = namespace.blocks;
        if let Some(wanted) = config.size {
            let have = blocks * namespace.block_size as u64;
            if wanted > have {
                return Err(setup(
                    name,
                    format!(
                        "{} (namespace {}) holds {have} bytes, less than device.size {}",
                        path.display(),
                        namespace.nsid,
                        wanted
                    ),
                ));
            }
            blocks = wanted / namespace.block_size as u64;
        }
        let driver = Self {
            info: device_info(
                name,
                format!(
                    "NVMe passthrough {} (namespace {})",
                    path.display(),
                    namespace.nsid
                ),
                namespace.block_size,
                blocks,
            ),
            file,
            path,
            pool: pool.clone(),
            sqpoll: config.sqpoll,
            iopoll: config.iopoll,
            passthru_nsid: Some(namespace.nsid),
        };
        driver.probe()?;
        Ok(driver)
    }

    /// Reads the first block through a ring configured as the reactors' will be.
    fn probe(&self) -> Result<(), DriverError> {
        let mut queue = self.any_queue(4)?;
        let buf = self
            .pool
            .alloc(self.info.namespaces[0].block_size as usize)
            .map_err(|source| DriverError::Dma {
                device: self.info.name.clone(),
                source,
            })?;
        let command = IoCommand {
            op: Op::Read,
            nsid: 1,
            slba: 0,
            blocks: 1,
            data: Some(fathom_nvme::DataRange::of(&buf)),
            flags: IoFlags::NONE,
        };
        queue.submit(&command, 0).expect("an empty queue has room");
        queue.ring();
        let mut out = [Completed::default()];
        let started = std::time::Instant::now();
        while queue.reap(&mut out) == 0 {
            if started.elapsed() > std::time::Duration::from_secs(5) {
                return Err(setup(
                    &self.info.name,
                    format!(
                        "a probe read of {} did not complete in 5 s",
                        self.path.display()
                    ),
                ));
            }
            std::hint::spin_loop();
        }
        let errno = match &queue {
            AnyQueue::Plain(queue) => queue.last_errno,
            AnyQueue::Passthru(queue) => queue.last_errno,
        };
        if let (Some(nsid), false) = (self.passthru_nsid, out[0].status.is_success()) {
            let why = match errno {
                0 => format!("NVMe status {}", out[0].status),
                libc::EOPNOTSUPP | libc::EINVAL => {
                    "the kernel does not take NVMe commands through io_uring here (Linux 5.19 or later is needed)".to_string()
                }
                errno => std::io::Error::from_raw_os_error(errno).to_string(),
            };
            return Err(setup(
                &self.info.name,
                format!(
                    "a probe read of {} (namespace {nsid}) through NVMe passthrough failed: {why}",
                    self.path.display()
                ),
            ));
        }
        match errno {
            0 => Ok(()),
            libc::EINVAL => Err(setup(
                &self.info.name,
                format!(
                    "O_DIRECT reads of {} bytes are refused by {} (EINVAL): its logical block size is larger; set block_size = 4096",
                    self.info.namespaces[0].block_size,
                    self.path.display()
                ),
            )),
            libc::EOPNOTSUPP if self.iopoll => Err(setup(
                &self.info.name,
                format!(
                    "iopoll: {} does not support polled IO (NVMe block devices need nvme.poll_queues > 0); set iopoll = false",
                    self.path.display()
                ),
            )),
            errno => Err(DriverError::Media {
                device: self.info.name.clone(),
                what: format!("a probe read of {} failed", self.path.display()),
                source: std::io::Error::from_raw_os_error(errno),
            }),
        }
    }

    /// A queue of the kind this device takes: plain reads and writes, or NVMe passthrough.
    fn any_queue(&self, depth: u16) -> Result<AnyQueue, DriverError> {
        let capacity = depth.max(1) as usize;
        Ok(match self.passthru_nsid {
            None => {
                let ring = self.ring(depth)?;
                let (base, _) = self.pool.host_range();
                AnyQueue::Plain(UringQueue {
                    ring,
                    capacity,
                    outstanding: 0,
                    pool_base: base as u64,
                    block_shift: self.info.namespaces[0].block_size.trailing_zeros(),
                    iopoll: self.iopoll,
                    last_errno: 0,
                    _pool: self.pool.clone(),
                })
            }
            Some(nsid) => AnyQueue::Passthru(passthru::PassthruQueue {
                ring: self.ring(depth)?,
                capacity,
                outstanding: 0,
                nsid,
                iopoll: self.iopoll,
                last_errno: 0,
                _pool: self.pool.clone(),
            }),
        })
    }

    /// A ring set up as every queue of this driver is: registered file and buffers, cooperative
    /// task running, SQPOLL and IOPOLL as configured; 128/32-byte entries for passthrough.
    fn ring<S: io_uring::squeue::EntryMarker, C: io_uring::cqueue::EntryMarker>(
        &self,
        depth: u16,
    ) -> Result<IoUring<S, C>, DriverError> {
        let name = &self.info.name;
        let entries = (depth as u32).next_power_of_two().max(2);
        let mut builder = IoUring::<S, C>::builder();
        // A reactor spins in user space: have the kernel raise a flag when completions wait
        // for task work, instead of interrupting the reactor for each (TWA_SIGNAL).
        builder.setup_coop_taskrun().setup_taskrun_flag();
        if self.sqpoll {
            builder.setup_sqpoll(SQPOLL_IDLE_MS);
        }
        if self.iopoll {
            builder.setup_iopoll();
        }
        let ring = builder.build(entries).map_err(|source| {
            let hint = if self.sqpoll {
                " (sqpoll needs root or CAP_SYS_NICE)"
            } else {
                ""
            };
            DriverError::Media {
                device: name.clone(),
                what: format!("could not create an io_uring of {entries} entries{hint}"),
                source,
            }
        })?;
        ring.submitter()
            .register_files(&[self.file.as_raw_fd()])
            .map_err(|source| DriverError::Media {
                device: name.clone(),
                what: "could not register the file with io_uring".into(),
                source,
            })?;
        let (base, len) = self.pool.host_range();
        let iovecs: Vec<libc::iovec> = (0..len)
            .step_by(FIXED_BUFFER_BYTES)
            .map(|offset| libc::iovec {
                // SAFETY: offset < len, inside the pool mapping.
                iov_base: unsafe { base.add(offset) }.cast(),
                iov_len: FIXED_BUFFER_BYTES.min(len - offset),
            })
            .collect();
        // SAFETY: the buffers are the DMA pool's mapping, which this driver keeps alive (it
        // holds the pool) for as long as any of its rings exists.
        unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|source| DriverError::Media {
            device: name.clone(),
            what: "could not register the DMA pool as io_uring fixed buffers (raise the memlock limit: ulimit -l)".into(),
            source,
        })?;
        Ok(ring)
    }
}

/// One reactor's ring on the device, of either kind.
enum AnyQueue {
    Plain(UringQueue),
    Passthru(passthru::PassthruQueue),
}

impl std::ops::Deref for AnyQueue {
    type Target = dyn IoQueue;
    fn deref(&self) -> &Self::Target {
        match self {
            AnyQueue::Plain(queue) => queue,
            AnyQueue::Passthru(queue) => queue,
        }
    }
}

impl std::ops::DerefMut for AnyQueue {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            AnyQueue::Plain(queue) => queue,
            AnyQueue::Passthru(queue) => queue,
        }
    }
}

impl Driver for UringDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn create_queue(&self, depth: u16) -> Result<Box<dyn IoQueue>, DriverError> {
        Ok(match self.any_queue(depth)? {
            AnyQueue::Plain(queue) => Box::new(queue),
            AnyQueue::Passthru(queue) => Box::new(queue),
        })
    }

    fn shutdown(&self) -> Result<(), DriverError> {
        if self.passthru_nsid.is_some() {
            // The engine has flushed every volume with NVMe Flush commands through the rings;
            // the controller stays with the kernel, which shuts it down.
            return Ok(());
        }
        self.file.sync_data().map_err(|source| DriverError::Media {
            device: self.info.name.clone(),
            what: format!("syncing {} at shutdown", self.path.display()),
            source,
        })
    }
}

struct UringQueue {
    ring: IoUring,
    capacity: usize,
    outstanding: usize,
    pool_base: u64,
    block_shift: u32,
    iopoll: bool,
    /// The errno of the last failed command (for the open-time probe's diagnosis).
    last_errno: i32,
    /// Registered buffers point into the pool: keep it mapped while the ring exists.
    _pool: DmaPool,
}

/// user_data: the engine's cookie (bits 0..32), the expected length (32..62), the op (62..64).
fn user_data(cookie: u32, len: usize, op: Op) -> u64 {
    let op = match op {
        Op::Read => 0u64,
        Op::Write => 1,
        Op::Flush => 2,
        Op::WriteZeroes => 3,
    };
    cookie as u64 | (len as u64 & 0x3fff_ffff) << 32 | op << 62
}

fn status_of(result: i32, expected: u64, op: u64) -> Status {
    if result >= 0 {
        // Read and write must move every byte; a short transfer means the file ended early.
        return if op <= 1 && (result as u64) < expected {
            Status::DATA_TRANSFER_ERROR
        } else {
            Status::SUCCESS
        };
    }
    match -result {
        libc::EIO | libc::ENODATA | libc::EILSEQ if op == 0 => Status::UNRECOVERED_READ_ERROR,
        libc::EIO | libc::ENODATA | libc::EILSEQ => Status::WRITE_FAULT,
        libc::EINVAL => Status::INVALID_FIELD,
        libc::EOPNOTSUPP => Status::INVALID_OPCODE,
        libc::ENOSPC => Status::generic(0x81), // Capacity Exceeded
        _ => Status::INTERNAL_ERROR,
    }
}

impl IoQueue for UringQueue {
    #[inline]
    fn submit(&mut self, command: &IoCommand, cookie: u32) -> Result<(), QueueFull> {
        if self.outstanding == self.capacity {
            return Err(QueueFull);
        }
        let fd = types::Fixed(0);
        let offset = command.slba << self.block_shift;
        let entry = match (command.op, command.data) {
            (Op::Read, Some(data)) | (Op::Write, Some(data)) => {
                let buf_index = ((data.addr - self.pool_base) / FIXED_BUFFER_BYTES as u64) as u16;
                let entry = if command.op == Op::Read {
                    opcode::ReadFixed::new(fd, data.addr as *mut u8, data.len as u32, buf_index)
                        .offset(offset)
                        .build()
                } else {
                    let flags = if command.flags.contains(IoFlags::FUA) {
                        libc::RWF_DSYNC
                    } else {
                        0
                    };
                    opcode::WriteFixed::new(fd, data.addr as *const u8, data.len as u32, buf_index)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                };
                entry.user_data(user_data(cookie, data.len, command.op))
            }
            (Op::Flush, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(user_data(cookie, 0, Op::Flush)),
            (Op::WriteZeroes, _) => {
                let len = (command.blocks as u64) << self.block_shift;
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
                    .user_data(user_data(cookie, 0, Op::WriteZeroes))
            }
            // The engine always gives reads and writes a buffer.
            (Op::Read | Op::Write, None) => return Err(QueueFull),
        };
        // SAFETY: the buffer the entry points at is a registered part of the DMA pool and is
        // owned by the engine until this command's completion is reaped.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| QueueFull)?;
        self.outstanding += 1;
        Ok(())
    }

    #[inline]
    fn ring(&mut self) {
        submit_queued(&mut self.ring);
    }

    #[inline]
    fn reap(&mut self, out: &mut [Completed]) -> usize {
        surface_completions(&mut self.ring, self.outstanding, self.iopoll);
        let mut reaped = 0;
        for cqe in self.ring.completion().take(out.len()) {
            let data = cqe.user_data();
            let result = cqe.result();
            if result < 0 {
                self.last_errno = -result;
            }
            out[reaped] = Completed {
                cookie: data as u32,
                status: status_of(result, (data >> 32) & 0x3fff_ffff, data >> 62),
                result: 0,
            };
            reaped += 1;
        }
        self.outstanding -= reaped;
        reaped
    }

    fn outstanding(&self) -> usize {
        self.outstanding
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn wait(&mut self, timeout: std::time::Duration) -> bool {
        wait_for_completion(&mut self.ring, self.outstanding, timeout)
    }
}

/// Publishes a ring's queued submissions with one system call for the batch (with SQPOLL,
/// only when the kernel thread sleeps). EAGAIN/EBUSY leave the entries queued: the next
/// doorbell round retries them.
#[inline]
fn submit_queued<S: squeue::EntryMarker, C: cqueue::EntryMarker>(ring: &mut IoUring<S, C>) {
    if ring.submission().is_empty() {
        return;
    }
    if let Err(error) = ring.submit() {
        if !matches!(
            error.raw_os_error(),
            Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::EINTR)
        ) {
            tracing::error!("io_uring submit failed: {error}");
        }
    }
}

/// Makes finished commands appear in the completion ring: polled completions (IOPOLL) are only
/// found when asked for, and completions waiting for task work are posted by one enter.
#[inline]
fn surface_completions<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
    ring: &mut IoUring<S, C>,
    outstanding: usize,
    iopoll: bool,
) {
    if iopoll && outstanding > 0 {
        let _ = ring.submit_and_wait(0);
    } else if outstanding > 0 && ring.completion().is_empty() && ring.submission().taskrun() {
        let _ = ring.submit();
    }
}

/// Sleeps in the kernel up to `timeout` until a completion arrives (for adaptive polling).
fn wait_for_completion<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
    ring: &mut IoUring<S, C>,
    outstanding: usize,
    timeout: std::time::Duration,
) -> bool {
    if outstanding == 0 || !ring.completion().is_empty() {
        return true;
    }
    let timespec = types::Timespec::from(timeout);
    let args = types::SubmitArgs::new().timespec(&timespec);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => true,
        Err(error) => matches!(error.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)),
    }
}

/// What the engine knows of a device this driver opened: one namespace, numbered 1.
fn device_info(name: &str, model: String, block_size: u32, blocks: u64) -> DeviceInfo {
    DeviceInfo {
        name: name.into(),
        driver: "uring",
        model,
        serial: format!("uring-{name}"),
        namespaces: vec![Namespace {
            nsid: 1,
            block_size,
            blocks,
        }],
        max_transfer_bytes: MAX_TRANSFER_BYTES.min(1 << 20),
    }
}
