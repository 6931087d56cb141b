//! Who may connect and which devices they see. Deny by default: a client is
//! served only if its EndpointId is approved (in `[security] approved_clients`
//! or by `p2p-usb-agent approve`) and not revoked; a device is offered only
//! if it is shared (`[usb] auto_share` or `p2p-usb-agent share`).
//!
//! `/etc/p2p-usb` is read-only to the agent, so runtime decisions live in its
//! state directory (`approvals.toml`, `pending.toml`, `shares.toml`) and
//! survive restarts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use iroh::EndpointId;
use p2p_usb_common::config::{ConfigError, ConfigFile, ServerConfig};
use p2p_usb_common::proto::DeviceKey;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Refused clients remembered for `pending` at most.
pub const PENDING_LIMIT: usize = 256;
use tokio::sync::watch;

use crate::net;

/// Why the policy state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Approvals made at run time; `revoked` also overrides the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Approvals {
    #[serde(default)]
    approved: BTreeSet<String>,
    #[serde(default)]
    revoked: BTreeSet<String>,
}

/// A client that knocked without being approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingClient {
    pub id: String,
    /// Seconds since the Unix epoch.
    pub first_seen: u64,
    pub last_seen: u64,
    pub attempts: u32,
    /// Where the last attempt came from (address or relay).
    pub address: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pending {
    #[serde(default)]
    clients: Vec<PendingClient>,
}

/// Explicit shares, and exceptions to `auto_share`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Shares {
    #[serde(default)]
    shared: BTreeSet<String>,
    #[serde(default)]
    unshared: BTreeSet<String>,
}

/// The agent's authorization and sharing decisions.
pub struct Policy {
    dir: PathBuf,
    configured: BTreeSet<EndpointId>,
    require_approval: bool,
    auto_share: bool,
    state: Mutex<State>,
    /// Held from taking a snapshot of the pending list until it is written,
    /// so writes land in order without holding `state` (which every
    /// connecting client needs) during file I/O. Taken before `state`.
    pending_file: Mutex<()>,
    /// Held by a decision (approve, revoke, share, unshare) from reading the
    /// current state until its file is written and the change committed: a
    /// decision takes effect only once it is on disk, and `state` is not
    /// held during the fsync. Taken before `pending_file` and `state`.
    deciding: Mutex<()>,
    /// Bumped on every change, so sessions re-check their client and devices.
    changed: watch::Sender<u64>,
}

struct State {
    approvals: Approvals,
    pending: Pending,
    shares: Shares,
}

impl Policy {
    /// Loads the policy: the config's approved ids (a malformed id is a
    /// config error with its line, never skipped) plus the state directory.
    pub fn load(
        config: &ConfigFile<ServerConfig>,
        state_dir: &Path,
    ) -> Result<Policy, PolicyLoadError> {
        let mut configured = BTreeSet::new();
        for entry in &config.value.security.approved_clients {
            let id = net::parse_endpoint_id(entry.get_ref())
                .map_err(|e| config.error_at(entry.span(), e))?;
            configured.insert(id);
        }
        let state = State {
            approvals: read_state(&state_dir.join("approvals.toml"))?,
            pending: read_advisory_state(&state_dir.join("pending.toml")),
            shares: read_state(&state_dir.join("shares.toml"))?,
        };
        Ok(Policy {
            dir: state_dir.to_path_buf(),
            configured,
            require_approval: config.value.security.require_approval,
            auto_share: config.value.usb.auto_share,
            state: Mutex::new(state),
            pending_file: Mutex::new(()),
            deciding: Mutex::new(()),
            changed: watch::channel(0).0,
        })
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// True if `id` may use this server now.
    pub fn is_approved(&self, id: &EndpointId) -> bool {
        let state = self.state.lock().expect("policy lock");
        let text = id.to_string();
        if state.approvals.revoked.contains(&text) {
            return false;
        }
        self.configured.contains(id) || state.approvals.approved.contains(&text)
    }

    /// Records a refused client for `pending`, when approval is required.
    pub fn record_refused(&self, id: &EndpointId, address: &str) -> Result<(), PolicyError> {
        if !self.require_approval {
            return Ok(());
        }
        let now = unix_now();
        let _writing = self.pending_file.lock().expect("pending file lock");
        let mut state = self.state.lock().expect("policy lock");
        let text = id.to_string();
        match state.pending.clients.iter_mut().find(|c| c.id == text) {
            Some(client) => {
                client.last_seen = now;
                client.attempts += 1;
                client.address = address.to_string();
            }
            None => {
                // Bounded: a peer minting new identities cannot grow the list
                // (or the file) without end; the longest-quiet entry goes.
                if state.pending.clients.len() >= PENDING_LIMIT
                    && let Some(oldest) = (0..state.pending.clients.len())
                        .min_by_key(|&i| state.pending.clients[i].last_seen)
                {
                    let dropped = state.pending.clients.remove(oldest);
                    tracing::debug!(client = %dropped.id, "pending list full; forgetting the longest-quiet entry");
                }
                state.pending.clients.push(PendingClient {
                    id: text,
                    first_seen: now,
                    last_seen: now,
                    attempts: 1,
                    address: address.to_string(),
                });
            }
        }
        let snapshot = state.pending.clone();
        drop(state);
        // Advisory data, written on every refused attempt: not synced.
        write_state(
            &self.dir.join("pending.toml"),
            &snapshot,
            Durability::Cached,
        )
    }

    /// Clients waiting for approval.
    pub fn pending(&self) -> Vec<PendingClient> {
        self.state
            .lock()
            .expect("policy lock")
            .pending
            .clients
            .clone()
    }

    /// Approves a client (and lifts an earlier revocation).
    pub fn approve(&self, id: &EndpointId) -> Result<(), PolicyError> {
        let text = id.to_string();
        let _deciding = self.deciding.lock().expect("decision lock");
        let mut approvals = self.state.lock().expect("policy lock").approvals.clone();
        approvals.revoked.remove(&text);
        approvals.approved.insert(text.clone());
        write_state(
            &self.dir.join("approvals.toml"),
            &approvals,
            Durability::Synced,
        )?;
        let _writing = self.pending_file.lock().expect("pending file lock");
        let pending = {
            let mut state = self.state.lock().expect("policy lock");
            state.approvals = approvals;
            state.pending.clients.retain(|c| c.id != text);
            state.pending.clone()
        };
        self.bump();
        // The approval stands; the pending list is advisory.
        if let Err(e) = write_state(&self.dir.join("pending.toml"), &pending, Durability::Cached) {
            tracing::warn!("{e}");
        }
        Ok(())
    }

    /// Revokes a client, including one approved in the config file.
    pub fn revoke(&self, id: &EndpointId) -> Result<(), PolicyError> {
        let text = id.to_string();
        let _deciding = self.deciding.lock().expect("decision lock");
        let mut approvals = self.state.lock().expect("policy lock").approvals.clone();
        approvals.approved.remove(&text);
        approvals.revoked.insert(text);
        write_state(
            &self.dir.join("approvals.toml"),
            &approvals,
            Durability::Synced,
        )?;
        self.state.lock().expect("policy lock").approvals = approvals;
        self.bump();
        Ok(())
    }

    /// True if the device is offered to approved clients.
    pub fn is_shared(&self, key: &DeviceKey) -> bool {
        let state = self.state.lock().expect("policy lock");
        let text = key.to_string();
        if self.auto_share {
            !state.shares.unshared.contains(&text)
        } else {
            state.shares.shared.contains(&text)
        }
    }

    /// Offers a device to approved clients.
    pub fn share(&self, key: &DeviceKey) -> Result<(), PolicyError> {
        self.set_shared(key, true)
    }

    /// Stops offering a device; clients using it lose it.
    pub fn unshare(&self, key: &DeviceKey) -> Result<(), PolicyError> {
        self.set_shared(key, false)
    }

    fn set_shared(&self, key: &DeviceKey, shared: bool) -> Result<(), PolicyError> {
        let text = key.to_string();
        let _deciding = self.deciding.lock().expect("decision lock");
        let mut shares = self.state.lock().expect("policy lock").shares.clone();
        if shared {
            shares.unshared.remove(&text);
            shares.shared.insert(text);
        } else {
            shares.shared.remove(&text);
            shares.unshared.insert(text);
        }
        write_state(&self.dir.join("shares.toml"), &shares, Durability::Synced)?;
        self.state.lock().expect("policy lock").shares = shares;
        self.bump();
        Ok(())
    }
}

/// Loading failures: the config (with its line) or the state files.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] PolicyError),
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_state<T: DeserializeOwned + Default>(path: &Path) -> Result<T, PolicyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| PolicyError::Read {
            path: path.to_path_buf(),
            reason: e.message().to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(PolicyError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Reads a file of advisory records (the pending list): one that cannot be
/// read, such as a file a power cut damaged, is reported and started afresh
/// instead of keeping the agent from starting.
fn read_advisory_state<T: DeserializeOwned + Default>(path: &Path) -> T {
    read_state(path).unwrap_or_else(|e| {
        tracing::warn!("{e}; starting with an empty list");
        T::default()
    })
}

/// Whether a state file must be on disk before it replaces the old one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Decisions (approvals, shares): a power cut leaves the old file or
    /// the new one, never an empty one.
    Synced,
    /// Advisory records, written often: the page cache will do.
    Cached,
}

/// Writes through a temporary file and a rename, so a crash never leaves a
/// half-written approval list.
fn write_state<T: Serialize>(
    path: &Path,
    value: &T,
    durability: Durability,
) -> Result<(), PolicyError> {
    let err = |source| PolicyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let text = toml::to_string(value).map_err(|e| err(std::io::Error::other(e.to_string())))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let temp = path.with_extension("toml.tmp");
    let mut file = std::fs::File::create(&temp).map_err(err)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(err)?;
    if durability == Durability::Synced {
        file.sync_all().map_err(err)?;
    }
    std::fs::rename(&temp, path).map_err(err)?;
    if durability == Durability::Synced
        && let Some(dir) = path.parent()
    {
        // The rename itself is on disk only once the directory is.
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iroh::SecretKey;

    fn config(text: &str) -> ConfigFile<ServerConfig> {
        let file = ConfigFile::parse(Path::new("server.toml"), text.into()).unwrap();
        file.validate().unwrap();
        file
    }

    #[test]
    fn deny_by_default_and_malformed_ids_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy::load(&config(""), dir.path()).unwrap();
        assert!(
            !policy.is_approved(&SecretKey::generate().public()),
            "empty list allows nobody"
        );

        let bad = config("[security]\napproved_clients = [\n  \"not-an-id\",\n]\n");
        let err = Policy::load(&bad, dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("server.toml:3:3") && err.contains("not-an-id"),
            "{err}"
        );
    }

    #[test]
    fn approvals_revocations_and_pending_persist() {
        let dir = tempfile::tempdir().unwrap();
        let listed = SecretKey::generate().public();
        let stranger = SecretKey::generate().public();
        let file = config(&format!("[security]\napproved_clients = [\"{listed}\"]\n"));
        let policy = Policy::load(&file, dir.path()).unwrap();
        assert!(policy.is_approved(&listed));
        policy.record_refused(&stranger, "127.0.0.1:5").unwrap();
        policy.record_refused(&stranger, "127.0.0.1:6").unwrap();
        let pending = policy.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].attempts, pending[0].address.as_str()),
            (2, "127.0.0.1:6")
        );

        policy.approve(&stranger).unwrap();
        policy.revoke(&listed).unwrap();
        let reloaded = Policy::load(&file, dir.path()).unwrap();
        assert!(reloaded.is_approved(&stranger));
        assert!(
            !reloaded.is_approved(&listed),
            "revocation overrides the config file"
        );
        assert!(reloaded.pending().is_empty());
    }

    #[test]
    fn a_decision_that_cannot_be_saved_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let client = SecretKey::generate().public();
        let file = config(&format!("[security]\napproved_clients = [\"{client}\"]\n"));
        let policy = Policy::load(&file, dir.path()).unwrap();
        let mut changes = policy.subscribe();
        changes.mark_unchanged();
        // The temporary file cannot be created where a directory stands.
        std::fs::create_dir(dir.path().join("approvals.toml.tmp")).unwrap();
        assert!(policy.revoke(&client).is_err());
        assert!(policy.is_approved(&client), "not revoked in memory either");
        assert!(
            !changes.has_changed().unwrap(),
            "nobody was told of a change"
        );
        std::fs::create_dir(dir.path().join("shares.toml.tmp")).unwrap();
        let key: DeviceKey = "1-1/0525:a4a0".parse().unwrap();
        assert!(policy.share(&key).is_err());
        assert!(!policy.is_shared(&key), "not shared in memory either");
    }

    #[test]
    fn a_damaged_pending_list_does_not_stop_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pending.toml"), b"\0\0\0garbage").unwrap();
        let policy = Policy::load(&config(""), dir.path()).expect("starts");
        assert!(policy.pending().is_empty());
        // Decisions are not advisory: a damaged approval list is an error.
        std::fs::write(dir.path().join("approvals.toml"), b"\0\0\0garbage").unwrap();
        assert!(Policy::load(&config(""), dir.path()).is_err());
    }

    #[test]
    fn the_pending_list_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy::load(&config(""), dir.path()).unwrap();
        let strangers: Vec<EndpointId> = (0..=PENDING_LIMIT)
            .map(|_| SecretKey::generate().public())
            .collect();
        for stranger in &strangers {
            policy.record_refused(stranger, "127.0.0.1:5").unwrap();
        }
        let pending: Vec<String> = policy.pending().into_iter().map(|c| c.id).collect();
        assert_eq!(pending.len(), PENDING_LIMIT);
        assert!(
            !pending.contains(&strangers[0].to_string()),
            "the oldest went"
        );
        assert!(pending.contains(&strangers[PENDING_LIMIT].to_string()));
        let reloaded = Policy::load(&config(""), dir.path()).unwrap();
        assert_eq!(reloaded.pending().len(), PENDING_LIMIT);
    }

    #[test]
    fn no_pending_record_without_require_approval() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy::load(
            &config("[security]\nrequire_approval = false\n"),
            dir.path(),
        )
        .unwrap();
        policy
            .record_refused(&SecretKey::generate().public(), "x")
            .unwrap();
        assert!(policy.pending().is_empty());
    }

    #[test]
    fn shares_follow_auto_share_and_exceptions() {
        let dir = tempfile::tempdir().unwrap();
        let key: DeviceKey = "1-1/0525:a4a0".parse().unwrap();
        let manual = Policy::load(&config(""), dir.path()).unwrap();
        assert!(!manual.is_shared(&key));
        manual.share(&key).unwrap();
        assert!(
            Policy::load(&config(""), dir.path())
                .unwrap()
                .is_shared(&key)
        );

        let auto_dir = tempfile::tempdir().unwrap();
        let auto = Policy::load(&config("[usb]\nauto_share = true\n"), auto_dir.path()).unwrap();
        assert!(auto.is_shared(&key));
        auto.unshare(&key).unwrap();
        assert!(!auto.is_shared(&key));
    }
}
