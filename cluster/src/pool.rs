//! This node's pool (`[cluster.pool]`): the space of one device that volumes made through the
//! control plane take, less the ranges of the configured `[[volume]]`s. Which volume has which
//! range is kept in `pool.json` in the data directory (written to a temporary file, synced,
//! then renamed), so that the node finds its copies again when it restarts.
//!
//! Sans-IO but for [`Pool::open`] and [`Pool::save`]: allocation is a pure function of the
//! ranges in use, tested without a device.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Extents start on this boundary (and the pool's first byte is rounded up to it).
pub const ALIGN: u64 = 1 << 20;
/// The file in the data directory.
pub const FILE: &str = "pool.json";

/// Why the pool could not be read, kept or grown.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{path}: {source} (the node's record of which volume has which range of the pool; check the data directory)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {what}; move it away only if the pool's volumes are gone from every node")]
    Damaged { path: PathBuf, what: String },
    #[error("volume {name:?}: all {slots} volume slots of the pool are taken ([cluster.pool] volumes): delete a volume, or place it elsewhere")]
    NoSlot { name: String, slots: usize },
    #[error("volume {name:?} needs {needed} bytes of the pool on device {device}; its largest free range has {largest} (of {free} free): delete a volume, or place it elsewhere")]
    NoRoom {
        name: String,
        device: String,
        needed: u64,
        largest: u64,
        free: u64,
    },
}

/// Where one volume lies in the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    /// Byte offset in the device's namespace 1.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
    /// Bytes of replication metadata after the data.
    pub meta_bytes: u64,
    /// The nodes that hold the volume's copies, as its spec named them (so that the node
    /// serves its copy again at start without etcd).
    pub replicas: Vec<String>,
    /// The spec's incarnation: a spec of the same name and another incarnation is another
    /// volume.
    #[serde(default)]
    pub incarnation: u64,
    /// Cleared (zeroed) and ready to serve: false while it is being made (a node that stops
    /// meanwhile clears it again when it restarts).
    pub ready: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.size + self.meta_bytes
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    v: u32,
    device: String,
    volumes: BTreeMap<String, Extent>,
}

/// The pool's free space, as nodes publish it for placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    pub free_bytes: u64,
    /// The largest range one volume (with its metadata) can take.
    pub largest_bytes: u64,
    pub block_size: u32,
    /// Volumes it can take still (`[cluster.pool] volumes` less those it holds).
    #[serde(default)]
    pub slots_free: u32,
}

/// The pool of one node.
#[derive(Debug)]
pub struct Pool {
    device: String,
    block_size: u32,
    /// Usable bytes: `[start, end)` of the namespace.
    start: u64,
    end: u64,
    /// Ranges no pool volume may take (the configured volumes'), as `(offset, end)`.
    reserved: Vec<(u64, u64)>,
    volumes: BTreeMap<String, Extent>,
    path: PathBuf,
    /// How many volumes it may hold at once.
    slots: usize,
}

impl Pool {
    /// The pool of `device` (`bytes` long, blocks of `block_size`) less `reserved`, with the
    /// volumes `data_dir/pool.json` records (none if it does not exist yet).
    pub fn open(
        data_dir: &Path,
        device: &str,
        bytes: u64,
        block_size: u32,
        reserved: Vec<(u64, u64)>,
        slots: usize,
    ) -> Result<Self, PoolError> {
        let path = data_dir.join(FILE);
        let mut pool = Self {
            device: device.into(),
            block_size,
            start: 0,
            end: bytes - bytes % ALIGN.max(block_size as u64),
            reserved,
            volumes: BTreeMap::new(),
            path,
            slots,
        };
        let text = match std::fs::read(&pool.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(pool),
            Err(source) => {
                return Err(PoolError::Io {
                    path: pool.path,
                    source,
                })
            }
        };
        let damaged = |what: String| PoolError::Damaged {
            path: pool.path.clone(),
            what,
        };
        let file: File =
            serde_json::from_slice(&text).map_err(|error| damaged(error.to_string()))?;
        if file.v != 1 {
            return Err(damaged(format!(
                "layout version {}, this node reads 1",
                file.v
            )));
        }
        if file.device != device {
            return Err(damaged(format!(
                "it is the pool of device {:?}, and [cluster.pool] names {device:?}",
                file.device
            )));
        }
        for (name, extent) in &file.volumes {
            if let Some(why) = pool.conflict(extent) {
                return Err(damaged(format!("volume {name:?}: {why}")));
            }
            pool.volumes.insert(name.clone(), extent.clone());
        }
        Ok(pool)
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// The volumes of the pool and their ranges.
    pub fn volumes(&self) -> &BTreeMap<String, Extent> {
        &self.volumes
    }

    /// Why `extent` cannot be in the pool, if it cannot.
    fn conflict(&self, extent: &Extent) -> Option<String> {
        let block = self.block_size as u64;
        if extent.size == 0
            || !extent.offset.is_multiple_of(block)
            || !extent.size.is_multiple_of(block)
        {
            return Some(format!(
                "{extent:?} is not in whole blocks of {block} bytes"
            ));
        }
        if extent.end() > self.end {
            return Some(format!(
                "{extent:?} ends past the device ({} bytes)",
                self.end
            ));
        }
        let overlaps = |(start, end): (u64, u64)| extent.offset < end && start < extent.end();
        if let Some(range) = self.reserved.iter().copied().find(|&range| overlaps(range)) {
            return Some(format!(
                "{extent:?} overlaps a configured volume at {range:?}"
            ));
        }
        self.volumes
            .iter()
            .find(|(_, other)| overlaps((other.offset, other.end())))
            .map(|(name, _)| format!("{extent:?} overlaps volume {name:?}"))
    }

    /// The free ranges, `(offset, end)`, in order.
    fn free(&self) -> Vec<(u64, u64)> {
        let mut used: Vec<(u64, u64)> = self
            .reserved
            .iter()
            .copied()
            .chain(self.volumes.values().map(|e| (e.offset, e.end())))
            .collect();
        used.sort_unstable();
        let mut free = Vec::new();
        let mut at = self.start;
        for (start, end) in used {
            if start > at {
                free.push((at, start));
            }
            at = at.max(end.next_multiple_of(ALIGN));
        }
        if at < self.end {
            free.push((at, self.end));
        }
        free
    }

    pub fn room(&self) -> Room {
        let free = self.free();
        Room {
            free_bytes: free.iter().map(|(start, end)| end - start).sum(),
            largest_bytes: free
                .iter()
                .map(|(start, end)| end - start)
                .max()
                .unwrap_or(0),
            block_size: self.block_size,
            slots_free: self.slots.saturating_sub(self.volumes.len()) as u32,
        }
    }

    /// Takes a range for volume `name` (`size` bytes of data and `meta_bytes` after them):
    /// the smallest free range it fits (best fit keeps large ranges for large volumes). Not
    /// ready until [`Pool::set_ready`]. A volume the pool has already keeps its range.
    pub fn allocate(
        &mut self,
        name: &str,
        size: u64,
        meta_bytes: u64,
        replicas: &[String],
        incarnation: u64,
    ) -> Result<Extent, PoolError> {
        if let Some(extent) = self.volumes.get(name) {
            return Ok(extent.clone());
        }
        let room = self.room();
        let no_room = |needed| PoolError::NoRoom {
            name: name.into(),
            device: self.device.clone(),
            needed,
            largest: room.largest_bytes,
            free: room.free_bytes,
        };
        let needed = size.checked_add(meta_bytes).ok_or(no_room(u64::MAX))?;
        if room.slots_free == 0 {
            return Err(PoolError::NoSlot {
                name: name.into(),
                slots: self.slots,
            });
        }
        let free = self.free();
        let Some(&(offset, _)) = free
            .iter()
            .filter(|(start, end)| end - start >= needed)
            .min_by_key(|(start, end)| end - start)
        else {
            return Err(no_room(needed));
        };
        let extent = Extent {
            offset,
            size,
            meta_bytes,
            replicas: replicas.to_vec(),
            incarnation,
            ready: false,
        };
        if let Some(why) = self.conflict(&extent) {
            return Err(PoolError::Damaged {
                path: self.path.clone(),
                what: format!("volume {name:?} would not fit: {why}"),
            });
        }
        self.volumes.insert(name.into(), extent.clone());
        Ok(extent)
    }

    pub fn set_ready(&mut self, name: &str) {
        if let Some(extent) = self.volumes.get_mut(name) {
            extent.ready = true;
        }
    }

    /// Gives volume `name`'s range back.
    pub fn release(&mut self, name: &str) -> Option<Extent> {
        self.volumes.remove(name)
    }

    /// Writes the record durably: a temporary file, synced, renamed over the old one, and
    /// the directory synced.
    pub fn save(&self) -> Result<(), PoolError> {
        let io = |source| PoolError::Io {
            path: self.path.clone(),
            source,
        };
        let file = File {
            v: 1,
            device: self.device.clone(),
            volumes: self.volumes.clone(),
        };
        let text = serde_json::to_vec_pretty(&file).expect("the pool serialises");
        let temporary = self.path.with_extension("json.new");
        {
            let mut out = std::fs::File::create(&temporary).map_err(io)?;
            out.write_all(&text).map_err(io)?;
            out.sync_all().map_err(io)?;
        }
        std::fs::rename(&temporary, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn pool(dir: &Path, reserved: Vec<(u64, u64)>) -> Pool {
        Pool::open(dir, "nvme0", 64 * MIB, 512, reserved, 8).unwrap()
    }

    #[test]
    fn ranges_avoid_configured_volumes_and_each_other_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pool(dir.path(), vec![(0, 8 * MIB + 4096)]);
        let a = p.allocate("a", 8 * MIB, 12288, &[], 1).unwrap();
        assert_eq!(a.offset, 9 * MIB, "after the configured volume, aligned");
        let b = p.allocate("b", 4 * MIB, 12288, &[], 1).unwrap();
        assert!(b.offset >= a.end());
        p.set_ready("a");
        p.save().unwrap();
        let again = pool(dir.path(), vec![(0, 8 * MIB + 4096)]);
        assert_eq!(again.volumes().len(), 2);
        assert!(again.volumes()["a"].ready);
        assert!(
            !again.volumes()["b"].ready,
            "b was never cleared: it is made again"
        );
        let error = p
            .allocate("c", 60 * MIB, 0, &[], 1)
            .unwrap_err()
            .to_string();
        assert!(error.contains("largest free range"), "{error}");
        p.release("a");
        let c = p.allocate("c", 8 * MIB, 12288, &[], 1).unwrap();
        assert_eq!(c.offset, a.offset, "a's range serves again");
    }

    #[test]
    fn a_damaged_record_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        for (text, expect) in [
            ("not json", "damaged"),
            (
                r#"{"v":2,"device":"nvme0","volumes":{}}"#,
                "layout version 2",
            ),
            (
                r#"{"v":1,"device":"other","volumes":{}}"#,
                "device \"other\"",
            ),
            (
                r#"{"v":1,"device":"nvme0","volumes":{"a":{"offset":0,"size":1048576,"meta_bytes":0,"replicas":[],"ready":true},"b":{"offset":512,"size":1048576,"meta_bytes":0,"replicas":[],"ready":true}}}"#,
                "overlaps volume",
            ),
            (
                r#"{"v":1,"device":"nvme0","volumes":{"a":{"offset":0,"size":1000,"meta_bytes":0,"replicas":[],"ready":true}}}"#,
                "whole blocks",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = Pool::open(dir.path(), "nvme0", 64 * MIB, 512, vec![], 8)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expect), "{text}: {error}");
        }
    }

    proptest! {
        /// Whatever is allocated and released, no two ranges overlap, none leaves the device
        /// or touches a reserved range.
        #[test]
        fn ranges_never_overlap(steps in proptest::collection::vec((0u8..6, 1u64..12, any::<bool>()), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let mut p = pool(dir.path(), vec![(20 * MIB, 22 * MIB)]);
            for (name, mib, release) in steps {
                let name = format!("v{name}");
                if release {
                    p.release(&name);
                } else {
                    let _ = p.allocate(&name, mib * MIB, 8192, &[], 1);
                }
                let extents: Vec<Extent> = p.volumes().values().cloned().collect();
                for (i, a) in extents.iter().enumerate() {
                    prop_assert!(a.end() <= 64 * MIB);
                    prop_assert!(a.end() <= 20 * MIB || a.offset >= 22 * MIB);
                    for b in &extents[i + 1..] {
                        prop_assert!(a.end() <= b.offset || b.end() <= a.offset);
                    }
                }
            }
        }
    }
}
