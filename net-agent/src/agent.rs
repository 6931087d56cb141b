//! `p2p-usb-agent serve`: the server-side network agent. It holds no device
//! access of its own; it reaches devices only through the helper socket.

use std::path::PathBuf;
use std::time::Duration;

use p2p_usb_common::config::{ConfigFile, ServerConfig};
use p2p_usb_common::service::{self, Watchdog};
use tokio::sync::watch;

use crate::helper_link::{self, HelperState};

/// How long start-up waits for the helper before reporting READY anyway,
/// with a STATUS saying what it is waiting for.
pub const READY_WAIT: Duration = Duration::from_secs(10);

/// Paths the agent uses, from the config unless overridden on the command line
/// (the template units pass per-instance paths).
#[derive(Debug, Clone)]
pub struct AgentPaths {
    pub helper_socket: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
}

impl AgentPaths {
    /// Config values with command-line overrides applied.
    pub fn resolve(
        config: &ServerConfig,
        helper_socket: Option<PathBuf>,
        state_dir: Option<PathBuf>,
        control_socket: Option<PathBuf>,
    ) -> Self {
        AgentPaths {
            helper_socket: helper_socket.unwrap_or_else(|| config.helper.socket.clone()),
            state_dir: state_dir.unwrap_or_else(|| config.agent.state_dir.clone()),
            control_socket: control_socket.unwrap_or_else(|| config.agent.control_socket.clone()),
        }
    }
}

fn status_line(state: &HelperState, paths: &AgentPaths) -> String {
    match state {
        HelperState::Connected { devices, .. } => {
            format!("helper connected: {} device(s)", devices.len())
        }
        HelperState::Waiting { reason } => format!(
            "waiting for helper at {}: {reason}",
            paths.helper_socket.display()
        ),
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn serve(config: &ConfigFile<ServerConfig>, paths: &AgentPaths) {
    let _ = config;
    let mut helper: watch::Receiver<HelperState> =
        helper_link::supervise(paths.helper_socket.clone());
    let (watchdog, mut liveness) = Watchdog::from_env();
    if let Some(watchdog) = watchdog {
        tracing::info!(
            "watchdog enabled: pinging every {:?} while healthy",
            watchdog.interval()
        );
        tokio::spawn(watchdog.run());
    }
    let stop = service::stop_signal();
    tokio::pin!(stop);
    let ready_wait = tokio::time::sleep(READY_WAIT);
    tokio::pin!(ready_wait);
    let mut ready = false;
    let signal = loop {
        tokio::select! {
            signal = &mut stop => break signal,
            changed = helper.changed() => {
                if changed.is_err() {
                    break "helper supervisor ended";
                }
                let state = helper.borrow_and_update().clone();
                let status = status_line(&state, paths);
                if !ready && matches!(state, HelperState::Connected { .. }) {
                    ready = true;
                    service::notify_ready(&status);
                    tracing::info!("ready: {status}");
                } else {
                    service::notify_status(&status);
                }
            }
            _ = &mut ready_wait, if !ready => {
                ready = true;
                let status = status_line(&helper.borrow(), paths);
                service::notify_ready(&status);
                tracing::warn!("ready without the helper: {status}");
            }
            Some(check) = liveness.recv() => check.alive(),
        }
    };
    tracing::info!("{signal}: stopping");
    service::notify_stopping("stopping");
    if let HelperState::Connected { link, .. } = &*helper.borrow() {
        link.close();
    }
}
