//! `p2p-usb-helper`: the minimal process that holds USB device access for
//! p2p-usb. It has no network code at all; it serves devices inside its
//! configured share ceiling to local peers allowed by kernel credentials, over
//! the socket systemd activates for it.

pub mod backend;
pub mod privileges;
pub mod server;
pub mod sim;
pub mod transfer;
pub mod usbfs;

use std::path::{Path, PathBuf};

use p2p_usb_common::access::AccessList;
use p2p_usb_common::config::{self, ConfigError};
use p2p_usb_common::exit;
use p2p_usb_common::service::{self, ListenError, Watchdog};

use crate::backend::{Backend, BackendError};
use crate::privileges::PrivilegeError;
use crate::server::Helper;

/// How the helper was asked to run.
#[derive(Debug, Clone)]
pub struct HelperOptions {
    /// Explicit `--config`; `None` picks the credential or the default path.
    pub config: Option<PathBuf>,
    /// Listen here when not socket-activated.
    pub listen: Option<PathBuf>,
    /// Development only: allow running as root.
    pub allow_root: bool,
}

/// Everything that makes the helper exit with an error.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

impl HelperError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            HelperError::Config(_) => exit::CONFIG,
            HelperError::Privileges(PrivilegeError::Root) => exit::NOPERM,
            HelperError::Privileges(_) => exit::OS,
            HelperError::Listen(_) => exit::OS,
            HelperError::Backend(_) => exit::UNAVAILABLE,
            HelperError::Runtime(_) => exit::OS,
        }
    }
}

/// Runs the helper until SIGTERM/SIGINT.
pub fn run(options: HelperOptions) -> Result<(), HelperError> {
    let path = config::server_config_path(options.config.as_deref());
    let file = config::load_server_config(&path)?;
    let target = p2p_usb_common::logging::init(Some(file.value.server.log_level), "p2p-usb-helper");
    let report = privileges::drop_privileges(options.allow_root)?;
    tracing::info!(config = %path.display(), log = ?target, "p2p-usb-helper {} starting; {report}", env!("CARGO_PKG_VERSION"));
    for note in file.inert_settings() {
        tracing::warn!("{note}");
    }
    let access = AccessList::resolve(
        &file,
        &file.value.helper.allowed_users,
        &file.value.helper.allowed_groups,
    )?;
    tracing::info!("helper socket peers allowed: {access}");
    let ceiling: Vec<_> = file
        .value
        .helper
        .share
        .iter()
        .map(|r| r.get_ref().clone())
        .collect();
    if ceiling.is_empty() {
        tracing::warn!(
            "no [[helper.share]] rule in {}: no device will be shared",
            path.display()
        );
    }

    let runtime = service::runtime().map_err(HelperError::Runtime)?;
    runtime.block_on(async {
        let listener = match service::activated_unix_listener("helper")? {
            Some(listener) => {
                // The path agents are told to use: --listen (the instance
                // units pass theirs), else the configuration's.
                let (expected, named_by) = match &options.listen {
                    Some(listen) => (listen.clone(), "--listen".to_string()),
                    None => (
                        file.value.helper.socket.clone(),
                        format!("[helper] socket in {}", path.display()),
                    ),
                };
                let activated = listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(Path::to_path_buf));
                match activated {
                    Some(activated) if activated != expected => tracing::warn!(
                        "listening on {} (passed by systemd), but {named_by} is {}: \
                         agents told that path find no helper; \
                         make ListenStream= and {named_by} name the same path",
                        activated.display(),
                        expected.display()
                    ),
                    Some(activated) => tracing::info!(
                        socket = %activated.display(),
                        "listening on the socket passed by systemd"
                    ),
                    None => tracing::info!("listening on the socket passed by systemd"),
                }
                listener
            }
            None => {
                let path = options
                    .listen
                    .clone()
                    .unwrap_or_else(|| file.value.helper.socket.clone());
                let listener = service::bind_unix_listener(&path, 0o660)?;
                tracing::info!(socket = %path.display(), "listening");
                listener
            }
        };
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|source| ListenError::Bind {
                path: "activated socket".into(),
                source,
            })?;
        let backend = Backend::start(&file.value)?;
        let (watchdog, liveness) = Watchdog::from_env();
        if let Some(watchdog) = watchdog {
            tracing::info!(
                "watchdog enabled: pinging every {:?} while healthy",
                watchdog.interval()
            );
            tokio::spawn(watchdog.run());
        }
        let helper = Helper::new(backend, ceiling, access);
        helper
            .serve(listener, liveness, service::stop_signal())
            .await;
        tracing::info!("stopped");
        Ok(())
    })
}
