//! Logging set-up shared by every binary.
//!
//! Under systemd the output goes to journald with structured fields (a
//! `device` or `client` field becomes `DEVICE=`/`CLIENT=` in the journal, so
//! `journalctl CLIENT=...` works); anywhere else it is readable text on stderr.
//! Level precedence: `RUST_LOG` > the config file's `log_level` > `info`.

use std::os::fd::AsFd;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogLevel;

/// Where log records end up; reported once at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Journald,
    Stderr,
}

/// Installs the global subscriber. `identifier` is the journal's
/// `SYSLOG_IDENTIFIER`. Calling it twice is harmless (the first one wins).
pub fn init(config_level: Option<LogLevel>, identifier: &str) -> LogTarget {
    let default = config_level.unwrap_or_default().as_str();
    let (filter, bad_rust_log) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(default), Some(format!("{spec:?}: {e}"))),
        },
        _ => (EnvFilter::new(default), None),
    };

    let journald = stderr_is_journal()
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|layer| {
            layer
                .with_syslog_identifier(identifier.to_string())
                .with_field_prefix(None)
        });
    let target = if journald.is_some() {
        LogTarget::Journald
    } else {
        LogTarget::Stderr
    };
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init();
    if let Some(problem) = bad_rust_log {
        tracing::warn!("ignoring invalid RUST_LOG {problem}; using level {default}");
    }
    target
}

/// True when systemd connected our stderr to the journal: `JOURNAL_STREAM`
/// holds the device and inode of that stream (see systemd.exec(5)).
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(stat.st_dev) && ino.parse::<u64>().ok() == Some(stat.st_ino)
}
