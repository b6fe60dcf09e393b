//! fathom-node: the storage node.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use fathom_drivers::vfio::bind::System;
use fathom_engine::config::{Config, DEFAULT_CONFIG};
use fathom_engine::{Engine, PageKind};
use fathom_frontend::nbd::NbdServer;
use signal_hook::consts::{SIGINT, SIGTERM};

/// The Fathom storage node: serves volumes from NVMe devices through a polled-mode,
/// kernel-bypass data path, one pinned reactor per configured core.
///
/// With no --config it runs the embedded default (print it with --print-config): one `mem`
/// device (the in-process NVMe controller) on a sparse file under /var/lib/fathom, no etcd.
///
/// DMA memory comes from 2 MiB hugepages. Reserve them first:
///
///   sysctl -w vm.nr_hugepages=64
///
/// or run with --no-hugepages (normal pages: slower, for hosts without hugepages).
/// SIGINT or SIGTERM flushes every volume and stops the node cleanly.
///
/// For the vfio driver, `fathom-node devices` lists the host's NVMe controllers and moves
/// them between the kernel and vfio-pci.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (default: the embedded single-node config).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides node.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides dma.hugepages = false: DMA memory on normal pages.
    #[arg(long)]
    no_hugepages: bool,
    /// Prints the embedded default configuration and exits.
    #[arg(long)]
    print_config: bool,
    /// Checks the configuration and exits without starting.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Lists NVMe controllers (PCI address, driver, IOMMU group, model, block devices and
    /// what uses them); `bind` hands one to vfio-pci for the vfio driver, `release` gives it
    /// back to the kernel's nvme driver. Binding needs root, the IOMMU on (intel_iommu=on or
    /// amd_iommu=on) and the vfio-pci module loaded.
    #[command(verbatim_doc_comment)]
    Devices {
        #[command(subcommand)]
        action: Option<DevicesAction>,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
enum DevicesAction {
    /// Unbinds the controller from its kernel driver and binds it to vfio-pci. Refused while
    /// any of its namespaces or partitions is mounted, used as swap or held by dm/md.
    Bind {
        /// PCI address, e.g. 0000:00:04.0
        address: String,
    },
    /// Gives the controller back to the kernel's nvme driver.
    Release {
        /// PCI address, e.g. 0000:00:04.0
        address: String,
    },
}

fn devices(action: Option<DevicesAction>, json: bool) -> Result<()> {
    let system = System::default();
    let functions = match action {
        None => system.nvme_functions()?,
        Some(DevicesAction::Bind { address }) => vec![system.bind(&address, "vfio-pci")?],
        Some(DevicesAction::Release { address }) => vec![system.bind(&address, "nvme")?],
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&functions)?);
        return Ok(());
    }
    if functions.is_empty() {
        println!("no NVMe controllers on the PCI bus");
        return Ok(());
    }
    println!(
        "{:<14} {:<9} {:<10} {:>5}  {:<8} {:<24} block devices / in use",
        "ADDRESS", "VID:DID", "DRIVER", "GROUP", "CTRL", "MODEL"
    );
    for f in &functions {
        let group = f.iommu_group.map_or("-".to_string(), |g| g.to_string());
        let mut uses = f.block_devices.join(" ");
        if !f.in_use.is_empty() {
            uses += &format!(" [{}]", f.in_use.join("; "));
        }
        println!(
            "{:<14} {:04x}:{:04x} {:<10} {:>5}  {:<8} {:<24} {}",
            f.address,
            f.vendor,
            f.device,
            f.driver.as_deref().unwrap_or("-"),
            group,
            f.controller.as_deref().unwrap_or("-"),
            f.model.as_deref().unwrap_or("-"),
            if uses.is_empty() { "-" } else { &uses }
        );
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(error) = run(Args::parse()) {
        eprintln!("fathom-node: {error:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if let Some(Command::Devices { action, json }) = args.command {
        return devices(action, json);
    }
    if args.print_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let mut config = match &args.config {
        Some(path) => Config::load(path).with_context(|| format!("loading {}", path.display()))?,
        None => Config::embedded_default(),
    };
    if let Some(dir) = args.data_dir {
        config.node.data_dir = dir;
    }
    if args.no_hugepages {
        config.dma.hugepages = false;
    }
    config.validate().context("checking the configuration")?;
    if args.check {
        println!("configuration is valid");
        return Ok(());
    }
    // Signals are caught from here on, so a signal during start-up still stops cleanly.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;

    let engine = Engine::start(&config).context("starting the engine")?;
    log_layout(&engine, &config);
    std::fs::create_dir_all(&config.node.data_dir).with_context(|| {
        format!(
            "creating the data directory {} for the control socket (set node.data_dir, or --data-dir)",
            config.node.data_dir.display()
        )
    })?;
    // Replication before the front end: a primary takes its epoch and a replica fences its
    // client IO before any client is served.
    // With a control plane (`[cluster] etcd`), etcd grants the epochs and names the primaries.
    let control_plane = fathom_cluster::agent::Settings::from_config(&config, &engine);
    let authority = control_plane
        .as_ref()
        .map(fathom_cluster::agent::EtcdAuthority::new)
        .transpose()
        .context("starting the control plane")?;
    let replication = fathom_replication::node::Replication::start(
        &engine,
        &config,
        authority.clone().map(|authority| {
            authority as std::sync::Arc<dyn fathom_replication::authority::EpochAuthority>
        }),
    )
    .context("starting replication")?
    .map(std::sync::Arc::new);
    let health = match config.health.enabled(config.telemetry.enabled) {
        true => Some(
            fathom::health::monitor::HealthMonitor::start(
                engine.clone(),
                replication.clone(),
                &config.health,
                &config.node.id,
                config.region_path(),
                config.node.data_dir.clone(),
            )
            .context("starting volume health")?,
        ),
        false => None,
    };
    let health_shared = health.as_ref().map(|health| health.shared());
    let control_path = fathom_control::socket_path(&config.node.data_dir);
    let control = fathom_control::server::ControlServer::start(
        &control_path,
        std::sync::Arc::new(
            fathom::node_control::NodeControl::new(engine.clone())
                .with_replication(replication.clone())
                .with_health(health_shared.clone()),
        ),
    )
    .with_context(|| format!("serving the control socket {}", control_path.display()))?;
    tracing::info!(
        "control: {} (owner only; `fathom-ctl --node {}`)",
        control.path().display(),
        config.node.data_dir.display()
    );
    let _metrics = if config.telemetry.enabled && !config.telemetry.metrics.is_empty() {
        let listen = config.telemetry.metrics.parse().expect("validated");
        let (node, replication, health, served) = (
            config.node.id.clone(),
            replication.clone(),
            health_shared.clone(),
            engine.clone(),
        );
        let extra: Option<fathom::metrics::ExtraMetrics> =
            (replication.is_some() || health.is_some()).then(|| {
                std::sync::Arc::new(move || {
                    let mut text = replication
                        .as_ref()
                        .map_or_else(String::new, |replication| {
                            fathom::metrics::replication_metrics(&node, &replication.roles())
                        });
                    if let Some(health) = &health {
                        // The status is up to a second old: a volume deleted since is gone.
                        let mut status = health.status.lock().clone();
                        let live = served.volumes();
                        status
                            .volumes
                            .retain(|volume| live.iter().any(|live| live.name == volume.volume));
                        text += &fathom::metrics::health_metrics(&status);
                    }
                    text
                }) as fathom::metrics::ExtraMetrics
            });
        let server =
            fathom::metrics::MetricsServer::start_with(listen, config.region_path(), extra)
                .with_context(|| {
                    format!("serving metrics on {listen} (set telemetry.metrics, or \"\" for none)")
                })?;
        tracing::info!("Prometheus metrics on http://{}/metrics", server.address());
        Some(server)
    } else {
        None
    };
    // The front end before the control plane: volumes the control plane makes or deletes
    // are exported or withdrawn as they come and go.
    let nbd = if config.nbd.listen.is_empty() {
        tracing::info!("NBD: not serving (nbd.listen = [])");
        None
    } else {
        let server = NbdServer::start(&engine, &config.nbd).context("starting the NBD server")?;
        let scheme = match (&config.nbd.tls_cert, config.nbd.tls_required) {
            (Some(cert), true) => {
                tracing::info!("NBD: TLS required (certificate {})", cert.display());
                "nbds"
            }
            (Some(cert), false) => {
                tracing::info!("NBD: TLS offered (certificate {})", cert.display());
                "nbd"
            }
            (None, _) => "nbd",
        };
        for address in server.addresses() {
            let exports: Vec<String> = engine
                .volumes()
                .iter()
                .map(|volume| format!("{scheme}://{address}/{}", volume.name))
                .collect();
            tracing::info!("NBD: serving {} on {address}", exports.join(" "));
        }
        Some(std::sync::Arc::new(server))
    };
    let agent = match (control_plane, authority, &replication) {
        (Some(settings), Some(authority), Some(replication)) => {
            tracing::info!(
                "cluster: control plane on etcd {} (cluster {:?}, lease {} s)",
                settings.endpoints.join(","),
                settings.cluster,
                settings.lease.as_secs()
            );
            Some(
                fathom_cluster::agent::Agent::start(
                    settings,
                    authority,
                    replication.clone(),
                    Some({
                        let (node, replication) = (config.node.id.clone(), replication.clone());
                        Box::new(move || {
                            let rows =
                                fathom::node_control::replication_rows(&node, &replication.roles());
                            serde_json::to_value(rows).unwrap_or_default()
                        })
                    }),
                    &engine,
                    nbd.clone().map(|server| {
                        std::sync::Arc::new(NbdExports(server))
                            as std::sync::Arc<dyn fathom_cluster::provision::Frontends>
                    }),
                )
                .context("starting the control plane")?,
            )
        }
        _ => None,
    };
    tracing::info!("node {} ready; SIGINT or SIGTERM stops it", config.node.id);

    let signal = signals.forever().next().unwrap_or(SIGTERM);
    let name = if signal == SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    tracing::info!(
        "{name}: flushing {} volumes and stopping",
        engine.volumes().len()
    );
    if let Some(nbd) = nbd {
        let open = nbd.connections();
        if !nbd.stop(Duration::from_secs(5)) {
            tracing::warn!("NBD: connections still open after 5 s; stopping the engine anyway");
        } else if open > 0 {
            tracing::info!("NBD: closed {open} client connections");
        }
    }
    // Then the control plane: this node's primaries stop acknowledging and its lease ends, so
    // that other nodes take its volumes over now rather than after the lease's TTL.
    drop(agent);
    drop(health);
    if let Some(replication) = &replication {
        if !replication.stop(Duration::from_secs(5)) {
            tracing::warn!(
                "replication: sessions still open after 5 s; stopping the engine anyway"
            );
        }
    }
    control.stop();
    engine.shutdown().context("shutting down")?;
    tracing::info!(
        "node {} stopped cleanly: volumes flushed, queues deleted, devices shut down",
        config.node.id
    );
    Ok(())
}

/// The NBD server told of volumes the control plane makes and deletes.
struct NbdExports(std::sync::Arc<NbdServer>);

impl fathom_cluster::provision::Frontends for NbdExports {
    fn added(&self, volume: &fathom_engine::Volume) {
        match self.0.add_export(volume) {
            Ok(()) => tracing::info!(
                "NBD: serving volume {} (made through the control plane)",
                volume.name
            ),
            Err(error) => tracing::error!("NBD: cannot serve volume {}: {error:#}", volume.name),
        }
    }

    fn removing(&self, name: &str) {
        if !self.0.remove_export(name, Duration::from_secs(5)) {
            tracing::warn!("NBD: clients of volume {name} still had IO in flight after 5 s; deleting it anyway");
        }
    }
}

fn log_layout(engine: &Engine, config: &Config) {
    let clock = engine.clock();
    tracing::info!(
        "fathom-node {} id={} reactors on cores {:?} (poll {:?}), clock {:?} at {:.3} GHz",
        env!("CARGO_PKG_VERSION"),
        config.node.id,
        engine.cores(),
        config.reactor.poll,
        clock.source(),
        clock.hz() as f64 / 1e9
    );
    let pages = match engine.dma().kind() {
        PageKind::Huge => "2 MiB hugepages",
        PageKind::Normal => "normal pages (dma.hugepages = false): slower, not for production",
    };
    tracing::info!("DMA memory: {} MiB on {pages}", engine.dma().len() >> 20);
    match engine.stats_region() {
        Some(region) => tracing::info!(
            "telemetry: stats region {} (read it with `fathom-stat --region {}`), clock {:?}",
            region.path().display(),
            region.path().display(),
            clock.source()
        ),
        None => tracing::warn!(
            "telemetry is off (telemetry.enabled = false): no stage latencies, no fathom-stat"
        ),
    }
    for (info, device) in engine.devices().zip(&config.devices) {
        let path = || {
            let name = device
                .path
                .clone()
                .unwrap_or_else(|| format!("{}.img", device.name).into());
            config.node.data_dir.join(name).display().to_string()
        };
        // What the device runs on, in the driver's own terms.
        let backing = match (device.driver, device.media) {
            (fathom_engine::config::DriverKind::Vfio, _) => format!(
                "userspace NVMe through VFIO at {}",
                device.pci.as_deref().unwrap_or_default()
            ),
            (fathom_engine::config::DriverKind::Uring, _) => {
                let polling = match (device.sqpoll, device.iopoll) {
                    (false, false) => String::new(),
                    (sqpoll, iopoll) => format!(", sqpoll {sqpoll}, iopoll {iopoll}"),
                };
                format!("io_uring O_DIRECT on {}{polling}", path())
            }
            (_, Some(fathom_engine::config::MediaKind::File)) => {
                format!("{:?} controller, file media {}", device.mode, path())
            }
            (_, Some(media)) => format!(
                "{:?} controller, {} media",
                device.mode,
                format!("{media:?}").to_lowercase()
            ),
            (_, None) => format!("{:?} controller", device.mode),
        };
        let namespaces: Vec<String> = info
            .namespaces
            .iter()
            .map(|ns| format!("ns{} {} x {} B", ns.nsid, ns.blocks, ns.block_size))
            .collect();
        tracing::info!(
            "device {}: driver {}, {backing}, model {:?} serial {:?}, {}, max transfer {} KiB, {} injection rules",
            info.name,
            info.driver,
            info.model,
            info.serial,
            namespaces.join(", "),
            info.max_transfer_bytes >> 10,
            device.inject.len()
        );
    }
    for volume in engine.volumes() {
        tracing::info!(
            "volume {}: {} MiB on {} ns{} from LBA {}, {}-byte blocks, core {}",
            volume.name,
            volume.size_bytes() >> 20,
            volume.device_name,
            volume.nsid,
            volume.first_lba,
            volume.block_size,
            volume.core
        );
    }
}
