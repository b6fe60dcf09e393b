//! `fathom-stat top`: a live full-screen view of a node, in the spirit of `spdk_top`.
//!
//! One row per volume and op with rates, per-second peaks and the percentiles of one stage
//! (cycle with `s`), then each device queue's busy time, then each volume's health (state,
//! sign, peer ratio, smoke write, canary, cause and the first reason) when the node judges
//! it. Keys: `q`/Esc quit, `s` next stage,
//! `a` show idle rows too.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::Frame;

use crate::health::monitor::{read_status, NodeHealth};
use crate::stat::{duration, quantity, Follower, Observation};
use crate::text::{canary_text, peer_ratio_text};
use fathom_telemetry::report::IntervalReport;

struct View {
    report: Option<IntervalReport>,
    /// The node's health status, or why there is none to show.
    health: Result<Option<NodeHealth>, String>,
    note: String,
    stage: usize,
    all: bool,
}

/// Runs until `q`; `every` is the refresh interval.
pub fn run(path: &Path, every: Duration) -> Result<()> {
    let mut follower = Follower::new(path)?;
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        let mut view = View {
            report: None,
            health: Ok(None),
            note: format!("reading {}", path.display()),
            stage: 4,
            all: false,
        };
        let sub_interval = every.min(Duration::from_secs(1));
        loop {
            let started = Instant::now();
            let mut samples = follower.begin();
            let mut next_sample = started + sub_interval;
            // Keys are handled while the interval runs; samples are taken every sub-interval.
            while started.elapsed() < every {
                terminal.draw(|frame| draw(frame, &view, path))?;
                let wait = next_sample
                    .saturating_duration_since(Instant::now())
                    .min(every.saturating_sub(started.elapsed()));
                if event::poll(wait)? {
                    if let Event::Key(key) = event::read()? {
                        if key.kind == KeyEventKind::Press {
                            match key.code {
                                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                                KeyCode::Char('s') => view.stage += 1,
                                KeyCode::Char('a') => view.all = !view.all,
                                _ => {}
                            }
                        }
                    }
                }
                if Instant::now() >= next_sample {
                    next_sample += sub_interval;
                    if let (Some(samples), Some(sample)) = (samples.as_mut(), follower.sample()) {
                        samples.push(sample);
                    }
                }
            }
            let observation = match samples {
                Some(samples) if samples.len() > 1 => follower.finish(samples, view.all),
                Some(_) => continue,
                None => follower.try_open(),
            };
            match observation {
                Observation::Report { report, .. } => {
                    view.report = Some(report);
                    view.health = read_status(path);
                    view.note.clear();
                }
                Observation::Note(note) if !note.is_empty() => view.note = note,
                Observation::Note(_) => {}
            }
        }
    })();
    ratatui::restore();
    result
}

fn draw(frame: &mut Frame, view: &View, path: &Path) {
    let [title, volumes, queues, health, help] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Fill(2),
        Constraint::Fill(1),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let Some(report) = &view.report else {
        frame.render_widget(
            Paragraph::new(format!(
                "fathom-stat top: {}\n{}",
                path.display(),
                view.note
            )),
            title,
        );
        return;
    };
    let stage_names: Vec<&str> = report
        .volumes
        .first()
        .map(|row| row.stages.iter().map(|s| s.stage.as_str()).collect())
        .unwrap_or_default();
    let stage = if stage_names.is_empty() {
        0
    } else {
        view.stage % stage_names.len()
    };
    let stage_name = stage_names.get(stage).copied().unwrap_or("total");
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(format!(
                "fathom-stat top  node {}  interval {:.2}s  stage: {stage_name}",
                report.node, report.interval_s
            )),
            Line::from(view.note.clone()),
        ]),
        title,
    );
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let header = Row::new([
        "volume",
        "op",
        "IOPS",
        "peak/s",
        "MiB/s",
        "peak MiB/s",
        "errors",
        "mean",
        "p50",
        "p99",
        "p99.9",
        "max",
    ])
    .style(bold);
    let rows = report.volumes.iter().map(|row| {
        let latency = row.stages.get(stage);
        let cell = |value: Option<f64>| value.map(duration).unwrap_or_default();
        Row::new(vec![
            row.volume.clone(),
            row.op.clone(),
            quantity(row.iops),
            quantity(row.peak_iops),
            format!("{:.1}", row.bw_bytes / (1 << 20) as f64),
            format!("{:.1}", row.peak_bw_bytes / (1 << 20) as f64),
            row.errors.to_string(),
            cell(latency.map(|s| s.mean_ns)),
            cell(latency.map(|s| s.p50_ns)),
            cell(latency.map(|s| s.p99_ns)),
            cell(latency.map(|s| s.p999_ns)),
            cell(latency.map(|s| s.max_ns)),
        ])
    });
    let widths = [12, 12, 9, 9, 10, 10, 7, 9, 9, 9, 9, 9].map(Constraint::Length);
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::TOP).title(" volumes ")),
        volumes,
    );
    let header =
        Row::new(["device", "core", "busy%", "idle%", "submitted", "completed"]).style(bold);
    let rows = report.queues.iter().map(|queue| {
        Row::new(vec![
            queue.device.clone(),
            queue.core.to_string(),
            format!("{:.1}", queue.busy_pct),
            format!("{:.1}", queue.idle_pct),
            quantity(queue.submitted as f64),
            quantity(queue.completed as f64),
        ])
    });
    let widths = [12, 6, 8, 8, 10, 10].map(Constraint::Length);
    frame.render_widget(
        Table::new(rows, widths).header(header).block(
            Block::default()
                .borders(Borders::TOP)
                .title(" device queues "),
        ),
        queues,
    );
    draw_health(frame, &view.health, health);
    frame.render_widget(
        Paragraph::new("q quit   s next stage   a show idle rows"),
        help,
    );
}

fn draw_health(
    frame: &mut Frame,
    health: &Result<Option<NodeHealth>, String>,
    area: ratatui::layout::Rect,
) {
    let block = |title: String| Block::default().borders(Borders::TOP).title(title);
    let status = match health {
        Ok(Some(status)) => status,
        Ok(None) => {
            frame.render_widget(
                Paragraph::new("no health status: the node runs without health")
                    .block(block(" health ".into())),
                area,
            );
            return;
        }
        Err(error) => {
            frame.render_widget(
                Paragraph::new(error.clone()).block(block(" health ".into())),
                area,
            );
            return;
        }
    };
    let title = match &status.node_fault {
        Some(fault) => format!(" health  NODE FAULT: {fault} "),
        None => " health ".into(),
    };
    let header = Row::new([
        "volume",
        "role",
        "health",
        "sign",
        "peer p50 p99",
        "smoke",
        "canary",
        "cause",
        "why",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = status.volumes.iter().map(|volume| {
        let inputs = &volume.inputs;
        let (ratio, canary) = (peer_ratio_text(inputs), canary_text(volume));
        let why = volume
            .reasons
            .first()
            .or_else(|| {
                volume
                    .canary
                    .as_ref()
                    .and_then(|canary| canary.reasons.first())
            })
            .or_else(|| volume.drift.first())
            .cloned()
            .unwrap_or_default();
        Row::new(vec![
            volume.volume.clone(),
            volume.role.clone(),
            volume.health.clone(),
            volume.sign.clone(),
            ratio,
            inputs.smoke_ms.map_or("-".into(), |ms| duration(ms * 1e6)),
            canary.into(),
            volume.cause.clone(),
            why,
        ])
    });
    let widths = [12, 8, 11, 6, 19, 9, 9, 11, 80].map(Constraint::Length);
    frame.render_widget(
        Table::new(rows, widths).header(header).block(block(title)),
        area,
    );
}
