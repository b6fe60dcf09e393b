//! Text for people: aligned tables and the units storage engineers read, shared by the
//! command-line tools (`fathom-ctl`, `fathom-stat`).

use fathom_control::proto::ReplicationRow;

/// Columns aligned on their widest cell; numbers right-aligned.
pub struct Table {
    headers: Vec<&'static str>,
    numeric: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, bool)]) -> Self {
        Self {
            headers: columns.iter().map(|(header, _)| *header).collect(),
            numeric: columns.iter().map(|(_, numeric)| *numeric).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let last = cells.len() - 1;
            let mut text = String::new();
            for (index, cell) in cells.into_iter().enumerate() {
                let width = widths[index];
                if index > 0 {
                    text.push_str("  ");
                }
                if self.numeric[index] {
                    text.push_str(&format!("{cell:>width$}"));
                } else if index == last {
                    text.push_str(cell);
                } else {
                    text.push_str(&format!("{cell:<width$}"));
                }
            }
            text.truncate(text.trim_end().len());
            text.push('\n');
            text
        };
        let mut text = line(self.headers.clone());
        for row in &self.rows {
            text.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        text
    }
}

/// Bytes in binary units: exact ones without decimals (4KiB), others with one (1.5GiB).
pub fn bytes_text(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift {
            return if bytes.is_multiple_of(1 << shift) {
                format!("{}{unit}", bytes >> shift)
            } else {
                format!("{:.1}{unit}", bytes as f64 / (1u64 << shift) as f64)
            };
        }
    }
    format!("{bytes}B")
}

/// A duration in ns, with the unit that suits it (`1.50 ms`, `12.3 us`).
pub fn duration_text(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} us", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Each volume's line, then on a primary one line per replica under it.
pub fn replication_table(rows: &[ReplicationRow]) -> String {
    if rows.is_empty() {
        return "no replicated volumes on this node\n".into();
    }
    let mut text = String::new();
    for row in rows {
        let mut volume = Table::new(&[
            ("VOLUME", false),
            ("ROLE", false),
            ("EPOCH", true),
            ("PRIMARY", false),
            ("SEQUENCE", true),
        ]);
        let role = match (row.fenced, row.role.as_str(), row.in_sync) {
            (true, ..) => format!("{} (fenced: another node took it over)", row.role),
            (false, "replica", false) => "replica (not in sync)".into(),
            (false, "primary", false) => "primary (taking its epoch: not serving yet)".into(),
            _ => row.role.clone(),
        };
        volume.row(vec![
            row.volume.clone(),
            role,
            row.epoch.to_string(),
            row.primary.clone(),
            row.sequence.to_string(),
        ]);
        text.push_str(&volume.render());
        if row.peers.is_empty() {
            continue;
        }
        let mut peers = Table::new(&[
            ("  REPLICA", false),
            ("STATE", false),
            ("IN_SYNC", false),
            ("ACKED", true),
            ("BEHIND", true),
            ("DIRTY", true),
            ("RESYNC", false),
        ]);
        for peer in &row.peers {
            peers.row(vec![
                format!("  {}", peer.node),
                peer.state.clone(),
                if peer.in_sync { "yes" } else { "no" }.into(),
                peer.acknowledged.to_string(),
                row.sequence.saturating_sub(peer.acknowledged).to_string(),
                bytes_text(peer.dirty_bytes),
                match peer.resync_left_bytes {
                    0 if peer.resynced_bytes == 0 => "-".into(),
                    0 => format!("done, {} copied", bytes_text(peer.resynced_bytes)),
                    left => format!(
                        "{} left, {} copied{}",
                        bytes_text(left),
                        bytes_text(peer.resynced_bytes),
                        match (row.resync_rate, row.resync_client_p99_us) {
                            (0, _) => String::new(),
                            (rate, 0) => format!(", at {}/s", bytes_text(rate)),
                            (rate, p99) => format!(
                                ", at {}/s (client write p99 {})",
                                bytes_text(rate),
                                duration_text(p99 as f64 * 1e3)
                            ),
                        }
                    ),
                },
            ]);
        }
        text.push_str(&peers.render());
    }
    text
}

/// `fathom-ctl cluster status`: the nodes with their leases, then each volume with its
/// placement, primary, epoch and in-sync copies, and its primary's view of its replicas.
pub fn cluster_status_text(report: &fathom_cluster::report::ClusterReport) -> String {
    let mut text = format!(
        "cluster {} (etcd {}, revision {})\n\n",
        report.cluster, report.endpoint, report.revision
    );
    let mut nodes = Table::new(&[
        ("NODE", false),
        ("LEASE", false),
        ("REPLICATION", false),
        ("NBD", false),
        ("PID", true),
        ("POOL_FREE", true),
        ("LARGEST", true),
    ]);
    for node in &report.nodes {
        nodes.row(vec![
            node.record.id.clone(),
            match node.lease_left_s {
                Some(left) => format!("{left}s of {}s", node.record.lease_ms / 1000),
                None => "?".into(),
            },
            node.record.replication.clone(),
            node.record.nbd.clone().unwrap_or_else(|| "-".into()),
            node.record.pid.to_string(),
            node.pool
                .map_or("-".into(), |pool| bytes_text(pool.free_bytes)),
            node.pool
                .map_or("-".into(), |pool| bytes_text(pool.largest_bytes)),
        ]);
    }
    match report.nodes.is_empty() {
        true => text.push_str("no node is registered (none runs, or none reaches etcd)\n"),
        false => text.push_str(&nodes.render()),
    }
    text.push('\n');
    text.push_str(&volume_list_text(report));
    for volume in &report.volumes {
        let Some(view) = &volume.primary_view else {
            continue;
        };
        if let Ok(row) = serde_json::from_value::<ReplicationRow>(view.clone()) {
            text.push('\n');
            text.push_str(&replication_table(&[row]));
        }
    }
    for refused in &report.refused {
        text.push_str(&format!("\nrefused under the prefix: {refused}\n"));
    }
    text
}

/// `fathom-ctl volume list`: one line per volume.
pub fn volume_list_text(report: &fathom_cluster::report::ClusterReport) -> String {
    if report.volumes.is_empty() {
        return format!("no volumes in cluster {}\n", report.cluster);
    }
    let mut table = Table::new(&[
        ("VOLUME", false),
        ("SIZE", true),
        ("REPLICAS", false),
        ("PRIMARY", false),
        ("EPOCH", true),
        ("IN_SYNC", false),
        ("STATE", false),
    ]);
    for volume in &report.volumes {
        let (size, replicas) = match &volume.spec {
            Some(spec) => (bytes_text(spec.size), spec.replicas.join(",")),
            None => ("?".into(), "?".into()),
        };
        let (primary, epoch, in_sync) = match &volume.state {
            Some(state) => (
                state.primary.clone(),
                state.epoch.to_string(),
                state.in_sync.join(","),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let serving = volume
            .primary_view
            .as_ref()
            .is_some_and(|view| view["in_sync"] == true && view["fenced"] == false);
        let state = match (&volume.state, volume.primary_alive, serving) {
            _ if volume.refused.is_some() => {
                "no valid state in etcd (refused below): nodes keep the last valid one".to_string()
            }
            (None, ..) => "no state yet (no node that holds it has started)".to_string(),
            (Some(_), false, _) => "primary's lease gone: failing over".into(),
            (Some(_), true, false) => "primary taking its epoch".into(),
            (Some(state), true, true) => {
                let copies = volume.spec.as_ref().map_or(0, |spec| spec.replicas.len());
                let mut text = match copies.saturating_sub(state.in_sync.len()) {
                    0 => "serving".to_string(),
                    behind => format!("serving, {behind} copy(ies) out of sync"),
                };
                // What the primary said of its resyncs.
                let peers = volume.primary_view.as_ref().map(|view| &view["peers"]);
                for peer in peers
                    .and_then(|peers| peers.as_array())
                    .into_iter()
                    .flatten()
                {
                    let left = peer["resync_left_bytes"].as_u64().unwrap_or(0);
                    let state = peer["state"].as_str().unwrap_or("?");
                    let node = peer["node"].as_str().unwrap_or("?");
                    match (state, left) {
                        ("open", 0) => {}
                        ("open", left) => {
                            text.push_str(&format!("; {node} resync {} left", bytes_text(left)))
                        }
                        (state, 0) => text.push_str(&format!("; {node} {state}")),
                        (state, left) => text.push_str(&format!(
                            "; {node} {state}, resync {} left",
                            bytes_text(left)
                        )),
                    }
                }
                text
            }
        };
        table.row(vec![
            volume.name.clone(),
            size,
            replicas,
            primary,
            epoch,
            in_sync,
            state,
        ]);
    }
    table.render()
}

/// `fathom-ctl health`: one line per volume (state, sign, the detector's main inputs, the
/// canary, drift), then why, under each volume that is not plainly fine.
pub fn health_text(health: &crate::health::monitor::NodeHealth) -> String {
    let mut text = String::new();
    if let Some(fault) = &health.node_fault {
        text.push_str(&format!("NODE FAULT: {fault}\n\n"));
    }
    if health.volumes.is_empty() {
        text.push_str("no volumes judged yet (the first verdict comes after two seconds)\n");
        return text;
    }
    let mut table = Table::new(&[
        ("VOLUME", false),
        ("ROLE", false),
        ("HEALTH", false),
        ("SIGN", false),
        ("SINCE", true),
        ("IOPS", true),
        ("P99", true),
        ("PEER p50 p99", true),
        ("IDLE%", true),
        ("SMOKE", true),
        ("CANARY", false),
        ("CAUSE", false),
        ("ACTIONS", false),
    ]);
    let us = |value: Option<f64>| value.map_or("-".into(), |us| duration_text(us * 1e3));
    for volume in &health.volumes {
        let inputs = &volume.inputs;
        let (ratio, canary) = (peer_ratio_text(inputs), canary_text(volume).to_string());
        let mut health_cell = volume.health.clone();
        if volume.replace {
            health_cell.push_str(" (replace)");
        }
        table.row(vec![
            volume.volume.clone(),
            volume.role.clone(),
            health_cell,
            volume.sign.clone(),
            format!("{}s", health.second.saturating_sub(volume.since)),
            format!("{:.0}", inputs.read_iops + inputs.write_iops),
            us(inputs.p99_us),
            ratio,
            inputs
                .device_idle_pct
                .map_or("-".into(), |idle| format!("{idle:.0}")),
            inputs
                .smoke_ms
                .map_or("-".into(), |ms| duration_text(ms * 1e6)),
            canary,
            if volume.cause.is_empty() {
                "-".into()
            } else {
                volume.cause.clone()
            },
            if volume.advise_only {
                "advise".into()
            } else {
                "act".into()
            },
        ]);
    }
    text.push_str(&table.render());
    for volume in &health.volumes {
        let mut lines: Vec<String> = volume.reasons.clone();
        if let Some(canary) = &volume.canary {
            lines.extend(
                canary
                    .reasons
                    .iter()
                    .map(|reason| format!("canary: {reason}")),
            );
        }
        lines.extend(volume.drift.iter().map(|reason| format!("drift: {reason}")));
        if let Some(action) = &volume.last_action {
            lines.push(format!("action: {action}"));
        }
        let inputs = &volume.inputs;
        if let Some(after) = inputs.hedge_after_us {
            lines.push(format!(
                "action: hedging reads to in-sync replicas after {after:.0} µs: {} asked of a replica, {} answered by it first",
                inputs.hedged_reads, inputs.hedge_wins
            ));
        }
        if !lines.is_empty() {
            text.push_str(&format!("\n{}:\n", volume.volume));
            for line in lines {
                text.push_str(&format!("  {line}\n"));
            }
        }
    }
    text
}

/// A volume's peer ratios at p50 and p99, each over its healthy one (`0.95/0.88 1.20/1.10`;
/// `?` while it learns, `-` with none), as `fathom-ctl health` and `top` show them.
pub fn peer_ratio_text(inputs: &crate::health::monitor::Inputs) -> String {
    let cells: Vec<String> = inputs
        .peer_ratios
        .iter()
        .map(|peer| match (peer.ratio, peer.baseline) {
            (Some(ratio), Some(baseline)) => format!("{ratio:.2}/{baseline:.2}"),
            (Some(ratio), None) => format!("{ratio:.2}/?"),
            _ => "-".into(),
        })
        .collect();
    match cells.is_empty() {
        true => "-".into(),
        false => cells.join(" "),
    }
}

/// A volume's canary in a word: RED, learning, green, or `-` without one.
pub fn canary_text(volume: &crate::health::monitor::VolumeHealth) -> &'static str {
    match &volume.canary {
        None => "-",
        Some(canary) if canary.red => "RED",
        Some(canary) if !canary.learning.is_empty() => "learning",
        Some(_) => "green",
    }
}
