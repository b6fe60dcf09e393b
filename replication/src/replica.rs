//! What a replica does with a volume's frames, sans-IO: fencing by epoch, bounds, writes in
//! sequence order, and the replies once the local IO is done. The replica service (the socket
//! driver) submits the IOs this decides and reports their completions back.
//!
//! - A frame from an older epoch, or a newer epoch not claimed by an Epoch frame, is refused
//!   ([`crate::proto::check_epoch`]) and nothing is written.
//! - An Epoch frame with a newer epoch is adopted once it is durable: the service writes the
//!   superblock with FUA, then calls [`ReplicaVolume::epoch_durable`] for the EpochOk.
//! - Writes (Write, WriteZeroes, Trim) must come in sequence order; overlapping ones run one
//!   after the other ([`crate::order`]). Each is acknowledged with its sequence once written.
//! - A Flush runs once every write it covers (up to its sequence) is applied, or once no
//!   write is in flight here; it is acknowledged with "durable up to": every write applied
//!   when it was submitted (short of its sequence if this copy lacks one).
//! - A Read answers with the data (a new primary's reconciliation, resync).

use fathom_telemetry::trace::TraceContext;

use crate::order::{Admit, Write, WriteOrder};
use crate::proto::{
    check_epoch, encode, encode_probe_entries, status, EpochVerdict, Frame, Header, Kind,
    ProbeEntry,
};

/// An IO the service is to run on the local volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Io {
    pub kind: IoKind,
    /// Its place among the session's writes (Write, WriteZeroes, Trim, Resync), in the order
    /// they arrived: what overlapping writes are ordered by, and what
    /// [`ReplicaVolume::completed`] names held writes by.
    pub arrival: u64,
    pub request_id: u64,
    pub lba: u64,
    pub blocks: u32,
    /// The write's sequence; for a flush, the last write it covers.
    pub sequence: u64,
    pub fua: bool,
    pub trace: Option<TraceContext>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Write,
    WriteZeroes,
    Trim,
    /// A region's data from the primary (resync): written durably, no sequence.
    Resync,
    Flush,
    Read,
}

/// What to do with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run it now.
    Submit(Io),
    /// It waits behind an earlier overlapping write: keep it and its payload until
    /// [`ReplicaVolume::completed`] names its arrival as ready.
    Held(Io),
    /// Too many writes outstanding: stop reading the session until one completes, then
    /// offer the same frame again.
    Full,
    /// Send this reply; nothing is run (a refusal, an out-of-range request).
    Reply(Vec<u8>),
    /// Write the superblock with `epoch` durably, then call [`ReplicaVolume::epoch_durable`]
    /// with these fields.
    PersistEpoch {
        epoch: u64,
        request_id: u64,
        base: u64,
    },
    /// The primary broke the protocol (writes out of order, a payload of the wrong size):
    /// close the session with this reason; nothing is run.
    Close(String),
    /// A new primary asks which regions this copy wrote last, and at which sequence: answer
    /// with [`ReplicaVolume::probe_reply`] once no write is in flight here (so every write
    /// the session delivered counts).
    Probe {
        request_id: u64,
        first: u64,
        count: u32,
    },
    /// The primary asks this copy to take the volume over once it drained, its last write
    /// being `sequence`: answer with [`ReplicaVolume::handover_reply`] once no write is in
    /// flight here.
    Handover { request_id: u64, sequence: u64 },
}

/// One replicated volume on this replica node.
#[derive(Debug)]
pub struct ReplicaVolume {
    /// The session's index of the volume (for replies).
    index: u32,
    epoch: u64,
    block_bytes: u32,
    blocks: u64,
    order: WriteOrder,
    /// Writes so far, in arrival order (the order's keys).
    arrivals: u64,
    /// The last write sequence taken: the primary's writes come in sequence order.
    last_sequence: u64,
    /// Every write up to this sequence has completed here (acknowledged).
    applied: u64,
    /// Sequences completed beyond `applied`, not yet contiguous.
    done: Vec<u64>,
    /// Every write up to this sequence is durable here.
    durable: u64,
    /// The copy was never written by a primary: the first EpochOk says so.
    new_copy: bool,
    /// Per region (of `1 << region_shift` bytes): the highest write sequence applied to it
    /// since this process started (a new primary's reconciliation asks for them).
    region_shift: u32,
    region_sequences: Vec<u64>,
}

/// The most (region, sequence) pairs one ProbeReply carries.
pub const PROBE_PAIRS_PER_REPLY: u32 = 4096;

impl ReplicaVolume {
    /// A volume at `epoch` of `blocks` blocks of `block_bytes`, whose writes up to `applied`
    /// are here; at most `max_writes` tracked at once.
    pub fn new(
        index: u32,
        epoch: u64,
        block_bytes: u32,
        blocks: u64,
        applied: u64,
        max_writes: usize,
    ) -> Self {
        Self {
            index,
            epoch,
            block_bytes,
            blocks,
            order: WriteOrder::new(max_writes),
            arrivals: 0,
            last_sequence: applied,
            applied,
            done: Vec::new(),
            durable: applied,
            new_copy: false,
            region_shift: 0,
            region_sequences: Vec::new(),
        }
    }

    /// Keeps, per region of `1 << region_shift` bytes, the highest sequence written to it,
    /// for Probe.
    pub fn track_regions(&mut self, region_shift: u32) {
        let bytes = self.blocks * self.block_bytes as u64;
        self.region_shift = region_shift;
        self.region_sequences = vec![0; bytes.div_ceil(1 << region_shift) as usize];
    }

    /// Whether writes are in flight or waiting here.
    pub fn writing(&self) -> bool {
        !self.order.is_empty()
    }

    /// The ProbeReply for regions `first..first + count`: each one written since this
    /// process started, with its highest sequence.
    pub fn probe_reply(&self, request_id: u64, first: u64, count: u32) -> Vec<u8> {
        let regions = self.region_sequences.len() as u64;
        let first = first.min(regions);
        let count = (count.min(PROBE_PAIRS_PER_REPLY) as u64).min(regions - first);
        let entries: Vec<ProbeEntry> = (first..first + count)
            .filter_map(|region| {
                let sequence = self.region_sequences[region as usize];
                (sequence != 0).then_some(ProbeEntry { region, sequence })
            })
            .collect();
        let mut payload = Vec::with_capacity(entries.len() * 16);
        encode_probe_entries(&entries, &mut payload);
        self.reply(
            Header {
                request_id,
                sequence: self.applied,
                lba: first,
                block_count: count as u32,
                ..Header::new(Kind::ProbeReply)
            },
            &payload,
        )
    }

    /// Write `io` completed here: its regions' highest sequence.
    fn note_regions(&mut self, io: &Io) {
        if self.region_sequences.is_empty() || io.blocks == 0 {
            return;
        }
        let block = self.block_bytes as u64;
        let first = (io.lba * block) >> self.region_shift;
        let last = ((io.lba + io.blocks as u64) * block - 1) >> self.region_shift;
        for region in first..=last.min(self.region_sequences.len() as u64 - 1) {
            let slot = &mut self.region_sequences[region as usize];
            *slot = (*slot).max(io.sequence);
        }
    }

    /// The copy holds nothing of the volume (a new or wiped disk): the next primary to
    /// claim it is told, and rebuilds it in full.
    pub fn mark_new_copy(&mut self) {
        self.new_copy = true;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a flush that must cover every write up to `target` may run: they are all
    /// applied, or no write is in flight here so no more will be (a write that failed, one this
    /// copy missed): its FlushAck then says how far it got, short of `target`.
    pub fn flush_ready(&self, target: u64) -> bool {
        self.applied >= target || !self.writing()
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn durable(&self) -> u64 {
        self.durable
    }

    fn reply(&self, header: Header, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(crate::proto::HEADER_LEN + payload.len());
        let header = Header {
            volume: self.index,
            epoch: self.epoch,
            ..header
        };
        // Every field is one the reply kind takes: an error here is a bug in this module.
        encode(&header, payload, &mut out).expect("a reply this module builds is valid");
        out
    }

    /// What to do with a frame of this volume.
    pub fn on_frame(&mut self, frame: &Frame<'_>) -> Decision {
        let header = frame.header;
        match check_epoch(self.epoch, &header) {
            Err(refusal) => {
                let text = refusal.to_string();
                return Decision::Reply(self.reply(
                    Header {
                        status: refusal.reason(),
                        request_id: header.request_id,
                        ..Header::new(Kind::Refused)
                    },
                    text.as_bytes(),
                ));
            }
            Ok(EpochVerdict::Adopt { epoch }) => {
                return Decision::PersistEpoch {
                    epoch,
                    request_id: header.request_id,
                    base: header.sequence,
                };
            }
            Ok(EpochVerdict::Current) => {}
        }
        let kind = match header.kind {
            Kind::Write => IoKind::Write,
            Kind::WriteZeroes => IoKind::WriteZeroes,
            Kind::Trim => IoKind::Trim,
            Kind::Flush => IoKind::Flush,
            Kind::Read => IoKind::Read,
            Kind::Resync => IoKind::Resync,
            Kind::Probe => {
                return Decision::Probe {
                    request_id: header.request_id,
                    first: header.lba,
                    count: header.block_count,
                }
            }
            Kind::Handover => {
                return Decision::Handover {
                    request_id: header.request_id,
                    sequence: header.sequence,
                }
            }
            Kind::Epoch => {
                // The current epoch claimed again (a primary that reconnected).
                self.rebase(header.sequence);
                return Decision::Reply(self.epoch_ok(header.request_id));
            }
            other => {
                return Decision::Close(format!(
                    "a {} frame is not a request a replica serves",
                    other.name()
                ))
            }
        };
        let io = Io {
            kind,
            arrival: 0,
            request_id: header.request_id,
            lba: header.lba,
            blocks: header.block_count,
            sequence: header.sequence,
            fua: header.fua,
            trace: header.trace,
        };
        if kind == IoKind::Flush {
            // `sequence` is the last write it must cover: the service submits it once
            // [`ReplicaVolume::flush_ready`], and it covers what is applied then.
            return Decision::Submit(io);
        }
        if io
            .lba
            .checked_add(io.blocks as u64)
            .is_none_or(|end| end > self.blocks)
        {
            let reply_kind = if kind == IoKind::Read {
                Kind::ReadReply
            } else {
                Kind::Ack
            };
            return Decision::Reply(self.reply(
                Header {
                    status: status::OUT_OF_RANGE,
                    request_id: io.request_id,
                    sequence: if kind == IoKind::Read {
                        self.applied
                    } else {
                        io.sequence
                    },
                    lba: if kind == IoKind::Read { io.lba } else { 0 },
                    block_count: if kind == IoKind::Read { io.blocks } else { 0 },
                    ..Header::new(reply_kind)
                },
                &[],
            ));
        }
        if kind == IoKind::Read {
            return Decision::Submit(io);
        }
        if matches!(kind, IoKind::Write | IoKind::Resync)
            && frame.payload.len() as u64 != io.blocks as u64 * self.block_bytes as u64
        {
            return Decision::Close(format!(
                "write {} of {} blocks carries {} bytes, not {} (blocks of {} bytes)",
                io.sequence,
                io.blocks,
                frame.payload.len(),
                io.blocks as u64 * self.block_bytes as u64,
                self.block_bytes
            ));
        }
        if kind != IoKind::Resync && io.sequence <= self.last_sequence {
            return Decision::Close(format!(
                "write {} came after write {}: the primary's writes come in sequence order",
                io.sequence, self.last_sequence
            ));
        }
        let write = Write {
            sequence: self.arrivals + 1,
            lba: io.lba,
            blocks: io.blocks,
        };
        let io = Io {
            arrival: write.sequence,
            ..io
        };
        let decision = match self.order.admit(write) {
            Ok(Admit::Now) => Decision::Submit(io),
            Ok(Admit::Held) => Decision::Held(io),
            Ok(Admit::Full) => return Decision::Full,
            Err(error) => return Decision::Close(error.to_string()),
        };
        self.arrivals += 1;
        if kind != IoKind::Resync {
            self.last_sequence = io.sequence;
        }
        decision
    }

    fn epoch_ok(&self, request_id: u64) -> Vec<u8> {
        self.reply(
            Header {
                request_id,
                // The highest sequence taken: a primary that starts numbers after it.
                sequence: self.applied.max(self.last_sequence),
                status: match self.new_copy {
                    true => status::NEW_COPY,
                    false => status::OK,
                },
                ..Header::new(Kind::EpochOk)
            },
            &[],
        )
    }

    /// Another session on this node made `epoch` durable here (a promote): frames of older
    /// epochs are refused from now on.
    pub fn raise_epoch(&mut self, epoch: u64) {
        if epoch > self.epoch {
            self.epoch = epoch;
            self.last_sequence = 0;
        }
    }

    /// The answer to a forwarded client IO of `kind` (run on this node, the primary): an Ack,
    /// FlushAck or ReadReply (with `data`) with `code`.
    pub fn forwarded_reply(
        &self,
        kind: Kind,
        request_id: u64,
        code: u16,
        lba: u64,
        blocks: u32,
        data: &[u8],
    ) -> Vec<u8> {
        let header = match kind {
            Kind::Read => Header {
                lba,
                block_count: blocks,
                ..Header::new(Kind::ReadReply)
            },
            Kind::Flush => Header::new(Kind::FlushAck),
            _ => Header::new(Kind::Ack),
        };
        let ok = code == status::OK;
        self.reply(
            Header {
                status: code,
                request_id,
                ..header
            },
            if ok && kind == Kind::Read { data } else { &[] },
        )
    }

    /// The answer to a Handover: an Ack with the highest sequence applied here when this copy
    /// takes the volume over, else `refusal`'s reason.
    pub fn handover_reply(&self, request_id: u64, refusal: Option<&str>) -> Vec<u8> {
        match refusal {
            None => self.reply(
                Header {
                    sequence: self.applied,
                    request_id,
                    ..Header::new(Kind::Ack)
                },
                &[],
            ),
            Some(text) => self.refusal(request_id, crate::proto::refusal::NOT_READY, text),
        }
    }

    /// A Refused frame answering request `request_id`, with reason `code` and `text`.
    pub fn refusal(&self, request_id: u64, code: u16, text: &str) -> Vec<u8> {
        self.reply(
            Header {
                status: code,
                request_id,
                ..Header::new(Kind::Refused)
            },
            text.as_bytes(),
        )
    }

    /// The superblock now holds `epoch`: the replica is fenced against anything older, its
    /// stream starts after `base` (the Epoch frame's), and the EpochOk to send.
    pub fn epoch_durable(&mut self, epoch: u64, request_id: u64, base: u64) -> Vec<u8> {
        if epoch > self.epoch {
            // A new primary numbers its writes from where it learned the volume stands.
            self.last_sequence = 0;
        }
        self.epoch = self.epoch.max(epoch);
        self.rebase(base);
        let reply = self.epoch_ok(request_id);
        // Told once: from now on the primary that claimed it keeps what it lacks.
        self.new_copy = false;
        reply
    }

    /// A primary's stream starts after `base`: what this replica lacks up to it is in the
    /// primary's dirty-region map, so `applied` (and what flush acks promise, in the same
    /// sense) moves up to it, and no gap below it is waited for.
    fn rebase(&mut self, base: u64) {
        if base <= self.applied {
            return;
        }
        self.applied = base;
        self.last_sequence = self.last_sequence.max(base);
        self.durable = self.durable.max(base);
        self.done.retain(|&sequence| sequence > base);
        while self.done.first() == Some(&(self.applied + 1)) {
            self.applied += 1;
            self.done.remove(0);
        }
    }

    /// A submitted IO finished (`ok`: without error; `data`: a read's data). Returns the
    /// reply to send and the arrivals of the held writes that may run now, in order.
    pub fn completed(&mut self, io: &Io, ok: bool, data: &[u8]) -> (Vec<u8>, Vec<u64>) {
        let code = if ok { status::OK } else { status::IO_ERROR };
        match io.kind {
            IoKind::Read => {
                let header = Header {
                    status: code,
                    request_id: io.request_id,
                    sequence: self.applied,
                    lba: io.lba,
                    block_count: io.blocks,
                    ..Header::new(Kind::ReadReply)
                };
                (self.reply(header, if ok { data } else { &[] }), Vec::new())
            }
            IoKind::Flush => {
                if ok {
                    self.durable = self.durable.max(io.sequence);
                }
                let header = Header {
                    status: code,
                    request_id: io.request_id,
                    sequence: if ok { io.sequence } else { self.durable },
                    ..Header::new(Kind::FlushAck)
                };
                (self.reply(header, &[]), Vec::new())
            }
            IoKind::Resync => {
                let ready = self.order.completed(io.arrival).unwrap_or_default();
                let header = Header {
                    status: code,
                    request_id: io.request_id,
                    ..Header::new(Kind::Ack)
                };
                let ready = ready.into_iter().map(|write| write.sequence).collect();
                (self.reply(header, &[]), ready)
            }
            IoKind::Write | IoKind::WriteZeroes | IoKind::Trim => {
                let ready = self.order.completed(io.arrival).unwrap_or_default();
                if ok {
                    self.note_regions(io);
                    self.applied_one(io.sequence);
                    if io.fua {
                        self.durable = self.durable.max(io.sequence.min(self.applied));
                    }
                }
                let header = Header {
                    status: code,
                    request_id: io.request_id,
                    sequence: io.sequence,
                    ..Header::new(Kind::Ack)
                };
                let ready = ready.into_iter().map(|write| write.sequence).collect();
                (self.reply(header, &[]), ready)
            }
        }
    }

    /// Write `sequence` is done: `applied` moves up over every contiguous completed one.
    fn applied_one(&mut self, sequence: u64) {
        if sequence <= self.applied {
            return;
        }
        self.done.push(sequence);
        self.done.sort_unstable();
        // A gap (writes this replica missed while away) holds `applied` until a resync
        // fills it: its flush acks then promise no more than it has.
        while self.done.first() == Some(&(self.applied + 1)) {
            self.applied += 1;
            self.done.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{refusal, FrameDecoder};

    const BLOCK: u32 = 4096;

    fn volume() -> ReplicaVolume {
        ReplicaVolume::new(0, 5, BLOCK, 1024, 0, 16)
    }

    fn frame_bytes(header: Header, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&header, payload, &mut out).unwrap();
        out
    }

    /// Decodes `bytes` (one frame) and hands it to `f`.
    fn with_frame<T>(bytes: &[u8], f: impl FnOnce(&Frame<'_>) -> T) -> T {
        let mut decoder = FrameDecoder::default();
        decoder.push(bytes);
        let frame = decoder.next().unwrap().unwrap();
        f(&frame)
    }

    fn write(sequence: u64, lba: u64, blocks: u32, epoch: u64) -> Vec<u8> {
        frame_bytes(
            Header {
                epoch,
                sequence,
                lba,
                block_count: blocks,
                request_id: 100 + sequence,
                ..Header::new(Kind::Write)
            },
            &vec![0xab; (blocks * BLOCK) as usize],
        )
    }

    fn decide(volume: &mut ReplicaVolume, bytes: &[u8]) -> Decision {
        with_frame(bytes, |frame| volume.on_frame(frame))
    }

    #[test]
    fn a_frame_from_an_older_epoch_is_refused_and_nothing_is_run() {
        let mut v = volume();
        let Decision::Reply(reply) = decide(&mut v, &write(1, 0, 1, 4)) else {
            panic!("a stale write must be refused");
        };
        with_frame(&reply, |frame| {
            assert_eq!(frame.kind(), Kind::Refused);
            assert_eq!(frame.header.status, refusal::STALE_EPOCH);
            assert_eq!(frame.epoch(), 5, "the refusal names the current epoch");
            assert!(frame.refusal_text().unwrap().contains('4'));
        });
        // A newer epoch on a write (not claimed by an Epoch frame) is refused too.
        assert!(matches!(
            decide(&mut v, &write(1, 0, 1, 6)),
            Decision::Reply(_)
        ));
        assert_eq!(v.applied(), 0);
    }

    #[test]
    fn a_newer_epoch_is_adopted_once_durable_and_then_fences_the_old_primary() {
        let mut v = volume();
        let claim = frame_bytes(
            Header {
                epoch: 6,
                request_id: 9,
                ..Header::new(Kind::Epoch)
            },
            &[],
        );
        assert_eq!(
            decide(&mut v, &claim),
            Decision::PersistEpoch {
                epoch: 6,
                request_id: 9,
                base: 0
            }
        );
        assert_eq!(v.epoch(), 5, "not before it is durable");
        let ok = v.epoch_durable(6, 9, 0);
        with_frame(&ok, |frame| {
            assert_eq!(
                (frame.kind(), frame.epoch(), frame.request_id()),
                (Kind::EpochOk, 6, 9)
            );
        });
        // The deposed primary's write (epoch 5) is refused from now on.
        assert!(matches!(
            decide(&mut v, &write(1, 0, 1, 5)),
            Decision::Reply(_)
        ));
        assert!(matches!(
            decide(&mut v, &write(1, 0, 1, 6)),
            Decision::Submit(_)
        ));
    }

    #[test]
    fn a_stream_starts_after_the_primarys_base_and_no_gap_below_it_is_waited_for() {
        // A replica that restarted knows writes up to 0; the primary resumes after 10 (what
        // it lacks below is in the primary's dirty regions).
        let mut v = volume();
        let claim = frame_bytes(
            Header {
                epoch: 5,
                sequence: 10,
                request_id: 1,
                ..Header::new(Kind::Epoch)
            },
            &[],
        );
        let Decision::Reply(ok) = decide(&mut v, &claim) else {
            panic!("the current epoch is answered at once")
        };
        with_frame(&ok, |frame| {
            assert_eq!((frame.kind(), frame.sequence()), (Kind::EpochOk, 10))
        });
        let Decision::Submit(io) = decide(&mut v, &write(11, 0, 1, 5)) else {
            panic!()
        };
        v.completed(&io, true, &[]);
        assert_eq!(v.applied(), 11, "no gap below the base");
    }

    #[test]
    fn a_flush_short_of_a_failed_write_runs_once_nothing_is_in_flight_and_says_so() {
        let mut v = volume();
        let Decision::Submit(w1) = decide(&mut v, &write(1, 0, 1, 5)) else {
            panic!()
        };
        let Decision::Submit(w2) = decide(&mut v, &write(2, 1, 1, 5)) else {
            panic!()
        };
        v.completed(&w2, true, &[]);
        assert!(!v.flush_ready(2), "write 1 is in flight");
        // Write 1 fails here: write 2 is done but nothing applies it past the gap.
        v.completed(&w1, false, &[]);
        assert_eq!(v.applied(), 0);
        assert!(v.flush_ready(2), "nothing left in flight to wait for");
        let flush = Io {
            kind: IoKind::Flush,
            arrival: 0,
            request_id: 3,
            lba: 0,
            blocks: 0,
            sequence: v.applied(),
            fua: false,
            trace: None,
        };
        let (ack, _) = v.completed(&flush, true, &[]);
        with_frame(&ack, |frame| {
            assert_eq!(
                (frame.kind(), frame.header.status, frame.sequence()),
                (Kind::FlushAck, status::OK, 0),
                "durable up to 0: short of 2, which the primary counts as failed here"
            )
        });
    }

    #[test]
    fn a_probe_names_each_region_written_with_its_highest_sequence() {
        // 4 MiB in 1 MiB regions.
        let mut v = volume();
        v.track_regions(20);
        for (sequence, lba) in [(1, 0), (2, 300), (3, 5)] {
            let Decision::Submit(io) = decide(&mut v, &write(sequence, lba, 1, 5)) else {
                panic!()
            };
            v.completed(&io, true, &[]);
        }
        let probe = frame_bytes(
            Header {
                epoch: 5,
                lba: 0,
                block_count: 16,
                request_id: 7,
                ..Header::new(Kind::Probe)
            },
            &[],
        );
        assert_eq!(
            decide(&mut v, &probe),
            Decision::Probe {
                request_id: 7,
                first: 0,
                count: 16
            }
        );
        assert!(!v.writing());
        let reply = v.probe_reply(7, 0, 16);
        with_frame(&reply, |frame| {
            assert_eq!(frame.kind(), Kind::ProbeReply);
            assert_eq!(
                (frame.header.lba, frame.header.block_count),
                (0, 4),
                "the volume has 4 regions"
            );
            let pairs: Vec<(u64, u64)> = frame
                .probe_entries()
                .unwrap()
                .map(|entry| (entry.region, entry.sequence))
                .collect();
            assert_eq!(pairs, vec![(0, 3), (1, 2)]);
        });
    }

    #[test]
    fn a_new_copy_says_so_once_and_a_raised_epoch_fences_older_frames() {
        let mut v = ReplicaVolume::new(0, 0, BLOCK, 1024, 0, 16);
        v.mark_new_copy();
        let ok = v.epoch_durable(1, 3, 0);
        with_frame(&ok, |frame| {
            assert_eq!(frame.header.status, status::NEW_COPY)
        });
        let again = v.epoch_durable(1, 4, 0);
        with_frame(&again, |frame| assert_eq!(frame.header.status, status::OK));
        v.raise_epoch(2);
        assert!(matches!(
            decide(&mut v, &write(1, 0, 1, 1)),
            Decision::Reply(_)
        ));
    }

    #[test]
    fn writes_are_acknowledged_in_order_and_overlapping_ones_wait() {
        let mut v = volume();
        let Decision::Submit(first) = decide(&mut v, &write(1, 0, 2, 5)) else {
            panic!()
        };
        let Decision::Held(second) = decide(&mut v, &write(2, 1, 2, 5)) else {
            panic!("overlaps write 1")
        };
        let Decision::Submit(third) = decide(&mut v, &write(3, 10, 1, 5)) else {
            panic!()
        };
        let (ack, ready) = v.completed(&third, true, &[]);
        with_frame(&ack, |frame| {
            assert_eq!((frame.kind(), frame.sequence()), (Kind::Ack, 3))
        });
        assert!(ready.is_empty());
        assert_eq!(v.applied(), 0, "3 is done but 1 and 2 are not");
        let (_, ready) = v.completed(&first, true, &[]);
        assert_eq!(ready, vec![2], "write 2 may run now");
        assert_eq!(v.applied(), 1);
        v.completed(&second, true, &[]);
        assert_eq!(v.applied(), 3);
    }

    #[test]
    fn a_flush_acknowledges_what_was_written_before_it_and_a_fua_write_itself() {
        let mut v = volume();
        let Decision::Submit(w1) = decide(&mut v, &write(1, 0, 1, 5)) else {
            panic!()
        };
        v.completed(&w1, true, &[]);
        let Decision::Submit(w2) = decide(&mut v, &write(2, 1, 1, 5)) else {
            panic!()
        };
        // A flush of writes up to 2 arrives while write 2 is in flight: it waits for it.
        let flush = frame_bytes(
            Header {
                epoch: 5,
                sequence: 2,
                request_id: 7,
                ..Header::new(Kind::Flush)
            },
            &[],
        );
        let Decision::Submit(mut f) = decide(&mut v, &flush) else {
            panic!()
        };
        assert_eq!(f.sequence, 2);
        assert!(!v.flush_ready(f.sequence), "write 2 is not applied yet");
        v.completed(&w2, true, &[]);
        assert!(v.flush_ready(f.sequence));
        // The service submits it now: it covers what is applied.
        f.sequence = v.applied();
        let (ack, _) = v.completed(&f, true, &[]);
        with_frame(&ack, |frame| {
            assert_eq!((frame.kind(), frame.sequence()), (Kind::FlushAck, 2))
        });
        assert_eq!(v.durable(), 2);
        let fua = frame_bytes(
            Header {
                epoch: 5,
                sequence: 3,
                lba: 2,
                block_count: 1,
                fua: true,
                ..Header::new(Kind::Write)
            },
            &[0; BLOCK as usize],
        );
        let Decision::Submit(w3) = decide(&mut v, &fua) else {
            panic!()
        };
        v.completed(&w3, true, &[]);
        assert_eq!(v.durable(), 3);
    }

    #[test]
    fn out_of_range_wrong_sized_and_out_of_order_requests_are_answered_or_close_the_session() {
        let mut v = volume();
        let Decision::Reply(reply) = decide(&mut v, &write(1, 1020, 8, 5)) else {
            panic!()
        };
        with_frame(&reply, |frame| {
            assert_eq!(frame.header.status, status::OUT_OF_RANGE)
        });
        let short = frame_bytes(
            Header {
                epoch: 5,
                sequence: 1,
                lba: 0,
                block_count: 2,
                ..Header::new(Kind::Write)
            },
            &[0; BLOCK as usize],
        );
        let Decision::Close(reason) = decide(&mut v, &short) else {
            panic!()
        };
        assert!(reason.contains("4096 bytes, not 8192"), "{reason}");
        assert!(matches!(
            decide(&mut v, &write(2, 0, 1, 5)),
            Decision::Submit(_)
        ));
        let Decision::Close(reason) = decide(&mut v, &write(2, 5, 1, 5)) else {
            panic!()
        };
        assert!(reason.contains("sequence order"), "{reason}");
        let ack = frame_bytes(
            Header {
                epoch: 5,
                ..Header::new(Kind::Ack)
            },
            &[],
        );
        assert!(matches!(decide(&mut v, &ack), Decision::Close(_)));
    }

    #[test]
    fn a_read_returns_the_data_with_the_replicas_applied_sequence() {
        let mut v = volume();
        let read = frame_bytes(
            Header {
                epoch: 5,
                lba: 3,
                block_count: 1,
                request_id: 4,
                ..Header::new(Kind::Read)
            },
            &[],
        );
        let Decision::Submit(io) = decide(&mut v, &read) else {
            panic!()
        };
        let data = vec![7u8; BLOCK as usize];
        let (reply, _) = v.completed(&io, true, &data);
        with_frame(&reply, |frame| {
            assert_eq!(
                (frame.kind(), frame.header.lba, frame.request_id()),
                (Kind::ReadReply, 3, 4)
            );
            assert_eq!(frame.payload, &data[..]);
        });
    }
}
