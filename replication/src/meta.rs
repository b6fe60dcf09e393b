//! A replicated volume's crash-safe metadata: who it belongs to, its epoch and role, and which
//! of its regions a replica may lack. Sans-IO: blocks in, blocks out; the node writes them with
//! FUA to the metadata area right after the volume's data on its device.
//!
//! **The superblock** is kept twice, in blocks 0 and 1 of the area, written alternately: the
//! copy a write replaces is the older one, so a crash in the middle of a write leaves the other
//! intact. Each copy has a generation (one more at every write) and a CRC32C; on start the node
//! reads both and keeps the valid copy of the higher generation ([`Superblock::newest`]). A
//! block of 4096 bytes, little-endian:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "FATHOMSB"
//!      8     4  version (1)
//!     12     4  crc32c of the block with this field zero
//!     16     8  generation
//!     24    16  volume uuid (made when the volume's first primary formats it)
//!     40    48  volume name (UTF-8, zero padded)
//!     88     8  epoch
//!     96     1  role: 0 none, 1 primary, 2 replica
//!     97     1  in-sync replicas (0 to 7)
//!     98     1  log2 of the region size in bytes (resync and reconciliation work per region)
//!     99     5  reserved (zero)
//!    104     8  highest write sequence applied here
//!    112     8  highest write sequence durable here
//!    120    48  primary's node id
//!    168   336  in-sync replicas' node ids, 7 x 48
//!    504  3592  reserved (zero)
//! ```
//!
//! **Dirty regions** ([`DirtyMap`]): one bit per region, set before a write to the region is
//! sent to a replica and cleared once every replica has it durably (activity-log semantics:
//! a bit set in memory is written with FUA before the write it covers goes out, so after a
//! crash every region a replica may lack is marked).

use crc32c::crc32c;

pub const BLOCK_BYTES: usize = 4096;
pub const MAGIC: [u8; 8] = *b"FATHOMSB";
pub const VERSION: u32 = 1;
/// Node ids and volume names, as stored.
pub const NAME_BYTES: usize = 48;
/// In-sync replicas a superblock lists, the primary among them.
pub const MAX_IN_SYNC: usize = 7;

mod at {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const CRC: usize = 12;
    pub const GENERATION: usize = 16;
    pub const UUID: usize = 24;
    pub const NAME: usize = 40;
    pub const EPOCH: usize = 88;
    pub const ROLE: usize = 96;
    pub const IN_SYNC: usize = 97;
    pub const REGION_SHIFT: usize = 98;
    pub const RESERVED: usize = 99;
    pub const APPLIED: usize = 104;
    pub const DURABLE: usize = 112;
    pub const PRIMARY: usize = 120;
    pub const IN_SYNC_IDS: usize = 168;
    pub const END: usize = 504;
}

/// A volume's role on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not serving it (a new or wiped copy, or fenced).
    None,
    Primary,
    Replica,
}

/// Why a metadata block was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("metadata block is {len} bytes, not {BLOCK_BYTES}")]
    Size { len: usize },
    #[error("no superblock here (magic {found:?}): a new or wiped volume copy")]
    NoSuperblock { found: [u8; 8] },
    #[error("superblock version {found}; this node reads version {VERSION}: run the fathom-node that wrote it")]
    Version { found: u32 },
    #[error("superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): a torn or damaged write")]
    Checksum { stored: u32, computed: u32 },
    #[error("superblock field {field} is invalid: {what}")]
    Field { field: &'static str, what: String },
    #[error("{what} {value:?} does not fit in a superblock: {limit}")]
    TooLong {
        what: &'static str,
        value: String,
        limit: &'static str,
    },
    #[error("neither superblock copy is valid (copy 0: {first}; copy 1: {second})")]
    NoValidCopy {
        first: Box<MetaError>,
        second: Box<MetaError>,
    },
}

/// What a node knows of one replicated volume, kept crash-safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// One more at every write; the higher of two valid copies is current.
    pub generation: u64,
    pub uuid: [u8; 16],
    pub volume: String,
    pub epoch: u64,
    pub role: Role,
    pub region_shift: u8,
    /// Highest write sequence applied, and durable, on this node.
    pub applied: u64,
    pub durable: u64,
    pub primary: String,
    pub in_sync: Vec<String>,
}

impl Superblock {
    /// The block that holds it, or why it cannot be stored.
    pub fn encode(&self) -> Result<[u8; BLOCK_BYTES], MetaError> {
        let mut block = [0u8; BLOCK_BYTES];
        block[at::MAGIC..at::MAGIC + 8].copy_from_slice(&MAGIC);
        block[at::VERSION..at::VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
        block[at::GENERATION..at::GENERATION + 8].copy_from_slice(&self.generation.to_le_bytes());
        block[at::UUID..at::UUID + 16].copy_from_slice(&self.uuid);
        put_name(
            &mut block[at::NAME..at::NAME + NAME_BYTES],
            "volume name",
            &self.volume,
        )?;
        block[at::EPOCH..at::EPOCH + 8].copy_from_slice(&self.epoch.to_le_bytes());
        block[at::ROLE] = match self.role {
            Role::None => 0,
            Role::Primary => 1,
            Role::Replica => 2,
        };
        if self.in_sync.len() > MAX_IN_SYNC {
            return Err(MetaError::TooLong {
                what: "in-sync set",
                value: self.in_sync.join(","),
                limit: "at most 7 replicas",
            });
        }
        block[at::IN_SYNC] = self.in_sync.len() as u8;
        if !(9..=40).contains(&self.region_shift) {
            return Err(MetaError::Field {
                field: "region_shift",
                what: format!(
                    "{} is not a region size of 512 B to 1 TiB",
                    self.region_shift
                ),
            });
        }
        block[at::REGION_SHIFT] = self.region_shift;
        block[at::APPLIED..at::APPLIED + 8].copy_from_slice(&self.applied.to_le_bytes());
        block[at::DURABLE..at::DURABLE + 8].copy_from_slice(&self.durable.to_le_bytes());
        put_name(
            &mut block[at::PRIMARY..at::PRIMARY + NAME_BYTES],
            "primary",
            &self.primary,
        )?;
        for (index, node) in self.in_sync.iter().enumerate() {
            let from = at::IN_SYNC_IDS + index * NAME_BYTES;
            put_name(&mut block[from..from + NAME_BYTES], "in-sync node", node)?;
        }
        let crc = crc32c(&block);
        block[at::CRC..at::CRC + 4].copy_from_slice(&crc.to_le_bytes());
        Ok(block)
    }

    /// The superblock in `block` (untrusted: a torn write, another version, garbage).
    pub fn decode(block: &[u8]) -> Result<Superblock, MetaError> {
        if block.len() != BLOCK_BYTES {
            return Err(MetaError::Size { len: block.len() });
        }
        let magic: [u8; 8] = block[at::MAGIC..at::MAGIC + 8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(MetaError::NoSuperblock { found: magic });
        }
        let version =
            u32::from_le_bytes(block[at::VERSION..at::VERSION + 4].try_into().expect("4"));
        if version != VERSION {
            return Err(MetaError::Version { found: version });
        }
        let stored = u32::from_le_bytes(block[at::CRC..at::CRC + 4].try_into().expect("4"));
        let mut copy = [0u8; BLOCK_BYTES];
        copy.copy_from_slice(block);
        copy[at::CRC..at::CRC + 4].fill(0);
        let computed = crc32c(&copy);
        if stored != computed {
            return Err(MetaError::Checksum { stored, computed });
        }
        let u64_at =
            |offset: usize| u64::from_le_bytes(block[offset..offset + 8].try_into().expect("8"));
        let field = |field: &'static str, what: String| MetaError::Field { field, what };
        let role = match block[at::ROLE] {
            0 => Role::None,
            1 => Role::Primary,
            2 => Role::Replica,
            other => return Err(field("role", format!("{other} is not 0, 1 or 2"))),
        };
        let in_sync = block[at::IN_SYNC] as usize;
        if in_sync > MAX_IN_SYNC {
            return Err(field(
                "in_sync",
                format!("{in_sync} replicas, at most {MAX_IN_SYNC}"),
            ));
        }
        let region_shift = block[at::REGION_SHIFT];
        if !(9..=40).contains(&region_shift) {
            return Err(field(
                "region_shift",
                format!("{region_shift} is out of 9..=40"),
            ));
        }
        if block[at::RESERVED..at::APPLIED]
            .iter()
            .chain(&block[at::END..])
            .any(|&b| b != 0)
        {
            return Err(field("reserved", "reserved bytes are not zero".into()));
        }
        let name =
            |from: usize, what: &'static str| get_name(&block[from..from + NAME_BYTES], what);
        Ok(Superblock {
            generation: u64_at(at::GENERATION),
            uuid: block[at::UUID..at::UUID + 16].try_into().expect("16 bytes"),
            volume: name(at::NAME, "volume name")?,
            epoch: u64_at(at::EPOCH),
            role,
            region_shift,
            applied: u64_at(at::APPLIED),
            durable: u64_at(at::DURABLE),
            primary: name(at::PRIMARY, "primary")?,
            in_sync: (0..in_sync)
                .map(|index| name(at::IN_SYNC_IDS + index * NAME_BYTES, "in-sync node"))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The current superblock from the area's two copies: the valid one of the higher
    /// generation, and which copy it was (0 or 1).
    pub fn newest(first: &[u8], second: &[u8]) -> Result<(Superblock, usize), MetaError> {
        match (Superblock::decode(first), Superblock::decode(second)) {
            (Ok(a), Ok(b)) if b.generation > a.generation => Ok((b, 1)),
            (Ok(a), _) => Ok((a, 0)),
            (Err(_), Ok(b)) => Ok((b, 1)),
            (Err(first), Err(second)) => Err(MetaError::NoValidCopy {
                first: Box::new(first),
                second: Box::new(second),
            }),
        }
    }

    /// The next version to write, with the generation raised, and the copy (0 or 1) it
    /// replaces: never the one read last, which stays valid until the new one is durable.
    pub fn next(&self, current_copy: usize) -> (Superblock, usize) {
        let next = Superblock {
            generation: self.generation + 1,
            ..self.clone()
        };
        (next, 1 - current_copy.min(1))
    }
}

fn put_name(field: &mut [u8], what: &'static str, name: &str) -> Result<(), MetaError> {
    if name.len() > field.len() || name.as_bytes().contains(&0) {
        return Err(MetaError::TooLong {
            what,
            value: name.into(),
            limit: "at most 48 bytes, no NUL",
        });
    }
    field[..name.len()].copy_from_slice(name.as_bytes());
    Ok(())
}

fn get_name(field: &[u8], what: &'static str) -> Result<String, MetaError> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    if field[end..].iter().any(|&b| b != 0) {
        return Err(MetaError::Field {
            field: what,
            what: "bytes after its end are not zero".into(),
        });
    }
    String::from_utf8(field[..end].to_vec()).map_err(|_| MetaError::Field {
        field: what,
        what: "not UTF-8".into(),
    })
}

/// One bit per region of a volume: the regions a replica may lack. Kept in memory and in
/// whole 4 KiB blocks on the device (block `n` holds regions `n * 32768 ..`); a changed block
/// is written before the IO that needed the change goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    bits: Vec<u64>,
    regions: u64,
    /// Blocks changed since [`DirtyMap::take_changed`].
    changed: Vec<bool>,
}

/// Regions per bitmap block.
pub const REGIONS_PER_BLOCK: u64 = BLOCK_BYTES as u64 * 8;

impl DirtyMap {
    pub fn new(regions: u64) -> Self {
        Self {
            bits: vec![0; regions.div_ceil(64) as usize],
            regions,
            changed: vec![false; regions.div_ceil(REGIONS_PER_BLOCK) as usize],
        }
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Blocks the map takes on the device.
    pub fn blocks(&self) -> usize {
        self.changed.len()
    }

    /// Marks `region`; true if it was clean (its block must be written before the IO goes).
    pub fn set(&mut self, region: u64) -> bool {
        assert!(region < self.regions, "region {region} of {}", self.regions);
        let (word, bit) = ((region / 64) as usize, region % 64);
        let was = self.bits[word] & (1 << bit) != 0;
        self.bits[word] |= 1 << bit;
        if !was {
            self.changed[(region / REGIONS_PER_BLOCK) as usize] = true;
        }
        !was
    }

    /// Clears `region`; true if it was dirty.
    pub fn clear(&mut self, region: u64) -> bool {
        assert!(region < self.regions, "region {region} of {}", self.regions);
        let (word, bit) = ((region / 64) as usize, region % 64);
        let was = self.bits[word] & (1 << bit) != 0;
        self.bits[word] &= !(1 << bit);
        if was {
            self.changed[(region / REGIONS_PER_BLOCK) as usize] = true;
        }
        was
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        region < self.regions && self.bits[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    /// Dirty regions, in order.
    pub fn dirty(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(word, &bits)| {
            (0..64)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| word as u64 * 64 + bit)
        })
    }

    pub fn count(&self) -> u64 {
        self.bits.iter().map(|bits| bits.count_ones() as u64).sum()
    }

    /// The blocks changed since the last call, to be written.
    pub fn take_changed(&mut self) -> Vec<usize> {
        let changed = (0..self.changed.len())
            .filter(|&b| self.changed[b])
            .collect();
        self.changed.fill(false);
        changed
    }

    /// Bitmap block `index` as stored.
    pub fn block(&self, index: usize) -> [u8; BLOCK_BYTES] {
        let mut block = [0u8; BLOCK_BYTES];
        let words = BLOCK_BYTES / 8;
        for (slot, word) in self.bits.iter().skip(index * words).take(words).enumerate() {
            block[slot * 8..slot * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        block
    }

    /// Reads bitmap block `index` back; bits beyond the volume's regions must be zero.
    pub fn load_block(&mut self, index: usize, block: &[u8]) -> Result<(), MetaError> {
        if block.len() != BLOCK_BYTES {
            return Err(MetaError::Size { len: block.len() });
        }
        let words = BLOCK_BYTES / 8;
        for slot in 0..words {
            let word = u64::from_le_bytes(block[slot * 8..slot * 8 + 8].try_into().expect("8"));
            let at = index * words + slot;
            let first_region = at as u64 * 64;
            let valid = self.regions.saturating_sub(first_region).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            if word & !mask != 0 {
                return Err(MetaError::Field {
                    field: "dirty bitmap",
                    what: format!(
                        "block {index} marks regions beyond the volume's {}",
                        self.regions
                    ),
                });
            }
            if let Some(bits) = self.bits.get_mut(at) {
                *bits = word;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn superblock() -> Superblock {
        Superblock {
            generation: 7,
            uuid: *b"0123456789abcdef",
            volume: "vol0".into(),
            epoch: 3,
            role: Role::Replica,
            region_shift: 20,
            applied: 1000,
            durable: 990,
            primary: "n1".into(),
            in_sync: vec!["n1".into(), "n2".into(), "n3".into()],
        }
    }

    #[test]
    fn a_superblock_round_trips_and_its_layout_is_as_documented() {
        let block = superblock().encode().unwrap();
        assert_eq!(&block[..8], b"FATHOMSB");
        assert_eq!(block[at::ROLE], 2);
        assert_eq!(&block[at::PRIMARY..at::PRIMARY + 3], b"n1\0");
        assert_eq!(u64::from_le_bytes(block[88..96].try_into().unwrap()), 3);
        assert_eq!(Superblock::decode(&block).unwrap(), superblock());
    }

    #[test]
    fn a_torn_or_foreign_block_is_refused_with_the_reason() {
        let block = superblock().encode().unwrap();
        let mut torn = block;
        torn[2000] ^= 1;
        assert!(matches!(
            Superblock::decode(&torn),
            Err(MetaError::Checksum { .. })
        ));
        assert!(matches!(
            Superblock::decode(&[0u8; BLOCK_BYTES]),
            Err(MetaError::NoSuperblock { .. })
        ));
        assert!(matches!(
            Superblock::decode(&block[..100]),
            Err(MetaError::Size { len: 100 })
        ));
        let mut other = block;
        other[8] = 2;
        assert!(matches!(
            Superblock::decode(&other),
            Err(MetaError::Version { found: 2 })
        ));
        let long = Superblock {
            volume: "v".repeat(49),
            ..superblock()
        };
        assert!(matches!(long.encode(), Err(MetaError::TooLong { .. })));
    }

    #[test]
    fn the_newer_valid_copy_wins_and_a_write_replaces_the_other() {
        let old = superblock();
        let (new, copy) = old.next(0);
        assert_eq!((new.generation, copy), (8, 1));
        let (a, b) = (old.encode().unwrap(), new.encode().unwrap());
        assert_eq!(Superblock::newest(&a, &b).unwrap(), (new.clone(), 1));
        // The write of the new copy was torn: the old one stands.
        let mut torn = b;
        torn[100] ^= 0xff;
        assert_eq!(Superblock::newest(&a, &torn).unwrap(), (old, 0));
        assert!(matches!(
            Superblock::newest(&[0u8; BLOCK_BYTES], &torn),
            Err(MetaError::NoValidCopy { .. })
        ));
    }

    #[test]
    fn dirty_regions_are_set_cleared_and_stored_per_block() {
        let mut map = DirtyMap::new(100_000);
        assert_eq!(map.blocks(), 4);
        assert!(map.set(5));
        assert!(!map.set(5), "already dirty: no write needed");
        assert!(map.set(40_000));
        assert_eq!(map.take_changed(), vec![0, 1]);
        assert_eq!(map.dirty().collect::<Vec<_>>(), vec![5, 40_000]);
        assert!(map.clear(5));
        assert_eq!(map.take_changed(), vec![0]);
        let mut loaded = DirtyMap::new(100_000);
        for block in 0..map.blocks() {
            loaded.load_block(block, &map.block(block)).unwrap();
        }
        assert_eq!(loaded.dirty().collect::<Vec<_>>(), vec![40_000]);
        // A block marking regions beyond the volume is refused.
        let mut bad = [0u8; BLOCK_BYTES];
        bad[BLOCK_BYTES - 1] = 0x80;
        assert!(DirtyMap::new(100_000).load_block(3, &bad).is_err());
    }

    proptest! {
        #[test]
        fn any_block_decodes_or_is_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), BLOCK_BYTES)) {
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn any_single_bit_flip_is_caught(byte in 0..BLOCK_BYTES, bit in 0..8u8) {
            let mut block = superblock().encode().unwrap();
            block[byte] ^= 1 << bit;
            prop_assert!(Superblock::decode(&block).is_err());
        }
    }
}
