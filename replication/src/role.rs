//! What this node is for one replicated volume, shared by the replica service (on the
//! volume's reactor), the primary's layer (the same reactor) and the control thread
//! (promote): the highest epoch known here, whether this node is the primary, what the
//! primary said of this copy's sync, and the superblock as last written.
//!
//! The epoch only grows. The replica service raises it when it adopts a newer primary's
//! claim; promote raises it before claiming on the others; the layer of a primary whose
//! epoch is below it knows another node took the volume over, and fails every IO.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::layer::VolumeStatus;
use crate::meta::Superblock;

#[derive(Debug)]
pub struct VolumeRole {
    pub volume: String,
    epoch: AtomicU64,
    primary_here: AtomicBool,
    /// The primary said this copy lacks nothing (its stream began with no stale region, or
    /// its resync finished). False until a primary says so.
    in_sync: AtomicBool,
    /// The superblock as last written, and which of the two copies holds it: every writer
    /// takes the next generation from here.
    superblock: Mutex<(Superblock, usize)>,
    /// As a replica: writes up to this sequence are here (or in the primary's dirty
    /// regions for this copy).
    applied: AtomicU64,
    /// As the primary: its layer's status.
    primary_status: Mutex<Option<Arc<VolumeStatus>>>,
    /// As the primary in a reparent: the node it hands the volume over to (its claim of the
    /// next epoch finds this copy drained, not deposed).
    handing_over_to: Mutex<Option<String>>,
    /// As a replica: the epoch at which the primary asked this node to take the volume over
    /// (a Handover it accepted), for the control thread to act on; 0 when none.
    handover_asked: AtomicU64,
    /// As the primary: until when it may acknowledge IO, in nanoseconds after [`lease_base`];
    /// `u64::MAX` with no control plane (nothing can elect another primary behind its back).
    lease_until: AtomicU64,
    /// The volume is being deleted from this node: its sessions close, nothing serves it.
    removed: AtomicBool,
}

/// The instant lease deadlines count from (the first use in this process).
fn lease_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl VolumeRole {
    pub fn new(volume: &str, superblock: Superblock, copy: usize, primary_here: bool) -> Self {
        Self {
            volume: volume.into(),
            epoch: AtomicU64::new(superblock.epoch),
            primary_here: AtomicBool::new(primary_here),
            in_sync: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            applied: AtomicU64::new(superblock.applied),
            superblock: Mutex::new((superblock, copy)),
            primary_status: Mutex::new(None),
            handing_over_to: Mutex::new(None),
            handover_asked: AtomicU64::new(0),
            lease_until: AtomicU64::new(u64::MAX),
        }
    }

    /// As the primary: it may acknowledge IO until `until` (its control-plane lease, less a
    /// margin, so that it stops before another node can be elected); `None`: not at all.
    pub fn set_lease_until(&self, until: Option<Instant>) {
        let nanos = until.map_or(0, |until| {
            until.saturating_duration_since(lease_base()).as_nanos() as u64
        });
        self.lease_until.store(nanos, Ordering::Release);
    }

    /// How much longer the primary may acknowledge IO after `now`: `None` with no control
    /// plane, zero once the lease ran out.
    pub fn lease_left(&self, now: Instant) -> Option<std::time::Duration> {
        let until = self.lease_until.load(Ordering::Acquire);
        (until != u64::MAX).then(|| {
            let now = now.saturating_duration_since(lease_base()).as_nanos() as u64;
            std::time::Duration::from_nanos(until.saturating_sub(now))
        })
    }

    /// Whether the primary may acknowledge IO at `now`.
    pub fn lease_valid(&self, now: Instant) -> bool {
        let until = self.lease_until.load(Ordering::Acquire);
        until == u64::MAX || (now.saturating_duration_since(lease_base()).as_nanos() as u64) < until
    }

    /// The node this primary is handing the volume over to, in a reparent.
    pub fn handing_over_to(&self) -> Option<String> {
        self.handing_over_to
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn set_handing_over_to(&self, node: Option<String>) {
        *self
            .handing_over_to
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = node;
    }

    /// As a replica: the primary asked this node to take the volume over at `epoch`.
    pub fn ask_handover(&self, epoch: u64) {
        self.handover_asked.store(epoch, Ordering::Release);
    }

    /// The epoch of a handover asked and not yet acted on, taken.
    pub fn take_handover(&self) -> Option<u64> {
        match self.handover_asked.swap(0, Ordering::AcqRel) {
            0 => None,
            epoch => Some(epoch),
        }
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    pub fn set_applied(&self, applied: u64) {
        self.applied.store(applied, Ordering::Relaxed);
    }

    /// The primary's layer status while this node is the primary.
    pub fn primary_status(&self) -> Option<Arc<VolumeStatus>> {
        self.primary_status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn set_primary_status(&self, status: Option<Arc<VolumeStatus>>) {
        *self
            .primary_status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = status;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Raises the epoch known here to `epoch`; returns the epoch before.
    pub fn raise_epoch(&self, epoch: u64) -> u64 {
        self.epoch.fetch_max(epoch, Ordering::AcqRel)
    }

    pub fn primary_here(&self) -> bool {
        self.primary_here.load(Ordering::Acquire)
    }

    pub fn set_primary_here(&self, primary: bool) {
        self.primary_here.store(primary, Ordering::Release);
    }

    /// Whether the volume is being deleted from this node.
    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub fn set_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }

    pub fn in_sync(&self) -> bool {
        self.in_sync.load(Ordering::Acquire)
    }

    pub fn set_in_sync(&self, in_sync: bool) {
        self.in_sync.store(in_sync, Ordering::Release);
    }

    /// The superblock as last written.
    pub fn superblock(&self) -> Superblock {
        self.lock().0.clone()
    }

    /// The next superblock to write, `change`d, and the copy it goes to; it counts as the
    /// current one from here (its writer makes it durable before acting on it).
    pub fn next_superblock(&self, change: impl FnOnce(&mut Superblock)) -> (Superblock, usize) {
        let mut current = self.lock();
        let (mut next, copy) = current.0.next(current.1);
        change(&mut next);
        *current = (next.clone(), copy);
        (next, copy)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Superblock, usize)> {
        // A writer that panicked left the last superblock it set: still a valid one.
        self.superblock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
