//! Follows a node's trace region as `fathom-stat` follows its stats region: it waits for a
//! node that is not there yet, and notices a restart (the region replaced: another writer
//! named in its header) and a node that stopped or died, then goes on with whatever node
//! comes next. It follows the node's volumes too: each poll first reads the region's volume
//! names again if the node created or deleted one.

use std::path::{Path, PathBuf};

use fathom_telemetry::trace::{RingError, Start, TraceBatch, TraceDirectory, TraceReader};

use crate::stat::process_alive;

/// What one [`TraceFollower::poll`] saw.
pub enum TraceEvent {
    /// Records, and the directory of the node that wrote them.
    Batch(TraceBatch, TraceDirectory),
    /// A node's region was opened: records from now on are this node's (the first one, or
    /// after a restart).
    Opened(TraceDirectory),
    /// Something a user should know (waiting, node stopped, a region that cannot be read).
    Note(String),
    /// Nothing new.
    Idle,
}

/// Follows the trace region at a path.
pub struct TraceFollower {
    path: PathBuf,
    start: Start,
    reader: Option<TraceReader>,
    /// The last note given, so that a state is noted once, not on every poll.
    noted: Option<String>,
}

impl TraceFollower {
    /// Follows `path` from `start` (for the first node; a restarted node's records are read
    /// from its rings' beginning, as none of them were seen). A region that exists but is
    /// not understood is an error; a missing one is waited for.
    pub fn new(path: &Path, start: Start) -> Result<Self, RingError> {
        let mut follower = Self {
            path: path.into(),
            start,
            reader: None,
            noted: None,
        };
        match follower.open(start) {
            Ok(()) => {}
            Err(RingError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        Ok(follower)
    }

    fn open(&mut self, start: Start) -> Result<(), RingError> {
        self.reader = Some(TraceReader::open(&self.path, start)?);
        // Any later node's records are all new to this reader.
        self.start = Start::Oldest;
        Ok(())
    }

    /// The directory of the node being followed.
    pub fn directory(&self) -> Option<&TraceDirectory> {
        self.reader.as_ref().map(TraceReader::directory)
    }

    /// Where the records come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// New records, or what changed.
    pub fn poll(&mut self) -> TraceEvent {
        let Some(reader) = self.reader.as_mut() else {
            return self.try_open(self.start);
        };
        if reader.replaced() {
            // Read what the old node left before letting it go; the new one is opened at the
            // next poll.
            let batch = reader.poll();
            let old = reader.directory().clone();
            self.reader = None;
            self.noted = None;
            if !batch.records.is_empty() || batch.lost > 0 {
                return TraceEvent::Batch(batch, old);
            }
            return match self.path.exists() {
                true => self.try_open(self.start),
                false => self.note(format!(
                    "node {} (pid {}) removed its trace region; waiting for it to return",
                    old.node_id, old.writer_pid
                )),
            };
        }
        // Before the records: a volume created since the last poll is named in the records
        // it already has in the rings.
        reader.refresh();
        let batch = reader.poll();
        if !batch.records.is_empty() || batch.lost > 0 || batch.damaged > 0 {
            self.noted = None;
            return TraceEvent::Batch(batch, reader.directory().clone());
        }
        let directory = reader.directory();
        if !process_alive(directory.writer_pid) {
            let text = format!(
                "node {} (pid {}) is gone; waiting for a restart",
                directory.node_id, directory.writer_pid
            );
            return self.note(text);
        }
        TraceEvent::Idle
    }

    fn try_open(&mut self, start: Start) -> TraceEvent {
        match self.open(start) {
            Ok(()) => {
                self.noted = None;
                TraceEvent::Opened(self.directory().expect("just opened").clone())
            }
            Err(RingError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let text = format!(
                    "waiting for a node: no trace region at {}",
                    self.path.display()
                );
                self.note(text)
            }
            Err(error) => self.note(format!("cannot read {}: {error}", self.path.display())),
        }
    }

    /// A note, once per state.
    fn note(&mut self, text: String) -> TraceEvent {
        if self.noted.as_deref() == Some(text.as_str()) {
            return TraceEvent::Idle;
        }
        self.noted = Some(text.clone());
        TraceEvent::Note(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_telemetry::trace::{TraceRecord, TraceRegion, TraceSpec, VolumeGeometry};
    use fathom_telemetry::Clock;

    #[test]
    fn records_of_a_volume_created_while_following_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace");
        let spec = TraceSpec {
            node_id: "n1".into(),
            cores: vec![0],
            capacity: 8,
            volumes: vec!["vol0".into()],
            geometry: Vec::new(),
            spare_volumes: 1,
            layers: Vec::new(),
        };
        let region = TraceRegion::create(&path, &spec, &Clock::monotonic()).unwrap();
        let mut follower = TraceFollower::new(&path, Start::Oldest).unwrap();
        assert!(matches!(follower.poll(), TraceEvent::Idle));
        let geometry = VolumeGeometry {
            first_lba: 100,
            block_size: 512,
        };
        region.set_volume(1, Some(("late", geometry))).unwrap();
        let record = TraceRecord {
            volume: 1,
            offset: 1024,
            ..TraceRecord::default()
        };
        region.writer(0).push(&record);
        let TraceEvent::Batch(batch, directory) = follower.poll() else {
            panic!("a batch with the record");
        };
        assert_eq!(batch.records, [(0, record)]);
        assert_eq!(directory.volume_name(1), Some("late"));
        assert_eq!(directory.lba(&record), Some(102));
        region.set_volume(1, None).unwrap();
        assert!(matches!(follower.poll(), TraceEvent::Idle));
        assert_eq!(follower.directory().unwrap().volume_name(1), None);
    }
}
