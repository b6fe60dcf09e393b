//! Shared-memory files the node publishes for readers in other processes (the stats region,
//! the trace rings): one mapping type, accessed through atomics or byte copies.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// A shared mapping of a region file.
pub(crate) struct Mapping {
    base: NonNull<u8>,
    pub(crate) len: usize,
}

// SAFETY: the mapping is only accessed through atomics (counters, volume slots) or byte copies
// of parts that are immutable once published (header constants, directory labels); the pointer
// itself is shared.
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

/// How many times a reader tries to read a slot that is being rewritten before it gives up
/// on it for now (a writer that died half-way must not make a reader spin forever).
pub(crate) const SLOT_READ_ATTEMPTS: u32 = 1000;
/// Attempts that only spin; later ones yield the CPU, as the writer may have been preempted
/// in the slot (a slot is rewritten in microseconds, its counters zeroed included).
const SLOT_READ_SPINS: u32 = 64;

impl Mapping {
    /// Rewrites the slot whose generation word is at `at` and whose content is the `content`
    /// words after it, as a seqlock: the generation is odd while the slot is written and
    /// the next even value once it is complete. `meanwhile` runs while the generation is
    /// odd (to clear what belongs to the slot). Returns the new generation.
    ///
    /// The caller is the slot's only writer (it holds the region's slot lock).
    pub(crate) fn write_slot(&self, at: usize, content: &[u64], meanwhile: impl FnOnce()) -> u64 {
        let generation = self.word(at);
        let writing = generation.load(Ordering::Relaxed) | 1;
        generation.store(writing, Ordering::Relaxed);
        // The odd generation is visible before anything of the slot changes.
        fence(Ordering::Release);
        meanwhile();
        for (index, &word) in content.iter().enumerate() {
            self.word(at + 8 * (index + 1))
                .store(word, Ordering::Relaxed);
        }
        // Everything written above is visible before the even generation.
        generation.store(writing + 1, Ordering::Release);
        writing + 1
    }

    /// Changes one volume slot of a region: under the region's `lock` (one change at a
    /// time), rewrites the slot at `at` ([`Mapping::write_slot`]), then bumps the directory
    /// generation word at `directory_generation`, after the slot's even generation, so that
    /// a reader that sees the new directory generation reads the slot as it is now.
    pub(crate) fn publish_slot(
        &self,
        lock: &Mutex<()>,
        at: usize,
        content: &[u64],
        directory_generation: usize,
        meanwhile: impl FnOnce(),
    ) {
        let _one_writer = lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.write_slot(at, content, meanwhile);
        self.word(directory_generation)
            .fetch_add(1, Ordering::Release);
    }

    /// Reads the slot whose generation word is at `at` into `content`, retrying while a
    /// writer is in it: `Ok(generation)` for a complete copy, `Err(generation last seen)`
    /// when every attempt met a writer.
    pub(crate) fn read_slot(&self, at: usize, content: &mut [u64]) -> Result<u64, u64> {
        let generation = self.word(at);
        let mut seen = 0;
        for attempt in 0..SLOT_READ_ATTEMPTS {
            if attempt >= SLOT_READ_SPINS {
                std::thread::yield_now();
            }
            let before = generation.load(Ordering::Acquire);
            seen = before;
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            for (index, word) in content.iter_mut().enumerate() {
                *word = self.word(at + 8 * (index + 1)).load(Ordering::Relaxed);
            }
            // The content loads complete before the generation is read again.
            fence(Ordering::Acquire);
            if generation.load(Ordering::Relaxed) == before {
                return Ok(before);
            }
        }
        Err(seen)
    }
}

/// Why a region refused to change one of its volume slots.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("volume slot {index} is out of range: the region has {capacity} slots (raise the spare volumes it is created with)")]
    OutOfRange { index: usize, capacity: usize },
    #[error("volume name {name:?} is {} bytes; a slot holds at most {max_bytes}", name.len())]
    NameTooLong { name: String, max_bytes: usize },
    #[error("a volume needs a name: an empty name marks an unused slot (clear a slot with None)")]
    EmptyName,
    #[error("volume {name:?} names core index {core_index}, but the region has {cores} cores")]
    NoSuchCore {
        name: String,
        core_index: u32,
        cores: usize,
    },
}

/// Checks a name for a volume slot of `max_bytes`.
pub(crate) fn check_slot_name(name: &str, max_bytes: usize) -> Result<(), SlotError> {
    if name.is_empty() {
        return Err(SlotError::EmptyName);
    }
    if name.len() > max_bytes {
        return Err(SlotError::NameTooLong {
            name: name.into(),
            max_bytes,
        });
    }
    Ok(())
}

/// `bytes` (a multiple of 8 long) as little-endian words, for a slot's content.
pub(crate) fn words_of(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|word| u64::from_le_bytes(word.try_into().expect("8 bytes")))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// The seqlock alone, with a writer that does nothing but rewrite one slot: a reader
    /// reading it in a loop gets whole contents or nothing, never a mix of two writes.
    #[test]
    fn a_slot_is_read_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let (_, map) = create_temporary(&dir.path().join("slot"), 4096).unwrap();
        let map = Arc::new(map);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (map, stop) = (map.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 1u64;
                while !stop.load(Ordering::Relaxed) && n < 100_000_000 {
                    let content: Vec<u64> = (0..8).map(|word| n * 8 + word).collect();
                    map.write_slot(64, &content, || {});
                    n += 1;
                }
            })
        };
        while map.word(64).load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        let (mut whole, mut generations) = (0, std::collections::BTreeSet::new());
        // 10k reads, and more (within a bound) until the writer was seen to move on.
        for read in 0..1_000_000 {
            if read >= 10_000 && generations.len() > 1 {
                break;
            }
            let mut content = [0u64; 8];
            if let Ok(generation) = map.read_slot(64, &mut content) {
                let n = content[0] / 8;
                let expected: Vec<u64> = (0..8).map(|word| n * 8 + word).collect();
                assert!(
                    content[0] == 0 || content[..] == expected[..],
                    "torn: {content:?}"
                );
                whole += 1;
                generations.insert(generation);
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(
            whole > 0 && generations.len() > 1,
            "{whole} {generations:?}"
        );
    }
}
