//! Replication on one node: at start, each replicated volume this node holds a copy of is
//! read from its metadata area (the superblock: epoch, role, primary), formatted if it is
//! new; the primary takes the next epoch durably and gets its [`ReplicationLayer`]; the
//! other copies are served to the primary by the replica service and refuse client IO.

use std::net::SocketAddr;
use std::sync::Arc;

use fathom_drivers::IoCommand;
use fathom_engine::config::{Config, MAX_REPLICAS};
use fathom_engine::engine::Engine;
use fathom_engine::layer::{ControlError, Down, Layer, LayerCtx, LayerName};
use fathom_engine::volume::{IoError, IoRequest, Volume};
use fathom_net::server::{self, Server, ServerError};
use fathom_net::transport::{self, TlsError};

use crate::auth::{AuthError, ClusterKey};
use crate::layer::{PeerAddress, ReplicationLayer, Settings, VolumeStatus};
use crate::meta::{MetaError, Role, Superblock, BLOCK_BYTES};
use crate::proto::MAX_PAYLOAD_LIMIT_BYTES;
use crate::service::{HeldVolume, ReplicaService, ReplicaStatus, SLOTS};
use crate::session::PeerAuth;

/// Why replication could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("replication.key_file: {0}")]
    Key(#[from] AuthError),
    #[error("replication TLS (replication.tls_ca, tls_cert, tls_key): {0}")]
    Tls(#[from] TlsError),
    #[error("volume {volume}: {what}")]
    Volume { volume: String, what: String },
    #[error("volume {volume}: its metadata: {source}")]
    Metadata {
        volume: String,
        #[source]
        source: MetaError,
    },
    #[error("volume {volume}: {source}")]
    Layer {
        volume: String,
        #[source]
        source: ControlError,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// What this node is for one replicated volume, live.
#[derive(Debug, Clone)]
pub enum CopyStatus {
    Primary(Arc<VolumeStatus>),
    Replica(Arc<ReplicaStatus>),
}

/// Replication running on this node. Dropping it stops the replica service.
pub struct Replication {
    server: Option<Server<ReplicaService>>,
    copies: Vec<CopyStatus>,
}

impl Replication {
    /// Starts replication for the replicated volumes of `config` this node holds; `None`
    /// when there are none.
    pub fn start(engine: &Engine, config: &Config) -> Result<Option<Self>, StartError> {
        let node = config.node.id.as_str();
        let mine: Vec<_> = config
            .volumes
            .iter()
            .filter(|volume| volume.replicas.iter().any(|replica| replica == node))
            .collect();
        if mine.is_empty() {
            return Ok(None);
        }
        let replication = &config.replication;
        let auth = match &replication.key_file {
            Some(path) => PeerAuth::Key(ClusterKey::load(path)?),
            None => PeerAuth::Tls,
        };
        let (server_tls, client_tls) = match (
            &replication.tls_ca,
            &replication.tls_cert,
            &replication.tls_key,
        ) {
            (Some(ca), Some(cert), Some(key)) => (
                Some(transport::server_config_mutual(cert, key, ca)?),
                Some(transport::client_config(ca, Some((cert, key)))?),
            ),
            _ => (None, None),
        };
        let region_shift = replication.region_size.0.trailing_zeros();
        let mut held = Vec::new();
        let mut copies = Vec::new();
        let mut max_payload = 0u32;
        for volume_config in mine {
            let name = volume_config.name.as_str();
            let volume_error = |what: String| StartError::Volume {
                volume: name.into(),
                what,
            };
            let volume = engine
                .volume(name)
                .ok_or_else(|| volume_error("not among the engine's volumes".into()))?
                .clone();
            let payload = volume
                .max_transfer_bytes
                .min(MAX_PAYLOAD_LIMIT_BYTES as usize - BLOCK_BYTES)
                as u32;
            max_payload = max_payload.max(payload);
            let first_primary = volume_config
                .primary
                .clone()
                .unwrap_or_else(|| volume_config.replicas[0].clone());
            let (superblock, copy) = read_superblock(engine, &volume, |block| Superblock {
                generation: 0,
                uuid: block,
                volume: name.into(),
                epoch: 0,
                role: Role::None,
                region_shift: region_shift as u8,
                applied: 0,
                durable: 0,
                primary: first_primary.clone(),
                in_sync: volume_config.replicas.clone(),
            })?;
            if superblock.volume != name {
                return Err(volume_error(format!(
                    "its metadata belongs to volume {:?}: the device range holds another volume's copy",
                    superblock.volume
                )));
            }
            if superblock.primary == node {
                // A primary that starts takes the next epoch, durably, before it serves: a
                // replica then refuses whatever its earlier incarnation still had in flight.
                let fresh = superblock.epoch == 0;
                let (mut next, copy) = superblock.next(copy);
                next.epoch += 1;
                next.role = Role::Primary;
                write_superblock(engine, &volume, &next, copy)?;
                // Each replica's dirty bitmap lies in the metadata area at its place in the
                // volume's replica list, whoever is primary.
                let bitmap_blocks = volume
                    .meta_blocks
                    .saturating_mul(volume.block_size as u64)
                    .saturating_sub(2 * BLOCK_BYTES as u64)
                    / (BLOCK_BYTES as u64 * MAX_REPLICAS as u64);
                let mut bitmap_lbas = Vec::new();
                let mut bitmaps = Vec::new();
                for (slot, _) in volume_config
                    .replicas
                    .iter()
                    .enumerate()
                    .filter(|(_, replica)| *replica != node)
                {
                    let first = 2 + slot as u64 * bitmap_blocks;
                    bitmap_lbas.push(
                        volume.first_lba
                            + volume.blocks
                            + first * BLOCK_BYTES as u64 / volume.block_size as u64,
                    );
                    let blocks = (0..bitmap_blocks)
                        .map(|block| {
                            read_metadata(engine, &volume, (first + block) * BLOCK_BYTES as u64)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    bitmaps.push(blocks);
                }
                let peers = volume_config
                    .replicas
                    .iter()
                    .filter(|replica| *replica != node)
                    .map(|replica| {
                        let entry = config
                            .cluster
                            .nodes
                            .iter()
                            .find(|entry| &entry.id == replica)
                            .expect("validated: replicas are cluster nodes");
                        let address: SocketAddr = entry
                            .replication
                            .parse()
                            .expect("validated: replication addresses parse");
                        PeerAddress {
                            node: replica.clone(),
                            address,
                        }
                    })
                    .collect();
                let layer = ReplicationLayer::new(Settings {
                    node: node.into(),
                    cluster: config.cluster.name.clone(),
                    auth: auth.clone(),
                    tls: client_tls.clone(),
                    volume: name.into(),
                    epoch: next.epoch,
                    first_lba: volume.first_lba,
                    blocks: volume.blocks,
                    block_size: volume.block_size,
                    region_shift,
                    sequence: next.applied,
                    peers,
                    max_payload: payload,
                    slots: engine.slots_per_reactor(),
                    pool: engine.dma().clone(),
                    resync_rate: replication.resync_rate.0,
                    bitmap_lbas,
                    bitmaps,
                    fresh,
                })
                .map_err(|error| volume_error(format!("cannot set up its sessions: {error}")))?;
                let status = layer.status();
                engine
                    .add_layer(&volume, Box::new(layer))
                    .map_err(|source| StartError::Layer {
                        volume: name.into(),
                        source,
                    })?;
                tracing::info!(volume = name, epoch = next.epoch, "replication: primary");
                copies.push(CopyStatus::Primary(status));
            } else {
                engine
                    .add_layer(
                        &volume,
                        Box::new(NotPrimary {
                            epoch: superblock.epoch,
                            primary: superblock.primary.clone(),
                        }),
                    )
                    .map_err(|source| StartError::Layer {
                        volume: name.into(),
                        source,
                    })?;
                tracing::info!(
                    volume = name,
                    epoch = superblock.epoch,
                    primary = %superblock.primary,
                    "replication: replica"
                );
                let status = Arc::new(ReplicaStatus::new(
                    name,
                    superblock.epoch,
                    superblock.applied,
                    &superblock.primary,
                ));
                copies.push(CopyStatus::Replica(status.clone()));
                held.push(HeldVolume {
                    status,
                    name: name.into(),
                    id: volume.id,
                    reactor: volume.reactor,
                    block_size: volume.block_size,
                    blocks: volume.blocks,
                    superblock,
                    copy,
                });
            }
        }
        let server = if held.is_empty() {
            None
        } else {
            let listeners =
                server::listen::<ReplicaService>(&replication.listen, "replication.listen")?;
            let service = ReplicaService::new(
                node,
                &config.cluster.name,
                auth,
                server_tls,
                max_payload,
                held,
            );
            let limits = server::Limits {
                max_connections: 64,
                max_buffer: max_payload.next_power_of_two().max(BLOCK_BYTES as u32),
                keep_buffers: SLOTS * max_payload as usize,
            };
            let server = Server::start(engine, listeners, service, limits)?;
            for address in server.addresses() {
                tracing::info!("replication: replica service on {address}");
            }
            Some(server)
        };
        Ok(Some(Self { server, copies }))
    }

    /// What this node is for each replicated volume it holds.
    pub fn copies(&self) -> &[CopyStatus] {
        &self.copies
    }

    /// Stops the replica service: its sessions close once their IO in flight is back. True
    /// when they did within `timeout`.
    pub fn stop(&self, timeout: std::time::Duration) -> bool {
        self.server
            .as_ref()
            .is_none_or(|server| server.stop(timeout))
    }

    /// The addresses the replica service listens on.
    pub fn addresses(&self) -> &[SocketAddr] {
        self.server
            .as_ref()
            .map_or(&[], |server| server.addresses())
    }
}

/// Reads the volume's two superblock copies; a copy never written (no superblock in either)
/// is formatted with `fresh` (given a new uuid) and written.
/// One 4 KiB block of the volume's metadata area, at byte `offset` in it.
fn read_metadata(engine: &Engine, volume: &Volume, offset: u64) -> Result<Vec<u8>, StartError> {
    let buf = engine
        .dma()
        .alloc(BLOCK_BYTES)
        .map_err(|error| StartError::Volume {
            volume: volume.name.clone(),
            what: format!("no DMA memory to read its metadata: {error}"),
        })?;
    let completion = engine.metadata_io(IoRequest::read(volume.id, offset, buf, 0));
    completion.result.map_err(|error| StartError::Volume {
        volume: volume.name.clone(),
        what: format!("reading its metadata at byte {offset}: {error}"),
    })?;
    Ok(completion.buf.expect("a read returns its buffer").to_vec())
}

fn read_superblock(
    engine: &Engine,
    volume: &Volume,
    fresh: impl FnOnce([u8; 16]) -> Superblock,
) -> Result<(Superblock, usize), StartError> {
    let (first, second) = (
        read_metadata(engine, volume, 0)?,
        read_metadata(engine, volume, BLOCK_BYTES as u64)?,
    );
    match Superblock::newest(&first, &second) {
        Ok(found) => Ok(found),
        Err(MetaError::NoValidCopy {
            first: a,
            second: b,
        }) if matches!(*a, MetaError::NoSuperblock { .. })
            && matches!(*b, MetaError::NoSuperblock { .. }) =>
        {
            let mut uuid = [0u8; 16];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut uuid).map_err(
                |_| StartError::Volume {
                    volume: volume.name.clone(),
                    what: "no randomness for its uuid".into(),
                },
            )?;
            let superblock = fresh(uuid);
            tracing::info!(volume = %volume.name, "replication: a new copy; formatting its metadata");
            write_superblock(engine, volume, &superblock, 0)?;
            Ok((superblock, 0))
        }
        Err(source) => Err(StartError::Metadata {
            volume: volume.name.clone(),
            source,
        }),
    }
}

/// Writes `superblock` into copy `copy` of the volume's metadata area, with FUA.
fn write_superblock(
    engine: &Engine,
    volume: &Volume,
    superblock: &Superblock,
    copy: usize,
) -> Result<(), StartError> {
    let block = superblock.encode().map_err(|source| StartError::Metadata {
        volume: volume.name.clone(),
        source,
    })?;
    let mut buf = engine
        .dma()
        .alloc(BLOCK_BYTES)
        .map_err(|error| StartError::Volume {
            volume: volume.name.clone(),
            what: format!("no DMA memory to write its superblock: {error}"),
        })?;
    buf.as_bytes_mut().copy_from_slice(&block);
    let request = IoRequest {
        fua: true,
        ..IoRequest::write(volume.id, (copy * BLOCK_BYTES) as u64, buf, 0)
    };
    engine
        .metadata_io(request)
        .result
        .map_err(|error| StartError::Volume {
            volume: volume.name.clone(),
            what: format!("writing its superblock: {error}"),
        })
}

/// A copy that is not the primary's: client IO (NBD) is refused with the primary's name;
/// the replica service's IO passes (it comes from inside the node, not a front end).
struct NotPrimary {
    epoch: u64,
    primary: String,
}

impl Layer for NotPrimary {
    fn layer(&self) -> LayerName {
        LayerName::Frontend
    }

    fn kind(&self) -> &'static str {
        "replica"
    }

    fn describe(&self) -> String {
        format!(
            "replica at epoch {}: client IO goes to the primary, {}",
            self.epoch, self.primary
        )
    }

    fn submit(&mut self, _ctx: &mut LayerCtx<'_>, _slot: u32, _command: &IoCommand) -> Down {
        Down::Complete(Err(IoError::NotPrimary { epoch: self.epoch }))
    }

    fn persistent(&self) -> bool {
        true
    }
}
