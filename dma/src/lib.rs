//! DMA memory: the buffers and queue rings a controller reads and writes.
//!
//! One [`DmaPool`] is carved out at start-up from 2 MiB hugepages (`MAP_HUGETLB`), or from
//! normal pages only when the configuration says so explicitly: there is no silent fallback.
//! Allocation happens at start-up and when a client sets up its buffers, never per IO.
//!
//! Every allocation has an IO virtual address (IOVA): the address a controller is given in PRP
//! entries and queue base registers. For the in-process `mem` controller the IOVA is the
//! virtual address itself and [`IovaMap`] plays the IOMMU: it refuses any address outside a
//! registered pool, so a bad PRP becomes an NVMe error instead of a wild write. For VFIO the
//! same pool is mapped into the device's IOMMU domain at [`VFIO_IOVA_BASE`], because the IOMMU
//! translates fewer address bits than a process's virtual addresses have.
//!
//! # Who may touch DMA memory, and when
//!
//! A controller reads and writes DMA memory on its own, outside the compiler's view, so a
//! `&[u8]` or `&mut [u8]` over memory a controller may access at the same time would be
//! unsound. Rather than copying every payload through volatile accesses (the payload slices,
//! [`DmaBuf::as_bytes`] and [`DmaBuf::as_bytes_mut`], are on the NBD and workload hot paths),
//! Fathom keeps the two apart by ownership:
//!
//! 1. **A buffer goes to a device only by value.** From the moment its address is given to a
//!    device until the device is done with it, the [`DmaBuf`] is owned by whatever tracks the
//!    command, not by the code that filled it: no borrow of it can exist while the device may
//!    touch it.
//! 2. **An abandoned buffer never comes back.** A buffer whose command was given up (timed
//!    out, or its queue not confirmed deleted) is never handed back to safe code, nor freed
//!    into the pool: it is quarantined (kept, in effect leaked), because the device may still
//!    write it.
//!
//! So holding a `DmaBuf`, or a borrow of one, means no device accesses it; that is what the
//! slices and the copies ([`DmaBuf::write_at`], [`DmaBuf::read_at`]) rely on. Rings and PRP
//! lists, which a device uses for as long as their queue exists, are reached only through raw
//! volatile and atomic accesses by the queue pair that owns them.
//!
//! Where an address is given to a device, and what keeps the rule there:
//! - I/O commands (`fathom_nvme::DataRange::of`, PRPs or io_uring addresses): the engine's
//!   `IoRequest` owns its buffer and moves it into the command's IO slot as the command is
//!   queued, before the doorbell; the buffer comes back only inside the `IoCompletion`, after
//!   the completion was reaped. A rejected request was never queued.
//! - NVMe admin commands (`fathom_nvme::NvmeController`): Identify takes its buffer by value
//!   and gets it back with the completion; on a timeout the controller quarantines it. Queue
//!   rings named in Create I/O Completion/Submission Queue belong to the `QueuePair`, which
//!   never lends them out; a queue whose creation timed out or whose deletion was not
//!   confirmed has its rings quarantined.
//! - The admin queue registers (ASQ/ACQ) in the `vfio` and `mem` drivers: the ring memory
//!   moves into the admin `QueuePair` right after, and a controller dropped with an admin
//!   command unanswered leaks it.
//! - The `uring` driver's start-up probe read owns its buffer while it waits for the read.
//!
//! Not yet covered: the `uring` probe frees its buffer if the read does not complete within
//! its 5 s; a reactor that stops with IO still in flight frees those IOs' buffers with its IO
//! slots even when its queue's deletion was not confirmed (only the queue's own rings are
//! quarantined then); and a layer's child IOs address their parent's buffer, but nothing yet
//! keeps a layer from completing the parent, which gives the buffer back, while a child is
//! still in flight (a replication layer that acknowledges on a majority would).

use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

/// The host page: the unit DMA memory is mapped and handed out in.
pub const PAGE_SIZE: usize = 4096;

/// Where a pool mapped through VFIO starts in IO virtual address space: above the 32-bit
/// MSI window (0xFEE00000) and far below the IOMMU's 39-bit limit.
pub const VFIO_IOVA_BASE: u64 = 1 << 32;

/// 2 MiB, the hugepage size DMA memory comes in.
pub const HUGEPAGE_SIZE: usize = 2 << 20;
const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error(
        "could not map {requested} x 2 MiB hugepages for DMA memory ({free} free of {total} \
         reserved): reserve more with `sysctl -w vm.nr_hugepages={suggest}` (or `echo {suggest} > \
         {HUGEPAGES_SYSFS}/nr_hugepages`), or allow normal pages explicitly (dma.hugepages = \
         false, or --no-hugepages)"
    )]
    HugepagesUnavailable {
        requested: usize,
        free: u64,
        total: u64,
        suggest: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("could not map {bytes} bytes of normal pages for DMA memory")]
    Map {
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("DMA memory exhausted: {requested} bytes asked for, the largest free run is {largest_free} bytes of a {pool} byte pool (raise dma.size)")]
    Exhausted {
        requested: usize,
        largest_free: usize,
        pool: usize,
    },
    #[error("a DMA buffer of {requested} bytes is larger than the 4 GiB one buffer may be")]
    TooLarge { requested: usize },
    #[error("a DMA buffer must be at least one byte")]
    Empty,
    #[error("DMA pool size must be at least one page ({PAGE_SIZE} bytes)")]
    PoolTooSmall,
}

/// How DMA memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// 2 MiB hugepages: physically contiguous per page, never swapped or migrated.
    Huge,
    /// Normal 4 KiB pages, populated and locked. Only for hosts without hugepages, and only
    /// when asked for.
    Normal,
}

struct PoolInner {
    base: NonNull<u8>,
    /// The IOVA of `base`. In-process controllers use the virtual address itself; a VFIO
    /// driver maps the pool into the IOMMU at an address of its choosing.
    iova_base: u64,
    len: usize,
    kind: PageKind,
    /// Free runs of pages, (first page, page count), sorted by first page, never adjacent.
    free: Mutex<Vec<(usize, usize)>>,
}

// SAFETY: the pool owns a private anonymous mapping that lives until the last `Arc` drops; the
// pointer is only used for raw copies into disjoint allocations handed out under the `free`
// mutex, so sharing the handle across threads creates no aliasing references.
unsafe impl Send for PoolInner {}
// SAFETY: as above: no `&`/`&mut` to the mapped memory is ever created through a shared handle.
unsafe impl Sync for PoolInner {}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping created in `DmaPool::new`; every `DmaBuf`
        // holds an `Arc` to this pool, so none outlives the mapping.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A region of DMA memory from which buffers and queue rings are allocated.
#[derive(Clone)]
pub struct DmaPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for DmaPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaPool")
            .field("bytes", &self.inner.len)
            .field("kind", &self.inner.kind)
            .finish()
    }
}

impl DmaPool {
    /// Maps `bytes` (rounded up to whole hugepages, or whole pages for normal pages), with the
    /// virtual address as IOVA (for in-process controllers and the kernel).
    pub fn new(bytes: usize, kind: PageKind) -> Result<Self, DmaError> {
        Self::map(bytes, kind, None)
    }

    /// As [`DmaPool::new`], with IOVAs starting at `iova_base`: for a pool mapped into an IOMMU,
    /// whose address width is narrower than the process's address space.
    pub fn with_iova_base(bytes: usize, kind: PageKind, iova_base: u64) -> Result<Self, DmaError> {
        Self::map(bytes, kind, Some(iova_base))
    }

    fn map(bytes: usize, kind: PageKind, iova_base: Option<u64>) -> Result<Self, DmaError> {
        if bytes < PAGE_SIZE {
            return Err(DmaError::PoolTooSmall);
        }
        if bytes / PAGE_SIZE > u32::MAX as usize {
            return Err(DmaError::Map {
                bytes,
                source: std::io::Error::other("larger than 16 TiB"),
            });
        }
        let granule = match kind {
            PageKind::Huge => HUGEPAGE_SIZE,
            PageKind::Normal => PAGE_SIZE,
        };
        let len = bytes.div_ceil(granule) * granule;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        if kind == PageKind::Huge {
            flags |= libc::MAP_HUGETLB;
        }
        // SAFETY: an anonymous mapping at a kernel-chosen address aliases no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let source = std::io::Error::last_os_error();
            return Err(match kind {
                PageKind::Huge => {
                    let requested = len / HUGEPAGE_SIZE;
                    let free = read_sysfs_u64("free_hugepages");
                    let total = read_sysfs_u64("nr_hugepages");
                    let suggest = total + (requested as u64).saturating_sub(free);
                    DmaError::HugepagesUnavailable {
                        requested,
                        free,
                        total,
                        suggest,
                        source,
                    }
                }
                PageKind::Normal => DmaError::Map { bytes: len, source },
            });
        }
        if kind == PageKind::Normal {
            // Keep normal pages resident, as hugepages are: a DMA target must not be swapped.
            // SAFETY: locks the mapping just created; failure only leaves it unlocked.
            if unsafe { libc::mlock(ptr, len) } != 0 {
                tracing::warn!(
                    "could not mlock {len} bytes of normal-page DMA memory ({}); pages may be swapped",
                    std::io::Error::last_os_error()
                );
            }
        }
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap returned a non-null address");
        let pages = len / PAGE_SIZE;
        Ok(Self {
            inner: Arc::new(PoolInner {
                base,
                iova_base: iova_base.unwrap_or(base.as_ptr() as u64),
                len,
                kind,
                free: Mutex::new(vec![(0, pages)]),
            }),
        })
    }

    pub fn len(&self) -> usize {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    pub fn kind(&self) -> PageKind {
        self.inner.kind
    }

    /// The IOVA of the pool's first byte.
    pub fn iova_base(&self) -> u64 {
        self.inner.iova_base
    }

    /// The pool's host address range, for registering it with a kernel interface (io_uring
    /// fixed buffers). Only raw accesses may go through the pointer.
    pub fn host_range(&self) -> (*mut u8, usize) {
        (self.inner.base.as_ptr(), self.inner.len)
    }

    /// The pool's address range as the in-process controller's IOMMU sees it.
    pub fn iova_map(&self) -> IovaMap {
        IovaMap {
            iova_start: self.inner.iova_base,
            host_start: self.inner.base.as_ptr(),
            len: self.inner.len as u64,
            _pool: self.inner.clone(),
        }
    }

    /// Allocates a zeroed, page-aligned buffer of `bytes`. Not for the IO path: allocate
    /// buffers once and reuse them.
    pub fn alloc(&self, bytes: usize) -> Result<DmaBuf, DmaError> {
        if bytes == 0 {
            return Err(DmaError::Empty);
        }
        if bytes > u32::MAX as usize {
            return Err(DmaError::TooLarge { requested: bytes });
        }
        let pages = bytes.div_ceil(PAGE_SIZE);
        let first_page = {
            let mut free = self.inner.free.lock();
            let Some(index) = free.iter().position(|&(_, count)| count >= pages) else {
                let largest_free =
                    free.iter().map(|&(_, count)| count).max().unwrap_or(0) * PAGE_SIZE;
                return Err(DmaError::Exhausted {
                    requested: bytes,
                    largest_free,
                    pool: self.inner.len,
                });
            };
            let (first, count) = free[index];
            if count == pages {
                free.remove(index);
            } else {
                free[index] = (first + pages, count - pages);
            }
            first
        };
        let buf = DmaBuf {
            pool: self.inner.clone(),
            first_page: first_page as u32,
            pages: pages as u32,
            view_offset: 0,
            view_len: bytes as u32,
        };
        buf.fill_all(0);
        Ok(buf)
    }
}

fn read_sysfs_u64(name: &str) -> u64 {
    std::fs::read_to_string(format!("{HUGEPAGES_SYSFS}/{name}"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// A buffer of DMA memory owned by one holder at a time: the caller, or the engine while the
/// buffer is part of an IO in flight. Only the holder of a buffer may let a device access it,
/// by giving the buffer away with the command (see the crate documentation).
///
/// The IO transfers the buffer's *view*: by default the whole allocation as asked for, or a
/// window of it set with [`DmaBuf::set_view`] (for example to start a transfer part-way into a
/// page, which exercises PRP offsets).
pub struct DmaBuf {
    pool: Arc<PoolInner>,
    /// First page of the allocation and its page count: kept in 32 bits each (16 TiB of
    /// pool) so that a buffer moving through the IO path is three words.
    first_page: u32,
    pages: u32,
    view_offset: u32,
    view_len: u32,
}

const _: () = assert!(std::mem::size_of::<DmaBuf>() == 24);

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf")
            .field("iova", &format_args!("{:#x}", self.iova()))
            .field("len", &self.view_len)
            .finish()
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let (first, count) = (self.first_page as usize, self.pages as usize);
        let mut free = self.pool.free.lock();
        let index = free.partition_point(|&(start, _)| start < first);
        free.insert(index, (first, count));
        // Coalesce with the following and the preceding run.
        if index + 1 < free.len() && free[index].0 + free[index].1 == free[index + 1].0 {
            free[index].1 += free[index + 1].1;
            free.remove(index + 1);
        }
        if index > 0 && free[index - 1].0 + free[index - 1].1 == free[index].0 {
            free[index - 1].1 += free[index].1;
            free.remove(index);
        }
    }
}

impl DmaBuf {
    /// The IOVA of the view's first byte.
    #[inline(always)]
    pub fn iova(&self) -> u64 {
        self.pool.iova_base + self.first_page as u64 * PAGE_SIZE as u64 + self.view_offset as u64
    }

    /// Length of the view in bytes: what an IO with this buffer transfers.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.view_len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.view_len == 0
    }

    /// Bytes allocated (whole pages).
    pub fn capacity(&self) -> usize {
        self.pages as usize * PAGE_SIZE
    }

    /// Narrows (or re-widens) the view to `len` bytes starting `offset` bytes into the
    /// allocation. Panics if the window leaves the allocation: that is a caller bug.
    pub fn set_view(&mut self, offset: usize, len: usize) {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.capacity()),
            "view {offset}+{len} leaves a {} byte allocation",
            self.capacity()
        );
        self.view_offset = offset as u32;
        self.view_len = len as u32;
    }

    /// The host address of the view's first byte, for the queue code that builds rings and PRP
    /// lists in DMA memory, and for kernel interfaces given the buffer with a command. Only raw
    /// (volatile) accesses may go through it, and a device may be given it only under the
    /// ownership rule (the buffer moves with the command).
    pub fn as_ptr(&self) -> *mut u8 {
        self.view_ptr()
    }

    fn view_ptr(&self) -> *mut u8 {
        let offset = self.first_page as usize * PAGE_SIZE + self.view_offset as usize;
        // SAFETY: the allocation's pages plus a view offset within them (checked by set_view,
        // and zero from alloc) lie inside the pool mapping.
        unsafe { self.pool.base.as_ptr().add(offset) }
    }

    /// Copies `data` into the view at `offset`.
    pub fn write_at(&mut self, offset: usize, data: &[u8]) {
        assert!(
            offset
                .checked_add(data.len())
                .is_some_and(|end| end <= self.len()),
            "write past the view"
        );
        // SAFETY: range-checked against the view above; we hold the buffer (`&mut self`), so by
        // the ownership rule no IO is in flight on it and no controller touches it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.view_ptr().add(offset), data.len())
        };
    }

    /// Copies `out.len()` bytes from the view at `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) {
        assert!(
            offset
                .checked_add(out.len())
                .is_some_and(|end| end <= self.len()),
            "read past the view"
        );
        // SAFETY: range-checked against the view above; holding the buffer means, by the
        // ownership rule, that no IO on it is in flight.
        unsafe {
            std::ptr::copy_nonoverlapping(self.view_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
    }

    /// The view's contents as a new vector (for tests and verification, not the IO path).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len()];
        self.read_at(0, &mut out);
        out
    }

    /// The view as bytes, for handing to a socket or a checksum without a copy.
    ///
    /// Sound because of the ownership rule (crate documentation): a buffer is given to a
    /// device only by value, so while this borrow lives no command on the buffer is in flight,
    /// and a buffer whose command was abandoned is never handed back to be borrowed.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the view lies inside the allocation (checked by `set_view`) and the pool
        // mapping outlives `self`. Borrowing `self` means holding the buffer, and by the
        // ownership rule no device reads or writes a buffer anyone holds (it moves into the
        // command's IO slot while the command is in flight, and one whose command timed out is
        // quarantined, never returned), so nothing else accesses these bytes while the shared
        // slice lives, and it is initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.view_ptr(), self.len()) }
    }

    /// The view as mutable bytes, for a socket to read a payload straight into. Sound for the
    /// same reason as [`DmaBuf::as_bytes`].
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_bytes`: no device accesses a buffer that is held, and `&mut self`
        // makes this slice the only access from the host as well.
        unsafe { std::slice::from_raw_parts_mut(self.view_ptr(), self.len()) }
    }

    /// Fills the view with `byte`.
    pub fn fill(&mut self, byte: u8) {
        // SAFETY: the view is inside the allocation and we hold the buffer exclusively.
        unsafe { std::ptr::write_bytes(self.view_ptr(), byte, self.len()) };
    }

    fn fill_all(&self, byte: u8) {
        // SAFETY: the whole allocation was just taken from the free list; nobody else holds it.
        unsafe {
            std::ptr::write_bytes(
                self.pool
                    .base
                    .as_ptr()
                    .add(self.first_page as usize * PAGE_SIZE),
                byte,
                self.capacity(),
            )
        };
    }
}

/// The in-process controller's view of DMA memory: translates IOVAs back to host pointers and
/// refuses anything outside the registered pool, as an IOMMU would.
#[derive(Clone)]
pub struct IovaMap {
    iova_start: u64,
    host_start: *mut u8,
    len: u64,
    _pool: Arc<PoolInner>,
}

// SAFETY: `host_start` points into the pool kept alive by `_pool`; the map only computes
// addresses, and every access through them is a raw copy by the controller that owns the
// command, as for the pool itself.
unsafe impl Send for IovaMap {}
// SAFETY: as above: translating addresses from several threads creates no references.
unsafe impl Sync for IovaMap {}

impl IovaMap {
    /// The host pointer for `len` bytes at `iova`, or `None` when any byte falls outside the
    /// mapping (the controller reports a Data Transfer Error).
    #[inline(always)]
    pub fn translate(&self, iova: u64, len: usize) -> Option<*mut u8> {
        let offset = iova.checked_sub(self.iova_start)?;
        let end = offset.checked_add(len as u64)?;
        // SAFETY: offset + len <= the pool length, so the result stays inside the mapping.
        (end <= self.len).then(|| unsafe { self.host_start.add(offset as usize) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_page_aligned_disjoint_and_returned_on_drop() {
        let pool = DmaPool::new(64 * 1024, PageKind::Normal).unwrap();
        let a = pool.alloc(5000).unwrap();
        let b = pool.alloc(4096).unwrap();
        assert_eq!(a.iova() % PAGE_SIZE as u64, 0);
        assert_eq!(a.capacity(), 8192);
        assert!(b.iova() >= a.iova() + 8192 || b.iova() + 4096 <= a.iova());
        assert!(matches!(
            pool.alloc(60 * 1024),
            Err(DmaError::Exhausted { .. })
        ));
        drop(a);
        drop(b);
        // Everything coalesced back into one run.
        let all = pool.alloc(64 * 1024).unwrap();
        assert_eq!(all.len(), 64 * 1024);
    }

    #[test]
    fn iova_map_refuses_addresses_outside_the_pool() {
        let pool = DmaPool::new(16 * 1024, PageKind::Normal).unwrap();
        let map = pool.iova_map();
        let buf = pool.alloc(4096).unwrap();
        assert!(map.translate(buf.iova(), 4096).is_some());
        assert!(map.translate(buf.iova(), 64 * 1024).is_none());
        assert!(map.translate(buf.iova().wrapping_sub(1 << 30), 1).is_none());
        assert!(map.translate(u64::MAX, 2).is_none());
    }

    #[test]
    fn views_copy_the_bytes_they_are_given() {
        let pool = DmaPool::new(16 * 1024, PageKind::Normal).unwrap();
        let mut buf = pool.alloc(8192).unwrap();
        buf.set_view(512, 1024);
        buf.write_at(0, &[7; 1024]);
        buf.set_view(0, 8192);
        let bytes = buf.to_vec();
        assert!(bytes[..512].iter().all(|&b| b == 0));
        assert!(bytes[512..1536].iter().all(|&b| b == 7));
        assert!(bytes[1536..].iter().all(|&b| b == 0));
    }
}
