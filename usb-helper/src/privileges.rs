//! The helper holds USB access through group membership only. At start it
//! refuses root (unless told otherwise for development), drops every
//! capability it might have inherited, forbids gaining new privileges, and
//! reports what it runs with.

use caps::{CapSet, Capability};
use nix::unistd::{getegid, geteuid, getgid, getgroups, getuid};

/// Why the process will not run with the privileges it has.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "refusing to run as root: run as the p2p-usb-helper user (group usb-proxy grants USB access), or pass --allow-root for development"
    )]
    Root,
    #[error("cannot drop capabilities: {0}")]
    Drop(String),
}

/// What the process runs with after [`drop_privileges`], for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivilegeReport {
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    pub groups: Vec<u32>,
    pub effective: Vec<Capability>,
    pub permitted: Vec<Capability>,
    pub bounding: usize,
}

impl std::fmt::Display for PrivilegeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "uid={} euid={} gid={} egid={} groups={:?} effective caps={:?} permitted caps={:?} bounding set size={}",
            self.uid,
            self.euid,
            self.gid,
            self.egid,
            self.groups,
            self.effective,
            self.permitted,
            self.bounding
        )
    }
}

/// Refuses root unless `allow_root`, then clears the effective, permitted,
/// inheritable and ambient capability sets (and the bounding set where
/// permitted) and sets no_new_privs.
pub fn drop_privileges(allow_root: bool) -> Result<PrivilegeReport, PrivilegeError> {
    if geteuid().is_root() && !allow_root {
        return Err(PrivilegeError::Root);
    }
    let drop_err = |e: caps::errors::CapsError| PrivilegeError::Drop(e.to_string());
    // The bounding set can only shrink while CAP_SETPCAP is still effective.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::read(None, CapSet::Bounding).map_err(drop_err)? {
            caps::drop(None, CapSet::Bounding, cap).map_err(drop_err)?;
        }
    }
    // Only touch sets that hold something: under a seccomp filter without
    // @privileged (as the unit runs it) even a no-op capset() fails.
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        if !caps::read(None, set).map_err(drop_err)?.is_empty() {
            caps::clear(None, set).map_err(drop_err)?;
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| PrivilegeError::Drop(e.to_string()))?;
    report()
}

fn report() -> Result<PrivilegeReport, PrivilegeError> {
    let read = |set| {
        caps::read(None, set)
            .map(|caps| {
                let mut caps: Vec<_> = caps.into_iter().collect();
                caps.sort_by_key(|c| c.index());
                caps
            })
            .map_err(|e| PrivilegeError::Drop(e.to_string()))
    };
    Ok(PrivilegeReport {
        uid: getuid().as_raw(),
        euid: geteuid().as_raw(),
        gid: getgid().as_raw(),
        egid: getegid().as_raw(),
        groups: getgroups()
            .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default(),
        effective: read(CapSet::Effective)?,
        permitted: read(CapSet::Permitted)?,
        bounding: read(CapSet::Bounding)?.len(),
    })
}
