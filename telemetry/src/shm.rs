//! Shared-memory files the node publishes for readers in other processes (the stats region,
//! the trace rings): one mapping type, accessed through atomics or byte copies.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// A shared mapping of a region file.
pub(crate) struct Mapping {
    base: NonNull<u8>,
    pub(crate) len: usize,
}

// SAFETY: the mapping is only accessed through atomics (counters) or byte copies of parts that
// are immutable once published (header constants, directory); the pointer itself is shared.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map_file`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl Mapping {
    /// The address of the 8-byte word at `offset`, for recorders that keep it.
    pub(crate) fn word_ptr(&self, offset: usize) -> NonNull<u64> {
        assert!(offset.is_multiple_of(8) && offset <= self.len);
        // SAFETY: offset is within the mapping (checked); the result is non-null.
        unsafe { NonNull::new_unchecked(self.base.as_ptr().add(offset).cast()) }
    }

    /// The 8-byte word at `offset` as an atomic.
    #[inline(always)]
    pub(crate) fn word(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= self.len);
        // SAFETY: offsets come from `Offsets`, checked against the mapping length, and are
        // 8-byte aligned in a page-aligned mapping; the memory is only accessed atomically.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    pub(crate) fn word32(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset.is_multiple_of(4) && offset + 4 <= self.len);
        // SAFETY: as for `word`, 4-byte aligned.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// A copy of `len` bytes at `offset` (for the immutable header and directory).
    pub(crate) fn copy(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: range-checked above; these bytes are written once before the region is
        // published and never again, so copying them races with no writer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), out.as_mut_ptr(), len)
        };
        out
    }

    pub(crate) fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: range-checked; only the creator writes here, before the region is published.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.as_ptr().add(offset),
                bytes.len(),
            )
        };
    }
}

pub(crate) fn map_file(
    file: &std::fs::File,
    len: usize,
    writable: bool,
) -> std::io::Result<Mapping> {
    let protection = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: maps `len` bytes of an open file shared; the kernel picks the address.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            protection,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Mapping {
        base: NonNull::new(ptr.cast()).expect("mmap returned non-null"),
        len,
    })
}

/// Copies `name` into a fixed-size, zero-padded field (truncated to fit).
pub(crate) fn put_name(field: &mut [u8], name: &str) {
    let bytes = name.as_bytes();
    let len = bytes.len().min(field.len());
    field[..len].copy_from_slice(&bytes[..len]);
}

pub(crate) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Creates a region file of `len` bytes under a temporary name beside `path` and maps it
/// writable, for its creator to fill before [`publish`] renames it into place (so a reader
/// never sees it half-written). An error says what failed: "create", "size" or "map".
pub(crate) fn create_temporary(
    path: &Path,
    len: usize,
) -> Result<(PathBuf, Mapping), (&'static str, std::io::Error)> {
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)
        .map_err(|e| ("create", e))?;
    file.set_len(len as u64).map_err(|e| ("size", e))?;
    let map = map_file(&file, len, true).map_err(|e| ("map", e))?;
    Ok((temporary, map))
}

/// Renames a filled region file from [`create_temporary`] to `path`, replacing an old one
/// atomically.
pub(crate) fn publish(temporary: &Path, path: &Path) -> Result<(), (&'static str, std::io::Error)> {
    std::fs::rename(temporary, path).map_err(|e| ("publish", e))
}

/// The little-endian u32 at `at` of a header or directory copy.
pub(crate) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// The little-endian u64 at `at`.
pub(crate) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// A zero-padded name field as a string (bytes that are not UTF-8 replaced).
pub(crate) fn name_at(bytes: &[u8]) -> String {
    let end = bytes
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}
