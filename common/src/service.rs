//! Service-manager glue shared by both daemons: sd-notify state, a watchdog
//! that only pings while the main loop proves it is alive, socket activation,
//! the stop signals, and the runtime every binary runs on.
//!
//! Outside systemd (no `NOTIFY_SOCKET`, no `WATCHDOG_USEC`, no `LISTEN_FDS`)
//! everything here is a no-op, so the same binaries run by hand.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{SockType, getsockopt, sockopt};
use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot};

/// The runtime each of the binaries runs on, built in one place so they
/// agree. Two workers: the daemons spend most of their time waiting on
/// sockets, and more threads only add hand-offs between them.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Tells the service manager start-up is complete.
pub fn notify_ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the one-line status shown by `systemctl status`.
pub fn notify_status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells the service manager a graceful stop has begun.
pub fn notify_stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// The main loop's side of the liveness check: it must answer every
/// [`LivenessCheck`] it receives, after checking whatever it depends on.
pub type LivenessRequests = mpsc::Receiver<LivenessCheck>;

/// One liveness question from the watchdog. Answer it with [`LivenessCheck::alive`];
/// dropping it unanswered withholds the next watchdog ping.
#[derive(Debug)]
pub struct LivenessCheck(oneshot::Sender<()>);

impl LivenessCheck {
    /// Confirms the main loop (and what it checked) is making progress.
    pub fn alive(self) {
        let _ = self.0.send(());
    }
}

/// The systemd watchdog. It pings at half of `WATCHDOG_USEC`, but only after
/// the main loop answered a liveness check: a timer that pings on its own
/// would keep a hung process alive forever.
#[derive(Debug)]
pub struct Watchdog {
    interval: Duration,
    checks: mpsc::Sender<LivenessCheck>,
}

impl Watchdog {
    /// The watchdog requested by the service manager, with the receiver the
    /// main loop must serve. `None` when no watchdog is configured; the
    /// receiver is then never fed.
    pub fn from_env() -> (Option<Watchdog>, LivenessRequests) {
        let (checks, requests) = mpsc::channel(1);
        let watchdog = sd_notify::watchdog_enabled().map(|timeout| Watchdog {
            interval: timeout / 2,
            checks,
        });
        (watchdog, requests)
    }

    /// How often a ping is due.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Runs until the main loop drops its [`LivenessRequests`].
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut withheld = false;
        loop {
            ticker.tick().await;
            let (answer, answered) = oneshot::channel();
            match self.checks.try_send(LivenessCheck(answer)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The previous check is still unanswered: the loop is stuck.
                    if !withheld {
                        tracing::error!(
                            "main loop is not answering liveness checks; withholding watchdog pings"
                        );
                        withheld = true;
                    }
                    continue;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
            match tokio::time::timeout(self.interval, answered).await {
                Ok(Ok(())) => {
                    if withheld {
                        tracing::info!("main loop answers liveness checks again");
                        withheld = false;
                    }
                    send(&[NotifyState::Watchdog]);
                }
                _ => {
                    if !withheld {
                        tracing::error!("liveness check failed; withholding watchdog pings");
                        withheld = true;
                    }
                }
            }
        }
    }
}

/// Errors finding or making the listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("socket activation: {0}")]
    Activation(io::Error),
    #[error("socket activation passed {count} sockets but none named {name:?} (names: {names})")]
    NotNamed {
        count: usize,
        name: String,
        names: String,
    },
    #[error("activated fd {fd} is not a listening Unix stream socket")]
    WrongSocket { fd: i32 },
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("{} is in use by a running process", path.display())]
    InUse { path: std::path::PathBuf },
}

/// The Unix listening socket systemd passed under `name` (its
/// `FileDescriptorName=`), or `None` if the process was not socket-activated.
/// A single unnamed socket is accepted too, for `systemd-socket-activate`
/// without `--fdname`.
pub fn activated_unix_listener(name: &str) -> Result<Option<UnixListener>, ListenError> {
    let fds: Vec<(i32, String)> = sd_notify::listen_fds_with_names()
        .map_err(ListenError::Activation)?
        .collect();
    let chosen = match fds.as_slice() {
        [] => return Ok(None),
        [(fd, n)] if n == name || n == "unknown" => *fd,
        many => match many.iter().find(|(_, n)| n == name) {
            Some((fd, _)) => *fd,
            None => {
                return Err(ListenError::NotNamed {
                    count: many.len(),
                    name: name.into(),
                    names: many
                        .iter()
                        .map(|(_, n)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                });
            }
        },
    };
    // SAFETY: systemd hands these fds to this process exactly once, and this
    // function is the only place that takes ownership of them.
    let fd = unsafe { OwnedFd::from_raw_fd(chosen) };
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let stream = getsockopt(&fd, sockopt::SockType).ok() == Some(SockType::Stream);
    let unix = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
    )
    .ok()
    .map(|addr| addr.as_unix_addr().is_some())
    .unwrap_or(false);

    if !(listening && stream && unix) {
        return Err(ListenError::WrongSocket { fd: chosen });
    }
    let listener = UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(ListenError::Activation)?;
    Ok(Some(listener))
}

/// Binds a Unix listening socket at `path` for running without systemd,
/// replacing a stale socket file but never one a live process listens on.
pub fn bind_unix_listener(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    let bind_err = |source| ListenError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(bind_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// Waits for SIGTERM (what `systemctl stop` sends) or SIGINT (Ctrl-C) and
/// returns the signal's name.
pub async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
